"""Manage a local ``redis-server`` for the replay buffer (``contraq redis start|stop|status``).

One server per data directory. ``start`` launches Debian's ``redis-server`` detached (its own
session, so it outlives the launching process), bound to 127.0.0.1 with protected mode and an
append-only file (entries survive a server restart), and records in the data directory:

- ``redis.pid`` - the server's pid,
- ``redis.log`` - its stdout/stderr,
- ``server.json`` - ``{"port", "pid", "log_file", "conf_file", "password_set", "command"}``,
- ``redis.conf`` - only when a password is given (mode 0600, so ``ps`` never shows it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contraq.errors import UserError

#: Default data directory (relative to the working directory; ``.cache/`` is git-ignored).
DEFAULT_DATA_DIR = ".cache/redis"
DEFAULT_PORT = 6399
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
PASSWORD_ENV = "CONTRAQ_REDIS_PASSWORD"

# Where Debian puts the binary, for when PATH lacks it (e.g. /usr/sbin for non-root users).
_FALLBACK_BINARIES = ("/usr/bin/redis-server", "/usr/sbin/redis-server")
_PID_FILE = "redis.pid"
_LOG_FILE = "redis.log"
_INFO_FILE = "server.json"
_CONF_FILE = "redis.conf"

# Servers started by this process, so stop() can reap them (a zombie still "exists" for kill 0).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class RedisServerError(UserError, RuntimeError):
    """A local redis-server could not be found, started, reached or stopped."""


@dataclass(frozen=True)
class ServerInfo:
    """A server started by :func:`start`."""

    host: str
    port: int
    pid: int
    data_dir: Path
    log_file: Path
    pid_file: Path
    conf_file: Path | None
    command: tuple[str, ...]  # argv the server was launched with (never holds the password)


@dataclass(frozen=True)
class ServerStatus:
    """What :func:`status` found.

    ``answering``: something speaks Redis on the port (even if it wants a password);
    ``pid``: the pid recorded in the data directory if that process is alive.
    """

    answering: bool
    port: int | None
    pid: int | None
    data_dir: Path | None
    message: str


def redis_server_binary() -> str:
    """Path of ``redis-server`` (PATH first, then Debian's /usr/bin and /usr/sbin)."""
    found = shutil.which("redis-server")
    if found:
        return found
    for cand in _FALLBACK_BINARIES:
        if os.access(cand, os.X_OK):
            return cand
    raise RedisServerError(
        "redis-server was not found on PATH. Install it with `sudo apt-get install redis-server` "
        "(Debian/Ubuntu); a new run can use buffer=memory."
    )


def _listening(host: str, port: int, timeout: float) -> bool:
    """Whether anything accepts a TCP connection on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _ping(host: str, port: int, password: str | None, timeout: float = 0.5) -> str:
    """``"ok"`` if PING answers, ``"auth"`` if a server answers but refuses our credentials,
    ``"other"`` if something listens that does not answer as Redis, ``"down"`` if nothing
    listens there."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # retry=0: redis-py 6+ retries refused connections 3x with ~1 s back-off by default.
    client = redis.Redis(
        host=host, port=port, password=password, socket_timeout=timeout,
        socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
    )  # fmt: skip
    try:
        return "ok" if client.ping() is True else "other"  # False: it did not answer PONG
    except (redis.exceptions.AuthenticationError, redis.exceptions.NoPermissionError):
        return "auth"
    except redis.exceptions.ResponseError as e:
        return "auth" if "NOAUTH" in str(e) or "WRONGPASS" in str(e) else "other"
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
        # Refused: nothing there. Accepted, then closed or silent: another program holds it.
        return "other" if _listening(host, port, timeout) else "down"
    except redis.exceptions.RedisError:  # e.g. InvalidResponse: a non-Redis protocol answered
        return "other"
    except (AttributeError, TypeError, ValueError):  # redis-py's handshake got e.g. `:42`
        return "other"
    finally:
        client.close()


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie counts as dead)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _is_redis_server(pid: int) -> bool:
    """Guard against a recycled pid: the process's command line must be a redis-server."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (not Linux): trust the pid file
    return b"redis-server" in cmd or b"redis-check" in cmd


def _read_info(data_dir: Path) -> dict[str, object] | None:
    path = data_dir / _INFO_FILE
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RedisServerError(f"{path}: unreadable server record ({e}); delete it") from None
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
        raise RedisServerError(f"{path}: field 'pid' missing or not an int; delete the file")
    return info


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only (created 0600, never wider)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _quote_conf(value: str) -> str:
    """Quote a value for redis.conf (double quotes, backslash escapes)."""
    if any(ord(c) < 32 for c in value):
        raise RedisServerError("the Redis password must not contain control characters")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def start(
    port: int = DEFAULT_PORT,
    data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR,
    password: str | None = None,
    timeout: float = 15.0,
) -> ServerInfo:
    """Start ``redis-server`` on 127.0.0.1:``port`` with its files in ``data_dir``.

    If the server recorded in ``data_dir`` already runs on ``port`` it is returned as is.
    Raises :class:`RedisServerError` when the binary is missing, the port is taken by another
    server, or PING does not answer within ``timeout`` seconds (the message holds the log tail).
    """
    binary = redis_server_binary()
    data = Path(data_dir).expanduser().resolve()
    data.mkdir(parents=True, exist_ok=True)
    info = _read_info(data)
    if info is not None and _pid_alive(int(info["pid"])) and _is_redis_server(int(info["pid"])):
        if info.get("port") == port and _ping("127.0.0.1", port, password) == "ok":
            return _info_from_record(data, info)
        raise RedisServerError(
            f"a redis-server (pid {info['pid']}, port {info.get('port')}) already uses {data}; "
            f"stop it with `contraq redis stop --dir {data}` or pick another --dir"
        )
    # "other" (a non-Redis program holds the port) is left to redis-server's own bind error.
    if _ping("127.0.0.1", port, None) in ("ok", "auth"):
        raise RedisServerError(
            f"port {port} on 127.0.0.1 is already served by another Redis; use it "
            f"(buffer.autostart=false) or pick another port"
        )

    log_file, pid_file = data / _LOG_FILE, data / _PID_FILE
    conf_file: Path | None = None
    args = [binary]
    if password is not None:
        if not password:
            raise RedisServerError("the Redis password must not be empty (use null for none)")
        # The config file goes first on the command line; the password never reaches argv.
        conf_file = data / _CONF_FILE
        _write_private(conf_file, f"requirepass {_quote_conf(password)}\n")
        args.append(str(conf_file))
    else:
        with contextlib.suppress(FileNotFoundError):
            (data / _CONF_FILE).unlink()
    args += [
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--protected-mode", "yes",
        "--appendonly", "yes",
        "--dir", str(data),
        "--daemonize", "no",
    ]  # fmt: skip
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own session: survives the launcher and its Ctrl-C
            close_fds=True,
            cwd=data,
        )
    _CHILDREN[proc.pid] = proc
    pid_file.write_text(f"{proc.pid}\n")
    record = {
        "port": port,
        "pid": proc.pid,
        "log_file": str(log_file),
        "conf_file": str(conf_file) if conf_file else None,
        "password_set": password is not None,
        "command": args,
    }
    (data / _INFO_FILE).write_text(json.dumps(record, indent=1) + "\n")

    return _wait_ready(proc, data, record, password, timeout)


def _wait_ready(
    proc: subprocess.Popen[bytes],
    data: Path,
    record: dict[str, Any],
    password: str | None,
    timeout: float,
) -> ServerInfo:
    """Wait until the just-started server answers PING; a server that exits or stays silent
    for ``timeout`` seconds is forgotten and reported with its log tail."""
    port, log_file = int(record["port"]), Path(record["log_file"])
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            _forget(data, proc.pid)
            raise RedisServerError(
                f"redis-server on port {port} exited with code {proc.returncode} at start-up; "
                f"last lines of {log_file}:\n{_log_tail(log_file)}"
            )
        if _ping("127.0.0.1", port, password, timeout=0.3) == "ok":
            return _info_from_record(data, record)
        if time.monotonic() > deadline:
            _terminate(proc.pid, 5.0)
            _forget(data, proc.pid)
            raise RedisServerError(
                f"redis-server on port {port} did not answer PING within {timeout:.0f}s; "
                f"last lines of {log_file}:\n{_log_tail(log_file)}"
            )
        time.sleep(0.05)


def _info_from_record(data: Path, info: dict[str, object]) -> ServerInfo:
    conf = info.get("conf_file")
    return ServerInfo(
        host="127.0.0.1",
        port=int(info["port"]),  # type: ignore[arg-type]
        pid=int(info["pid"]),  # type: ignore[arg-type]
        data_dir=data,
        log_file=data / _LOG_FILE,
        pid_file=data / _PID_FILE,
        conf_file=Path(str(conf)) if conf else None,
        command=tuple(str(a) for a in info.get("command") or ()),  # type: ignore[attr-defined]
    )


def _forget(data: Path, pid: int) -> None:
    for name in (_PID_FILE, _INFO_FILE):
        with contextlib.suppress(FileNotFoundError):
            (data / name).unlink()
    _CHILDREN.pop(pid, None)


def _terminate(pid: int, timeout: float) -> None:
    """SIGTERM (redis flushes the AOF and exits), then SIGKILL after ``timeout`` seconds."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not _pid_alive(pid):
            break
    child = _CHILDREN.get(pid)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=1.0)  # reap our own child


