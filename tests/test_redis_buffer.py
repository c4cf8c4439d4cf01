"""Redis-only behaviour of the replay buffer, against real redis-server processes."""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import pickle
import threading
import time
from pathlib import Path

import pytest
import redis
import torch
from omegaconf import OmegaConf
from redis.backoff import NoBackoff
from redis.retry import Retry

from contraq import redis_server
from contraq.buffer import (
    BufferCorruptError,
    BufferEntry,
    BufferUnavailableError,
    RedisBuffer,
    build_buffer,
    is_near_duplicate,
    merge_entries,
)
from redis_fixtures import (
    RedisHandle,
    concurrent_writer,
    contended_entries,
    free_port,
    redis_handle,  # noqa: F401  (module-scoped real server fixture)
    require_redis_binary,
    start_server,
)

pytestmark = pytest.mark.redis


def entry(i: int, log_r: float) -> BufferEntry:
    return BufferEntry([1000 * (i + 1) + j for j in range(8)], log_r, {"log_c": log_r}, f"q{i}")


def raw_client(port: int, password: str | None = None) -> redis.Redis:
    """A plain redis-py client (no retries: its default retries an auth failure for ~3 s)."""
    return redis.Redis(port=port, password=password, retry=Retry(NoBackoff(), 0))


def test_concurrent_writers_keep_the_invariants(redis_handle: RedisHandle) -> None:  # noqa: F811
    """4 spawned processes x 40 adds of overlapping (near-)duplicates into one key."""
    ns, key, k = f"conc:{os.getpid()}:{time.time_ns()}", "shared", 8
    n_adds, batch, workers = 40, 4, 4
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(
            target=concurrent_writer, args=(redis_handle.port, ns, key, w, n_adds, batch, k)
        )
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * workers

    buf = redis_handle.buffer(namespace=ns, max_size=k)
    got = buf.entries(key)
    assert len(got) == k == buf.size(key)  # far more than k distinct candidates were offered
    assert len({e.text for e in got}) == len(got)
    for a, b in itertools.combinations(got, 2):
        assert not is_near_duplicate(a, b), (a, b)
    offered = [
        e for w in range(workers) for batch_ in contended_entries(w, n_adds, batch) for e in batch_
    ]
    best = max(offered, key=lambda e: e.log_r)
    assert got[0] == best  # nothing can evict the global best
    assert all(e in offered for e in got)  # nothing invented, nothing mangled
    # The sorted set and the hash agree exactly (no orphan from an interleaved write).
    r = raw_client(redis_handle.port)
    assert r.zcard(f"{ns}:buf:{key}:z") == r.hlen(f"{ns}:buf:{key}:h") == k
    # What one process would keep from everything seen: the same best few (the greedy
    # de-dup depends on arrival order, so only the head is order-independent).
    assert merge_entries([], offered, k)[0] == got[0]
    buf.clear()


def test_persists_across_client_restart(redis_handle: RedisHandle) -> None:  # noqa: F811
    ns = f"persist:{time.time_ns()}"
    a = redis_handle.buffer(namespace=ns, max_size=5)
    es = [entry(i, -float(i)) for i in range(3)]
    a.add("k", es)
    a.close()
    b = redis_handle.buffer(namespace=ns, max_size=5)
    assert b.entries("k") == es and b.keys() == ["k"]
    b.clear()


def test_persists_across_server_restart(tmp_path: Path) -> None:
    info = start_server(tmp_path / "data")
    try:
        buf = RedisBuffer(port=info.port, namespace="restart", max_size=5)
        es = [entry(i, -float(i)) for i in range(3)]
        assert buf.add("k", es) == 3
        buf.close()
        assert redis_server.stop(info.data_dir)
        assert (info.data_dir / "appendonlydir").is_dir()  # the AOF, replayed at start-up
        info2 = redis_server.start(info.port, info.data_dir)
        buf2 = RedisBuffer(port=info2.port, namespace="restart", max_size=5)
        assert buf2.entries("k") == es
        buf2.close()
    finally:
        redis_server.stop(info.data_dir)


