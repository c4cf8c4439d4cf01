"""contraq.redis_server against Debian's real redis-server."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from contraq import redis_server
from contraq.redis_server import RedisServerError
from redis_fixtures import free_port, require_redis_binary

pytestmark = pytest.mark.redis


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_start_status_stop_round_trip(tmp_path: Path) -> None:
    require_redis_binary()
    port, data = free_port(), tmp_path / "d"
    info = redis_server.start(port, data)
    try:
        assert info.port == port and alive(info.pid)
        assert info.pid_file.read_text().strip() == str(info.pid)
        assert "Ready to accept connections" in info.log_file.read_text()
        assert info.conf_file is None
        # The running server's effective settings (redis rewrites its own process title).
        client = redis.Redis(port=port, retry=Retry(NoBackoff(), 0))
        conf = {k: client.config_get(k)[k] for k in ("bind", "protected-mode", "appendonly", "dir")}
        client.close()
        assert conf == {
            "bind": "127.0.0.1",
            "protected-mode": "yes",
            "appendonly": "yes",
            "dir": str(data.resolve()),
        }
        by_dir = redis_server.status(data_dir=data)
        assert by_dir.answering and by_dir.pid == info.pid and by_dir.port == port
        assert redis_server.status(port=port).answering
        # Starting again in the same place returns the running server.
        assert redis_server.start(port, data).pid == info.pid
        # Another data dir on the same port is refused.
        with pytest.raises(RedisServerError, match=f"port {port}"):
            redis_server.start(port, tmp_path / "other")
    finally:
        assert redis_server.stop(data)
    assert not alive(info.pid)
    assert not info.pid_file.exists()
    assert not redis_server.status(port=port).answering
    assert not redis_server.status(data_dir=data).answering
    assert redis_server.stop(data) is False


def test_ensure_running_starts_one_when_none_answers(tmp_path: Path) -> None:
    require_redis_binary()
    port, data = free_port(), tmp_path / "d"
    try:
        assert redis_server.ensure_running("127.0.0.1", port, data) is True
        assert redis_server.status(port=port).answering
        assert redis_server.ensure_running("localhost", port, data) is False
    finally:
        redis_server.stop(data)
    # A remote host is only checked, never started (127.0.0.2 is not one of the local names).
    with pytest.raises(RedisServerError, match=f"127.0.0.2:{port}.*not started"):
        redis_server.ensure_running("127.0.0.2", port, tmp_path / "remote")
    assert not (tmp_path / "remote").exists()


def test_password_goes_through_a_private_config_file(tmp_path: Path) -> None:
    require_redis_binary()
    port, data, secret = free_port(), tmp_path / "d", "top secret"
    info = redis_server.start(port, data, password=secret)
    try:
        assert info.conf_file is not None
        assert info.conf_file.stat().st_mode & 0o777 == 0o600
        assert str(info.conf_file) in info.command
        assert not any(secret in a for a in info.command)
        assert secret.encode() not in Path(f"/proc/{info.pid}/cmdline").read_bytes()
        assert secret not in (data / "server.json").read_text()
        assert redis_server.status(port=port, password=secret).message.endswith(f":{port}")
        assert "refuses" in redis_server.status(port=port).message
        assert redis_server.ensure_running("127.0.0.1", port, data, password=secret) is False
        for wrong in (None, "nope"):
            with pytest.raises(RedisServerError, match="refuses the credentials") as exc:
                redis_server.ensure_running("127.0.0.1", port, data, password=wrong)
            assert secret not in str(exc.value)
    finally:
        redis_server.stop(data)


def test_failed_start_reports_the_log_tail(tmp_path: Path) -> None:
    require_redis_binary()
    with socket.socket() as squatter:  # a non-Redis listener holds the port
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(
            RedisServerError, match="(?s)exited with code.*[Aa]ddress already in use"
        ):
            redis_server.start(port, tmp_path / "d")
    assert not (tmp_path / "d" / "redis.pid").exists()


def test_missing_binary_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH directory
    monkeypatch.setattr(redis_server, "_FALLBACK_BINARIES", (str(tmp_path / "redis-server"),))
    with pytest.raises(RedisServerError, match="apt-get install redis-server"):
        redis_server.start(free_port(), tmp_path / "d")


def test_missing_binary_skips_locally_but_fails_under_ci(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(redis_server, "_FALLBACK_BINARIES", ())
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("CONTRAQ_REQUIRE_REDIS", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_redis_binary()
    for var, value in (("CI", "true"), ("CONTRAQ_REQUIRE_REDIS", "1")):
        with monkeypatch.context() as m:
            m.setenv(var, value)
            with pytest.raises(pytest.fail.Exception, match="required"):
                require_redis_binary()


def test_cli_start_status_stop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require_redis_binary()
    port, data = str(free_port()), str(tmp_path / "d")
    try:
        assert redis_server.cli_main(["start", "--port", port, "--dir", data]) == 0
        assert f"127.0.0.1:{port}" in capsys.readouterr().out
        assert redis_server.cli_main(["status", "--dir", data]) == 0
        assert "answers" in capsys.readouterr().out
    finally:
        assert redis_server.cli_main(["stop", "--dir", data]) == 0
    assert redis_server.cli_main(["status", "--port", port, "--dir", data]) == 1
    assert "nothing listens" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        redis_server.cli_main(["restart"])


class OtherServer:
    """A TCP server on a free port that is not Redis: it answers HTTP, or says nothing."""

    def __init__(self, reply: bytes | None) -> None:
        import threading

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = int(self.sock.getsockname()[1])
        self.reply, self.conns = reply, []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.reply is not None:
                conn.recv(1024)
                conn.sendall(self.reply)
                conn.close()

    def close(self) -> None:
        import contextlib

        with contextlib.suppress(OSError):  # wakes the accept() of the serving thread
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.mark.parametrize(
    "reply",
    [b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", None],
    ids=["http", "silent"],
)
def test_status_tells_another_program_from_nothing_listening(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], reply: bytes | None
) -> None:
    # Issue 9, case 10: "nothing answers" (or an InvalidResponse traceback) when another
    # program holds the port.
    other = OtherServer(reply)
    try:
        assert (
            redis_server.cli_main(["status", "--port", str(other.port), "--dir", str(tmp_path)])
            == 1
        )
        out = capsys.readouterr().out.strip()
        assert (
            out.startswith(f"something else listens on 127.0.0.1:{other.port}") and "\n" not in out
        )
        with pytest.raises(RedisServerError, match="does not answer as Redis"):
            redis_server.ensure_running("127.0.0.1", other.port, tmp_path / "d")
    finally:
        other.close()
    assert redis_server.cli_main(["status", "--port", str(other.port), "--dir", str(tmp_path)]) == 1
    assert capsys.readouterr().out.strip() == f"nothing listens on 127.0.0.1:{other.port}"


def test_a_server_answering_an_integer_is_not_redis(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 28 case 8: a program answering `:42` to PING passed as Redis (PING returned
    False), then the buffer or `redis status` failed with a traceback."""
    from contraq.buffer import BufferUnavailableError, RedisBuffer

    other = OtherServer(b":42\r\n")
    try:
        args = ["status", "--port", str(other.port), "--dir", str(tmp_path)]
        assert redis_server.cli_main(args) == 1
        assert capsys.readouterr().out.startswith(
            f"something else listens on 127.0.0.1:{other.port}"
        )
        with pytest.raises(RedisServerError, match="does not answer as Redis"):
            redis_server.ensure_running("127.0.0.1", other.port, tmp_path / "d")
        with pytest.raises(BufferUnavailableError, match="does not answer PING as Redis"):
            RedisBuffer(port=other.port, namespace="x")
    finally:
        other.close()


def test_status_without_a_record_checks_the_default_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 28 case 9: plain `contraq redis status` said "no server recorded" without
    looking at the port a server may run on."""
    code = redis_server.cli_main(["status", "--dir", str(tmp_path / "none")])
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"no server recorded in {tmp_path / 'none'}; ")
    assert f"127.0.0.1:{redis_server.DEFAULT_PORT}" in out and code in (0, 1)


def test_redis_down_message_suggests_nothing_the_relaunch_guard_refuses() -> None:
    """Issue 28 case 9: the message said `set buffer.backend=memory`, which a relaunch of a
    Redis run then refused (the config differs)."""
    from contraq.buffer import BufferUnavailableError, RedisBuffer

    require_redis_binary()
    with pytest.raises(BufferUnavailableError) as exc:
        RedisBuffer(port=free_port(), namespace="x")
    assert "buffer.backend=memory" not in str(exc.value)
    assert "contraq redis start" in str(exc.value) and "a new run" in str(exc.value)
