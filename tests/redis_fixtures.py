"""Real redis-server fixtures for the buffer tests (no mocks).

The binary missing means skip, except under CI (env ``CI``) or ``CONTRAQ_REQUIRE_REDIS=1``,
where it is a failure: a skipped suite there would hide a broken setup.
"""

from __future__ import annotations

import os
import random
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from contraq import redis_server
from contraq.buffer import BufferEntry, RedisBuffer


def require_redis_binary() -> str:
    """Path of redis-server, or skip/fail the test (see module docstring)."""
    try:
        return redis_server.redis_server_binary()
    except redis_server.RedisServerError as e:
        if os.environ.get("CI") or os.environ.get("CONTRAQ_REQUIRE_REDIS") == "1":
            pytest.fail(f"redis-server is required here (CI / CONTRAQ_REQUIRE_REDIS=1): {e}")
        pytest.skip(f"redis-server not installed: {e}")


def free_port() -> int:
    """A TCP port that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(data_dir: Path, password: str | None = None) -> redis_server.ServerInfo:
    """Start a real redis-server on a free port (retrying if the port got taken meanwhile)."""
    require_redis_binary()
    last: Exception | None = None
    for _ in range(3):
        try:
            return redis_server.start(free_port(), data_dir, password=password)
        except redis_server.RedisServerError as e:  # port race with another process
            last = e
    raise AssertionError(f"could not start redis-server: {last}")


@dataclass
class RedisHandle:
    """A running test server; ``buffer()`` gives a client in a fresh namespace."""

    info: redis_server.ServerInfo
    password: str | None = None

    @property
    def port(self) -> int:
        return self.info.port

    def buffer(self, namespace: str | None = None, **kwargs: object) -> RedisBuffer:
        ns = namespace or f"test:{uuid.uuid4().hex}"
        return RedisBuffer(
            host="127.0.0.1", port=self.port, password=self.password, namespace=ns, **kwargs
        )


@pytest.fixture(scope="module")
def redis_handle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisHandle]:
    """One real redis-server per test module; tests isolate themselves by namespace."""
    info = start_server(tmp_path_factory.mktemp("redis"))
    try:
        yield RedisHandle(info)
    finally:
        redis_server.stop(info.data_dir)


# --------------------------------------------------------------------------------------------
# Concurrent writers (run in spawned processes: must be importable, module level)
# --------------------------------------------------------------------------------------------


def contended_entries(worker: int, n_adds: int, batch: int) -> list[list[BufferEntry]]:
    """Deterministic batches with many exact- and near-duplicates across workers.

    20 template questions of 12 tokens; each entry is a template with 0-2 token substitutions
    (near-duplicates of it: distance <= 2 < 0.25 * 24). Texts are shared by templates t, t+5,
    t+10, t+15, whose tokens are far apart: exact-text duplicates that are not near-duplicates.
    """
    rng = random.Random(1000 + worker)
    templates = [[100 * t + j for j in range(12)] for t in range(20)]
    out = []
    for _ in range(n_adds):
        b = []
        for _ in range(batch):
            t = rng.randrange(len(templates))
            ids = list(templates[t])
            for _ in range(rng.randrange(3)):
                ids[rng.randrange(len(ids))] = 5000 + rng.randrange(50)
            text = f"q{t % 5}-{rng.randrange(4)}"
            b.append(BufferEntry(ids, round(rng.uniform(-10.0, 0.0), 6), {"log_c": -1.0}, text))
        out.append(b)
    return out


def concurrent_writer(
    port: int, namespace: str, key: str, worker: int, n_adds: int, batch: int, max_size: int
) -> None:
    """Target of a spawned process: add this worker's batches to the shared key."""
    buf = RedisBuffer(port=port, namespace=namespace, max_size=max_size)
    for entries in contended_entries(worker, n_adds, batch):
        buf.add(key, entries)
    buf.close()