def test_password_is_required_and_never_leaked(tmp_path: Path) -> None:
    secret = 's3cr"et\\pw'
    info = start_server(tmp_path / "data", password=secret)
    try:
        # Not on the command line (ps shows it), and the config file is private.
        assert not any(secret in a for a in info.command)
        assert secret.encode() not in Path(f"/proc/{info.pid}/cmdline").read_bytes()
        assert info.conf_file is not None and (info.conf_file.stat().st_mode & 0o777) == 0o600
        for wrong in ("nope", None):
            with pytest.raises(BufferUnavailableError, match="authentication") as exc:
                RedisBuffer(port=info.port, password=wrong, namespace="pw")
            assert secret not in str(exc.value) and f"127.0.0.1:{info.port}" in str(exc.value)
        buf = RedisBuffer(port=info.port, password=secret, namespace="pw")
        assert buf.add("k", [entry(0, -1.0)]) == 1
        assert secret not in repr(buf) and secret not in str(buf.state_dict())
        buf.close()
    finally:
        redis_server.stop(info.data_dir)


def test_garbage_under_buffer_keys_is_reported_not_executed(
    redis_handle: RedisHandle,  # noqa: F811
    tmp_path: Path,
) -> None:
    buf = redis_handle.buffer(max_size=5)
    ns, r = buf.namespace, raw_client(redis_handle.port)

    # A plain string where the sorted set belongs.
    r.set(f"{ns}:buf:str:z", "garbage")
    for op in (lambda: buf.entries("str"), lambda: buf.add("str", [entry(0, 0.0)])):
        with pytest.raises(BufferCorruptError, match=r"buf:str:z.*string"):
            op()
    with pytest.raises(BufferCorruptError, match="wrong type"):
        buf.size("str")

    # A hash field with bad JSON, with a well-formed but invalid value, and a pickle payload
    # whose unpickling would create a file: left out of every read and named, nothing executed;
    # the key stays usable (issue 28: one bad entry stopped training for good).
    buf.add("k", [entry(1, -1.0)])
    (member,) = r.zrange(f"{ns}:buf:k:z", 0, -1)
    hkey = f"{ns}:buf:k:h"
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    for payload, match in (
        (b"{not json", "not valid entry JSON"),
        (b'{"token_ids":[1],"log_r":"high","components":{},"text":"x"}', "'log_r'"),
        (pickle.dumps(Evil()), "not valid entry JSON"),
    ):
        r.hset(hkey, member, payload)
        assert buf.entries("k") == [] and buf.sample("k", 2, torch.Generator()) == []
        ((ident, why),) = buf.unreadable("k")
        assert ident == member.decode() and match in why
    assert not marker.exists()
    assert buf.add("k", [entry(2, 0.0)]) == 1
    assert [e.text for e in buf.entries("k")] == ["q2"]

    # Sorted set and hash out of step: the id without an entry is left out and named.
    r.hdel(hkey, member)
    assert [e.text for e in buf.entries("k")] == ["q2"]
    assert buf.unreadable("k") == [(member.decode(), f"listed in '{ns}:buf:k:z' but has no entry")]
    buf.clear()


def test_namespaces_isolate(redis_handle: RedisHandle) -> None:  # noqa: F811
    a, b = redis_handle.buffer(max_size=5), redis_handle.buffer(max_size=5)
    a.add("k", [entry(0, -1.0)])
    b.add("k", [entry(1, -2.0), entry(2, -3.0)])
    assert [e.text for e in a.entries("k")] == ["q0"]
    assert [e.text for e in b.entries("k")] == ["q1", "q2"]
    a.clear()
    assert a.keys() == [] and b.size("k") == 2
    b.clear()


def test_unavailable_at_start_up_names_host_port_and_the_fix() -> None:
    require_redis_binary()
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(BufferUnavailableError) as exc:
        RedisBuffer(port=port, namespace="x", retries=3, backoff=1.0)
    msg = str(exc.value)
    assert f"127.0.0.1:{port}" in msg and f"contraq redis start --port {port}" in msg
    assert time.monotonic() - t0 < 3.0  # start-up fails fast: no retries there


