"""The replay buffer in Redis: shared by processes and ranks, survives restarts.

Per key a sorted set (score = log_r, member = entry id) plus a hash (entry id -> entry JSON)
under ``{namespace}:``. Merges run in a WATCH/MULTI/EXEC transaction (redis-py's
``Redis.transaction``), so concurrent writers never leave more than K entries or a duplicate.
Connection loss and timeouts are retried by redis-py itself (``Retry`` with exponential
back-off); a server that stays down ends in :class:`BufferUnavailableError`. No pickle
anywhere: values are JSON.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.client import Pipeline
from redis.exceptions import NoPermissionError
from redis.retry import Retry

from contraq.buffer.entry import BufferEntry
from contraq.buffer.errors import BufferCorruptError, BufferUnavailableError, ReplayBufferError
from contraq.buffer.policy import (
    NEAR_DUP_RATIO,
    STATE_VERSION,
    ReplayBuffer,
    check_policy_args,
    merge_entries,
    sort_entries,
)

log = logging.getLogger(__name__)

#: Optimistic-transaction attempts before ``add`` gives up under contention.
_MAX_CONFLICTS = 1000
#: Pause before re-running a transaction that another writer's EXEC invalidated.
_WATCH_DELAY_S = 0.001


def connection_retry(retries: int, backoff: float) -> Retry:
    """redis-py's retry policy for connection loss and timeouts: up to ``retries`` retries,
    waiting ``backoff``, ``2 * backoff``, ``4 * backoff``, ... seconds between them."""
    # ExponentialBackoff waits min(cap, base * 2**n) after the n-th failure, n = 1, 2, ...
    return Retry(
        ExponentialBackoff(cap=backoff * 2 ** max(retries - 1, 0), base=backoff / 2),
        retries,
        supported_errors=(redis.ConnectionError, redis.TimeoutError),
    )


class RedisBuffer(ReplayBuffer):
    """Buffer in Redis: per key a sorted set (score = log_r, member = entry id) and a hash
    (entry id -> entry JSON), under ``{namespace}:buf:{key}:z`` / ``:h``; the set of keys is
    ``{namespace}:keys``. Works across processes and restarts (same namespace)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6399,
        db: int = 0,
        password: str | None = None,
        ssl: bool = False,
        namespace: str = "contraq:default",
        max_size: int = 50,
        socket_timeout: float = 5.0,
        retries: int = 5,
        backoff: float = 0.2,
        near_dup_ratio: float = NEAR_DUP_RATIO,
        username: str | None = None,
        ssl_ca_certs: str | None = None,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
    ) -> None:
        check_policy_args(max_size, near_dup_ratio)
        if not isinstance(namespace, str) or not namespace.strip():
            raise ValueError(
                f"redis buffer namespace must be a non-empty string, got {namespace!r}"
            )
        if retries < 0 or backoff < 0:
            raise ValueError(f"retries and backoff must be >= 0, got {retries}, {backoff}")
        self.host, self.port, self.db = host, int(port), int(db)
        self.ssl = bool(ssl)
        self.namespace = namespace
        self.max_size = max_size
        self.near_dup_ratio = near_dup_ratio
        self._password_set = password is not None
        self._unreadable: dict[str, list[tuple[str, str]]] = {}  # key -> (id, why), last read
        connection: dict[str, Any] = dict(
            host=host,
            port=self.port,
            db=self.db,
            username=username,
            password=password,
            ssl=self.ssl,
            socket_timeout=float(socket_timeout),
            socket_connect_timeout=float(socket_timeout),
            # We decode ourselves, so bad bytes become BufferCorruptError.
            decode_responses=False,
        )
        if self.ssl:
            connection.update(
                ssl_ca_certs=ssl_ca_certs, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile
            )
        self._client = redis.Redis(**connection, retry=connection_retry(int(retries), backoff))
        # Start-up fails fast (no retries): a server that is not there now is a setup problem.
        with redis.Redis(**connection, retry=Retry(NoBackoff(), 0)) as probe, self._errors("ping"):
            try:
                answered = probe.ping()
            except (AttributeError, TypeError, ValueError):  # redis-py's handshake got `:42`
                answered = False
            if answered is not True:  # another program speaking (some of) RESP
                raise BufferUnavailableError(
                    f"something at {self.host}:{self.port} does not answer PING as Redis; "
                    "check buffer.host and buffer.port"
                )

    # -- plumbing --------------------------------------------------------------------------

    def __repr__(self) -> str:  # never shows the password
        return (
            f"RedisBuffer(host={self.host!r}, port={self.port}, db={self.db}, ssl={self.ssl}, "
            f"namespace={self.namespace!r}, max_size={self.max_size})"
        )

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turn redis-py's errors (after its retries) into one clear line each."""
        try:
            yield
        except (redis.AuthenticationError, NoPermissionError) as e:
            hint = "wrong password?" if self._password_set else "no password given"
            raise BufferUnavailableError(
                f"Redis at {self.host}:{self.port} refused authentication ({hint}; "
                f"{type(e).__name__}). Set the right password in CONTRAQ_REDIS_PASSWORD."
            ) from None
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise BufferUnavailableError(
                f"Redis replay buffer at {self.host}:{self.port} (db {self.db}) is unavailable "
                f"({type(e).__name__}: {e}). Start a local server with "
                f"`contraq redis start --port {self.port}` and relaunch (a new run can use "
                f"buffer=memory)."
            ) from None
        except redis.ResponseError as e:
            if "WRONGTYPE" in str(e):
                raise BufferCorruptError(
                    f"Redis {self.host}:{self.port}: a key under namespace {self.namespace!r} "
                    f"holds a value of the wrong type during {what} ({e})"
                ) from None
            if "NOAUTH" in str(e):
                raise BufferUnavailableError(
                    f"Redis at {self.host}:{self.port} requires a password; set "
                    f"CONTRAQ_REDIS_PASSWORD (buffer.password)."
                ) from None
            raise

    def _zkey(self, key: str) -> str:
        return f"{self.namespace}:buf:{key}:z"

    def _hkey(self, key: str) -> str:
        return f"{self.namespace}:buf:{key}:h"

    def where(self, key: str) -> str:
        return f"Redis key {self._hkey(key)!r}"

    @property
    def _index_key(self) -> str:
        return f"{self.namespace}:keys"

    def _snapshot(self, key: str) -> list[BufferEntry]:
        """All entries of ``key``, validated, read in ONE MULTI so the sorted set and the hash
        are seen at the same instant (separate reads could straddle another writer's EXEC)."""
        zkey, hkey = self._zkey(key), self._hkey(key)
        with self._client.pipeline(transaction=True) as pipe:
            pipe.type(zkey).type(hkey)
            pipe.zrange(zkey, 0, -1, withscores=True).hgetall(hkey)
            ztype, htype, members, raw = pipe.execute(raise_on_error=False)
        self._check_types(key, ztype, htype)
        for r in (members, raw):
            if isinstance(r, Exception):
                raise r
        return self._parse(key, members, raw)

    def _check_types(self, key: str, ztype: Any, htype: Any) -> None:
        for k, kind, want in ((self._zkey(key), ztype, "zset"), (self._hkey(key), htype, "hash")):
            kind = kind.decode() if isinstance(kind, bytes) else str(kind)
            if kind not in ("none", want):
                raise BufferCorruptError(
                    f"Redis key {k!r} should be a {want} of the replay buffer but is a {kind}"
                )

    def _parse(
        self, key: str, members: list[tuple[bytes, float]], raw: dict[bytes, bytes]
    ) -> list[BufferEntry]:
        """The entries of a sorted set's (id, score) pairs and the hash of id -> entry JSON.

        An entry that cannot be read (not JSON, a field of the wrong type, a score that is not
        its log_r, an id in one key only) is left out and listed by :meth:`unreadable`: one
        tampered or foreign entry must not stop every later read of the key.
        """
        hkey = self._hkey(key)
        out, bad = [], []
        for member, score in members:
            ident = member.decode("utf-8", "replace")
            if member not in raw:
                bad.append((ident, f"listed in {self._zkey(key)!r} but has no entry"))
                continue
            try:
                e = BufferEntry.from_json(raw[member], f"Redis key {hkey!r} field {member!r}")
            except BufferCorruptError as err:
                bad.append((ident, str(err).split(f"field {member!r}: ", 1)[-1]))
                continue
            if e.log_r != score:
                bad.append((ident, f"score {score!r} differs from the entry's log_r {e.log_r!r}"))
                continue
            out.append(e)
        listed = {m for m, _ in members}
        bad += [
            (m.decode("utf-8", "replace"), "not in the sorted set") for m in raw if m not in listed
        ]
        self._unreadable[key] = bad
        return sort_entries(out)

    def unreadable(self, key: str) -> list[tuple[str, str]]:
        """(id, why) of the entries of ``key`` that the last read left out."""
        return list(self._unreadable.get(key, ()))

    # -- API -------------------------------------------------------------------------------

    def add(self, key: str, entries: Iterable[BufferEntry]) -> int:
        """Atomic merge: WATCH both keys, merge client-side, MULTI/EXEC; redone on conflict.

        A connection lost while watching is a conflict too (redis-py raises ``WatchError``),
        so the merge restarts from fresh reads. If the connection drops after EXEC but before
        its reply, the redo sees the entries already stored and reports them as not inserted
        (the buffer itself stays correct).
        """
        new = list(entries)
        if not new:
            return 0
        zkey, hkey = self._zkey(key), self._hkey(key)
        attempts = 0

        def merge(pipe: Pipeline) -> int:
            nonlocal attempts
            attempts += 1
            if attempts > _MAX_CONFLICTS:
                raise ReplayBufferError(
                    f"Redis buffer key {key!r}: gave up after {_MAX_CONFLICTS} concurrent "
                    f"write conflicts"
                )
            # Read on another pooled connection, atomically; any write after our WATCH
            # (including between these reads and EXEC) aborts the EXEC.
            existing = self._snapshot(key)
            merged = merge_entries(existing, new, self.max_size, self.near_dup_ratio)
            kept = {id(e) for e in merged}
            removed = [e for e in existing if id(e) not in kept]
            new_ids = {id(e) for e in new}
            added = [e for e in merged if id(e) in new_ids]
            if not removed and not added:
                pipe.unwatch()
                return 0
            pipe.multi()
            if removed:  # before the additions: an id may be re-added with a new value
                rids = [e.entry_id() for e in removed]
                pipe.zrem(zkey, *rids)
                pipe.hdel(hkey, *rids)
            if added:
                pipe.hset(hkey, mapping={e.entry_id(): e.to_json() for e in added})
                pipe.zadd(zkey, {e.entry_id(): e.log_r for e in added})
            pipe.sadd(self._index_key, key)
            return len(added)

        with self._errors("add"):
            return self._client.transaction(
                merge, zkey, hkey, value_from_callable=True, watch_delay=_WATCH_DELAY_S
            )

    def entries(self, key: str) -> list[BufferEntry]:
        with self._errors("entries"):
            return self._snapshot(key)

    def size(self, key: str) -> int:
        with self._errors("size"):
            return int(self._client.zcard(self._zkey(key)))

    def keys(self) -> list[str]:
        with self._errors("keys"):
            raw = self._client.smembers(self._index_key)
            out = []
            for k in raw:
                try:
                    out.append(k.decode("utf-8"))
                except UnicodeDecodeError:
                    raise BufferCorruptError(
                        f"Redis key {self._index_key!r} holds a non-UTF-8 member {k!r}"
                    ) from None
            return sorted(k for k in out if self._client.zcard(self._zkey(k)) > 0)

    def clear(self) -> None:
        """Delete every key of this namespace's buffer (other namespaces are untouched)."""

        def delete_all(pipe: Pipeline) -> None:
            names = [k.decode("utf-8", "replace") for k in pipe.smembers(self._index_key)]
            pipe.multi()
            for k in names:
                pipe.delete(self._zkey(k), self._hkey(k))
            pipe.delete(self._index_key)

        with self._errors("clear"):
            self._client.transaction(delete_all, self._index_key, watch_delay=_WATCH_DELAY_S)

    def state_dict(self) -> dict[str, Any]:
        """Only the configuration (the entries live in Redis); never the password."""
        return {
            "version": STATE_VERSION,
            "backend": "redis",
            "host": self.host,
            "port": self.port,
            "db": self.db,
            "namespace": self.namespace,
            "max_size": self.max_size,
            "near_dup_ratio": self.near_dup_ratio,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore (entries are in Redis); warns if the checkpoint used another
        namespace, since this run will then not see the checkpoint's buffer."""
        if not isinstance(state, Mapping):
            raise BufferCorruptError(f"buffer state: expected a dict, got {type(state).__name__}")
        ns = state.get("namespace")
        if ns is not None and ns != self.namespace:
            log.warning(
                "checkpoint's Redis buffer namespace %r differs from the configured %r; "
                "the configured one is used",
                ns,
                self.namespace,
            )

    def close(self) -> None:
        """Release the connection pool."""
        self._client.close()