def stop(data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR, timeout: float = 10.0) -> bool:
    """Stop the server recorded in ``data_dir``. Returns False if none was running."""
    data = Path(data_dir).expanduser().resolve()
    info = _read_info(data)
    if info is None:
        return False
    pid = int(info["pid"])  # type: ignore[arg-type]
    running = _pid_alive(pid) and _is_redis_server(pid)
    if running:
        _terminate(pid, timeout)
        if _pid_alive(pid):
            raise RedisServerError(f"redis-server pid {pid} did not stop; kill it by hand")
    _forget(data, pid)
    return running


def status(
    port: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    host: str = "127.0.0.1",
    password: str | None = None,
) -> ServerStatus:
    """Whether a server answers on ``port`` (or on the port recorded in ``data_dir``)."""
    data = Path(data_dir).expanduser().resolve() if data_dir is not None else None
    pid = None
    if data is not None:
        info = _read_info(data)
        if info is not None:
            rec_pid = int(info["pid"])  # type: ignore[arg-type]
            if _pid_alive(rec_pid) and _is_redis_server(rec_pid):
                pid = rec_pid
            if port is None:
                port = int(info["port"])  # type: ignore[arg-type]
    prefix = ""
    if port is None:  # nothing recorded: the default port may still have a server
        port, prefix = DEFAULT_PORT, f"no server recorded in {data}; "
    state = _ping(host, port, password)
    where = f"{host}:{port}"
    msg = (
        prefix
        + {
            "ok": f"redis answers on {where}",
            "auth": f"redis answers on {where} but refuses the given credentials",
            "other": f"something else listens on {where}: it does not answer as Redis "
            f"(another program holds the port; choose another --port / buffer.port)",
            "down": f"nothing listens on {where}",
        }[state]
    )
    if pid is not None:
        msg += f" (pid {pid}, data {data})"
    return ServerStatus(state in ("ok", "auth"), port, pid, data, msg)