def test_retries_with_backoff_during_training(tmp_path: Path) -> None:
    info = start_server(tmp_path / "data")
    try:
        brief = RedisBuffer(port=info.port, namespace="retry", retries=2, backoff=0.01)
        # Waits up to ~0.1 * (2**8 - 1) s in all before giving up.
        patient = RedisBuffer(port=info.port, namespace="retry", retries=8, backoff=0.1)
        brief.add("k", [entry(0, -1.0)])
        redis_server.stop(info.data_dir)
        # Server gone for good: the same clean error after the retries.
        with pytest.raises(BufferUnavailableError, match=f"contraq redis start --port {info.port}"):
            brief.add("k", [entry(1, -2.0)])
        # Server back while we back off: the operation goes through.
        restarter = threading.Timer(0.3, redis_server.start, args=(info.port, info.data_dir))
        restarter.start()
        assert patient.add("k", [entry(1, -2.0)]) == 1
        restarter.join()
        assert [e.text for e in patient.entries("k")] == ["q0", "q1"]  # the AOF kept q0
    finally:
        redis_server.stop(info.data_dir)


def test_redis_py_retry_rides_out_a_server_restart(tmp_path: Path) -> None:
    """Every operation waits, through redis-py's exponential back-off, for a server that
    comes back after a delay; without retries the same outage is an immediate clean error."""
    info = start_server(tmp_path / "data")
    try:
        buffers = {
            n: RedisBuffer(port=info.port, namespace="ride", retries=n, backoff=0.05)
            for n in (0, 8)
        }
        buffers[8].add("k", [entry(0, -1.0)])
        operations = {
            "add": lambda buf: buf.add("k", [entry(1, -2.0)]),
            "entries": lambda buf: [e.text for e in buf.entries("k")],
            "size": lambda buf: buf.size("k"),
            "keys": lambda buf: buf.keys(),
        }
        expected = {"add": 1, "entries": ["q0", "q1"], "size": 2, "keys": ["k"]}
        for name, op in operations.items():
            redis_server.stop(info.data_dir)
            t0 = time.monotonic()
            with pytest.raises(BufferUnavailableError, match="unavailable"):
                op(buffers[0])
            assert time.monotonic() - t0 < 1.0, name  # no retries: no waiting
            # Back-off 0.05, 0.1, 0.2, ... s (12.75 s in all): the restart lands inside it.
            restarter = threading.Timer(0.4, redis_server.start, args=(info.port, info.data_dir))
            t0 = time.monotonic()
            restarter.start()
            assert op(buffers[8]) == expected[name], name
            assert time.monotonic() - t0 >= 0.4, name  # it really waited for the server
            restarter.join()
    finally:
        redis_server.stop(info.data_dir)


def test_build_buffer_redis_autostarts_and_reads_password_from_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_redis_binary()
    port, data = free_port(), tmp_path / "auto"
    monkeypatch.setenv("CONTRAQ_REDIS_PASSWORD", "envpw")
    cfg = {
        "backend": "redis",
        "max_size": 3,
        "prioritized": True,
        "use_buffer_prob": 0.5,
        "host": "127.0.0.1",
        "port": port,
        "password": None,
        "namespace": "auto",
        "autostart": True,
        "data_dir": str(data),
    }
    try:
        buf = build_buffer(cfg)
        assert isinstance(buf, RedisBuffer) and buf.max_size == 3
        assert buf.add("k", [entry(i, -float(i)) for i in range(5)]) == 3
        assert redis_server.status(port, password="envpw").answering
        with pytest.raises(redis.AuthenticationError):
            raw_client(port, "other").ping()
        assert build_buffer(cfg).size("k") == 3  # second build reuses the running server
    finally:
        redis_server.stop(data)
    with pytest.raises(BufferUnavailableError, match=f"{port}"):
        build_buffer({**cfg, "autostart": False})


def test_build_buffer_from_the_redis_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/buffer/redis.yaml as Hydra composes it: the namespace follows the run name."""
    require_redis_binary()
    monkeypatch.delenv("CONTRAQ_REDIS_PASSWORD", raising=False)
    yaml = Path(__file__).resolve().parents[1] / "configs" / "buffer" / "redis.yaml"
    root = OmegaConf.create({"name": "run-42", "buffer": OmegaConf.load(yaml)})
    port, data = free_port(), tmp_path / "yaml"
    root.buffer.port, root.buffer.data_dir = port, str(data)
    try:
        buf = build_buffer(root.buffer)
        assert isinstance(buf, RedisBuffer)
        assert buf.namespace == "contraq:run-42" and buf.max_size == 50
        buf.add("k", [entry(0, -1.0)])
        assert raw_client(port).exists("contraq:run-42:buf:k:z")
    finally:
        redis_server.stop(data)