def ensure_running(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR,
    password: str | None = None,
) -> bool:
    """Make sure Redis answers on ``host:port``; returns True if this call started it.

    A local host with nothing answering gets a server started in ``data_dir``. A remote host
    is only checked. Raises :class:`RedisServerError` naming ``host:port`` otherwise.
    """
    state = _ping(host, port, password, timeout=2.0)
    if state == "ok":
        return False
    if state == "auth":
        raise RedisServerError(
            f"Redis on {host}:{port} refuses the credentials "
            f"({'a' if password else 'no'} password given); set {PASSWORD_ENV}"
        )
    if state == "other":
        raise RedisServerError(
            f"something else listens on {host}:{port} and does not answer as Redis; "
            "choose another buffer.port"
        )
    if host not in LOCAL_HOSTS:
        raise RedisServerError(
            f"no Redis answers on {host}:{port} (remote host: not started automatically); "
            f"start it there with `contraq redis start --port {port}`"
        )
    start(port, data_dir, password)
    return True


def cli_main(argv: list[str]) -> int:
    """``contraq redis start|stop|status [--port N] [--dir D]``; the password comes from
    env ``CONTRAQ_REDIS_PASSWORD`` (never argv). Returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="contraq redis", description="Manage a local redis-server for the replay buffer."
    )
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--port", type=int, default=None, help=f"default {DEFAULT_PORT}")
    parser.add_argument("--dir", default=DEFAULT_DATA_DIR, help="data directory (AOF, log, pid)")
    args = parser.parse_args(argv)
    password = os.environ.get(PASSWORD_ENV) or None
    try:
        if args.action == "start":
            port = args.port if args.port is not None else DEFAULT_PORT
            info = start(port, args.dir, password)
            print(
                f"redis-server running on 127.0.0.1:{info.port} (pid {info.pid}); "
                f"data {info.data_dir}, log {info.log_file}"
            )
            return 0
        if args.action == "stop":
            stopped = stop(args.dir)
            print(
                f"stopped redis-server of {args.dir}" if stopped else f"none running in {args.dir}"
            )
            return 0
        st = status(args.port, args.dir, password=password)
        print(st.message)
        return 0 if st.answering else 1
    except RedisServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(cli_main(sys.argv[1:]))
