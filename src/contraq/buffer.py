"""Replay buffer of good questions per edit fact (DESIGN.md section 4).

Each key (a stable digest of the prompt's token ids, see :func:`prompt_key`) holds at most
``max_size`` :class:`BufferEntry` objects: the top-K by *unscaled* log-reward, de-duplicated by
exact decoded text and by token edit distance (near-duplicates), keeping the higher reward.
The policy lives in small pure functions (:func:`merge_entries`, :func:`is_near_duplicate`,
:func:`sample_indices`) shared by both backends:

- :class:`MemoryBuffer` - a dict in this process, saved in the Lightning checkpoint through
  ``state_dict()`` (JSON-able data only, so ``torch.load(weights_only=True)`` reads it).
- :class:`RedisBuffer` - a sorted set (score = log_r, member = entry id) plus a hash
  (entry id -> JSON) per key under ``{namespace}:``; shared by processes, survives restarts.
  Merges run in a WATCH/MULTI/EXEC transaction with retry, so concurrent writers never leave
  more than K entries or a duplicate. No pickle anywhere: values are JSON.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import math
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from contraq.errors import UserError

if TYPE_CHECKING:  # torch is imported lazily: Redis worker processes and the CLI stay light
    import torch

log = logging.getLogger(__name__)

T = TypeVar("T")
EntryCheck = Callable[["BufferEntry"], "str | None"]

#: Default near-duplicate threshold: edit distance < ratio * (len1 + len2).
NEAR_DUP_RATIO = 0.25
#: Format version written by ``MemoryBuffer.state_dict`` and into each Redis namespace.
STATE_VERSION = 1
#: Environment variable holding the Redis password (never put it in a config file or argv).
PASSWORD_ENV = "CONTRAQ_REDIS_PASSWORD"
#: A replayed entry's |log_r| above this is corruption: log R sums log-probs of a few dozen
#: tokens (plus a finite floor), and a huge value makes the squared loss overflow.
MAX_ABS_LOG_R = 1e6
#: Optimistic-transaction retries before ``add`` gives up under contention.
_MAX_CONFLICTS = 1000


class ReplayBufferError(RuntimeError):
    """Base class of replay-buffer errors."""


class BufferCorruptError(UserError, ReplayBufferError, ValueError):
    """A stored value (JSON, Redis key, state dict) is not a valid buffer entry."""


class BufferUnavailableError(UserError, ReplayBufferError):
    """The buffer's backend (Redis) cannot be reached or refuses us."""


# --------------------------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------------------------


def _check_entry_fields(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Validate raw entry fields; return them normalised or raise ``BufferCorruptError``.

    ``where`` names the source (a Redis key, a state-dict path) for the error message.
    """
    if not isinstance(data, Mapping):
        raise BufferCorruptError(f"{where}: expected a JSON object, got {type(data).__name__}")
    expected = {"token_ids", "log_r", "components", "text"}
    missing = expected - set(data)
    if missing:
        raise BufferCorruptError(f"{where}: missing key(s) {sorted(missing)}")
    extra = set(data) - expected
    if extra:
        raise BufferCorruptError(f"{where}: unexpected key(s) {sorted(extra)}")

    ids = data["token_ids"]
    if not isinstance(ids, (list, tuple)) or not ids:
        raise BufferCorruptError(f"{where}: key 'token_ids' must be a non-empty list of ints")
    for i, t in enumerate(ids):
        # bool is an int subclass; a stray True is corruption, not token 1.
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < 2**31:
            raise BufferCorruptError(
                f"{where}: key 'token_ids'[{i}] = {t!r} is not a token id (int in [0, 2**31))"
            )

    log_r = data["log_r"]
    if not isinstance(log_r, (int, float)) or isinstance(log_r, bool) or not math.isfinite(log_r):
        raise BufferCorruptError(f"{where}: key 'log_r' = {log_r!r} is not a finite number")

    comps = data["components"]
    if not isinstance(comps, Mapping):
        raise BufferCorruptError(f"{where}: key 'components' must be an object of name -> number")
    clean: dict[str, float] = {}
    for name, value in comps.items():
        if not isinstance(name, str):
            raise BufferCorruptError(f"{where}: key 'components' has a non-string name {name!r}")
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not math.isfinite(value)
        ):
            raise BufferCorruptError(
                f"{where}: key 'components'[{name!r}] = {value!r} is not a finite number"
            )
        clean[name] = float(value)

    text = data["text"]
    if not isinstance(text, str):
        raise BufferCorruptError(f"{where}: key 'text' must be a string, got {type(text).__name__}")
    return {
        "token_ids": [int(t) for t in ids],
        "log_r": float(log_r),
        "components": clean,
        "text": text,
    }


@dataclass
class BufferEntry:
    """One stored question.

    Attributes:
        token_ids: the question's actions, termination token included (no prompt, no padding).
        log_r: UNSCALED terminal log-reward (never tempered; re-temper on replay).
        components: reward parts, e.g. ``{"log_c": ..., "log_pq": ...}``.
        text: the decoded question (used for exact de-duplication and for humans).
    """

    token_ids: list[int]
    log_r: float
    components: dict[str, float] = field(default_factory=dict)
    text: str = ""

    def __post_init__(self) -> None:
        # Accept tensors / numpy scalars from callers, then validate like stored data.
        ids = self.token_ids
        if hasattr(ids, "tolist"):  # tensor / ndarray
            ids = ids.tolist()
        log_r = _scalar(self.log_r)
        comps = {k: _scalar(v) for k, v in dict(self.components).items()}
        try:
            clean = _check_entry_fields(
                {"token_ids": list(ids), "log_r": log_r, "components": comps, "text": self.text},
                "BufferEntry",
            )
        except BufferCorruptError as e:  # a programming error here, not stored data
            raise ValueError(str(e)) from None
        self.token_ids = clean["token_ids"]
        self.log_r = clean["log_r"]
        self.components = clean["components"]
        self.text = clean["text"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (lists/dicts/str/float/int only)."""
        return {
            "token_ids": list(self.token_ids),
            "log_r": self.log_r,
            "components": dict(self.components),
            "text": self.text,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "entry") -> BufferEntry:
        """Inverse of :meth:`to_dict`; raises ``BufferCorruptError`` naming ``where`` and the key."""
        return cls(**_check_entry_fields(data, where))

    def to_json(self) -> str:
        """Compact JSON; floats round-trip exactly (``repr``), NaN/inf are refused."""
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, raw: str | bytes, where: str = "entry") -> BufferEntry:
        """Parse :meth:`to_json` output; any malformed value raises ``BufferCorruptError``."""
        try:
            text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
            if not isinstance(text, str):
                raise TypeError(f"expected str or bytes, got {type(raw).__name__}")
            data = json.loads(text, parse_constant=_refuse_constant)
        except (UnicodeDecodeError, ValueError, TypeError) as e:
            raise BufferCorruptError(f"{where}: not valid entry JSON ({e})") from None
        return cls.from_dict(data, where)

    def entry_id(self) -> str:
        """Stable id of this question (digest of token ids and text), used as Redis member."""
        h = hashlib.blake2b(digest_size=16)
        h.update(_ids_bytes(self.token_ids))
        h.update(b"\x00")
        h.update(self.text.encode("utf-8"))
        return h.hexdigest()


def _scalar(x: Any) -> Any:
    """A 0-d tensor / numpy scalar as a Python number; anything else unchanged."""
    return x.item() if hasattr(x, "item") and not isinstance(x, (int, float)) else x


def _refuse_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} is not allowed")


def _ids_bytes(token_ids: Iterable[int]) -> bytes:
    """int32 little-endian bytes of token ids (platform independent)."""
    return b"".join(int(t).to_bytes(4, "little", signed=True) for t in token_ids)


def prompt_key(prompt_token_ids: Sequence[int] | torch.Tensor) -> str:
    """Stable buffer key for a prompt: blake2b hex digest of its real token ids.

    Args:
        prompt_token_ids: the prompt's real token ids (padding removed), a sequence of ints
            or a 1-D tensor ``[P_real]``.

    Returns:
        32 hex characters, identical across processes and machines (never Python's salted
        ``hash()``).
    """
    if hasattr(prompt_token_ids, "tolist"):  # tensor / ndarray
        if len(prompt_token_ids.shape) != 1:
            raise ValueError(
                f"prompt_key expects a 1-D tensor of real token ids, got shape "
                f"{tuple(prompt_token_ids.shape)} (strip padding per row first)"
            )
        prompt_token_ids = prompt_token_ids.tolist()
    ids = list(prompt_token_ids)
    if not ids:
        raise ValueError("prompt_key: empty prompt")
    return hashlib.blake2b(_ids_bytes(ids), digest_size=16).hexdigest()


# --------------------------------------------------------------------------------------------
# Policy: pure functions shared by both backends
# --------------------------------------------------------------------------------------------


def edit_distance_below(a: Sequence[int], b: Sequence[int], limit: float) -> bool:
    """Whether the Levenshtein distance between token sequences ``a`` and ``b`` is < ``limit``.

    Cheap lower bounds first: the distance is at least ``|len(a) - len(b)|`` and at least the
    bag distance ``max(|a - b|, |b - a|)`` (multiset differences: each edit fixes at most one
    surplus token on each side), which settles most unrelated pairs without any DP. Then a
    row-by-row DP that stops once a whole row is >= ``limit`` (rows never decrease below it).
    """
    if limit <= 0:
        return False
    if abs(len(a) - len(b)) >= limit:
        return False
    ca, cb = Counter(a), Counter(b)
    if max((ca - cb).total(), (cb - ca).total()) >= limit:
        return False
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, start=1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        if min(cur) >= limit:
            return False
        prev = cur
    return prev[-1] < limit


def is_near_duplicate(a: BufferEntry, b: BufferEntry, ratio: float = NEAR_DUP_RATIO) -> bool:
    """Same decoded text, or token edit distance < ``ratio * (len(a) + len(b))``."""
    if a.text == b.text:
        return True
    return edit_distance_below(
        a.token_ids, b.token_ids, ratio * (len(a.token_ids) + len(b.token_ids))
    )


def _rank_key(e: BufferEntry) -> tuple[float, str, list[int]]:
    # Best first; ties broken by content so both backends (and every process) agree.
    return (-e.log_r, e.text, e.token_ids)


def sort_entries(entries: Iterable[BufferEntry]) -> list[BufferEntry]:
    """Entries sorted best first (highest log_r; ties by text, then token ids)."""
    return sorted(entries, key=_rank_key)


def merge_entries(
    existing: Sequence[BufferEntry],
    new: Iterable[BufferEntry],
    max_size: int,
    near_dup_ratio: float = NEAR_DUP_RATIO,
) -> list[BufferEntry]:
    """The buffer policy: add ``new`` to ``existing``, de-duplicate, keep the top ``max_size``.

    New entries are considered one at a time, in order. A new entry that duplicates (exact
    text or near-duplicate tokens) any kept entry with a reward >= its own is dropped (ties keep
    the incumbent); otherwise it replaces every entry it duplicates. Finally the list is sorted
    best first and cut to ``max_size``. ``existing`` is assumed to satisfy the invariants already.

    Returns a new list; the returned entries are the same objects as the inputs, so a caller
    can tell which new entries were kept by identity.
    """
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    kept = sort_entries(existing)[:max_size]
    for e in new:
        if len(kept) >= max_size and _rank_key(e) >= _rank_key(kept[-1]):
            # Cannot enter the top-K, and cannot evict anything (that needs a strictly higher
            # reward than a kept entry): skip the edit-distance work.
            continue
        dups = [k for k in kept if is_near_duplicate(e, k, near_dup_ratio)]
        if any(d.log_r >= e.log_r for d in dups):
            continue
        dup_ids = {id(d) for d in dups}
        kept = [k for k in kept if id(k) not in dup_ids]
        kept.append(e)
        kept = sort_entries(kept)[:max_size]
    return kept


def entry_problem(entry: BufferEntry, vocab_size: int, max_len: int) -> str | None:
    """Why ``entry`` cannot be replayed by a model with ``vocab_size`` tokens and questions of
    at most ``max_len`` tokens (stored data may come from another model or be tampered)."""
    top = max(entry.token_ids)
    if top >= vocab_size:
        return f"token id {top} >= the vocabulary size {vocab_size}"
    if len(entry.token_ids) > max_len:
        return f"{len(entry.token_ids)} tokens > sampler.max_len {max_len}"
    if abs(entry.log_r) > MAX_ABS_LOG_R:
        return f"log_r {entry.log_r!r} outside [-{MAX_ABS_LOG_R:g}, {MAX_ABS_LOG_R:g}]"
    return None


def sample_indices(
    log_r: Sequence[float],
    n: int,
    generator: torch.Generator,
    prioritized: bool = True,
    temperature: float = 1.0,
) -> list[int]:
    """Draw ``n`` indices into ``log_r`` with replacement, using ONLY ``generator``.

    Args:
        log_r: unscaled log-rewards of the candidates, length M.
        prioritized: probabilities ``softmax(log_r / temperature)`` (shape [M]); else uniform.
        temperature: > 0; divides log_r before the softmax (higher = flatter).

    Returns:
        ``n`` indices in ``[0, M)``; empty when ``n == 0`` or ``M == 0``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if n == 0 or len(log_r) == 0:
        return []
    import torch

    device = generator.device
    if prioritized:
        scores = torch.tensor(list(log_r), dtype=torch.float64, device=device) / temperature
        probs = torch.softmax(scores, dim=0)  # [M]
        idx = torch.multinomial(probs, n, replacement=True, generator=generator)
    else:
        idx = torch.randint(0, len(log_r), (n,), generator=generator, device=device)
    return idx.tolist()


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


class ReplayBuffer(abc.ABC):
    """Per-key top-K replay buffer of questions (see module docstring for the policy)."""

    max_size: int
    near_dup_ratio: float

    @abc.abstractmethod
    def add(self, key: str, entries: Iterable[BufferEntry]) -> int:
        """Merge ``entries`` into ``key``'s list; return how many of them were kept."""

    @abc.abstractmethod
    def entries(self, key: str) -> list[BufferEntry]:
        """All entries of ``key``, best first (empty list for an unknown key)."""

    @abc.abstractmethod
    def keys(self) -> list[str]:
        """Keys that hold at least one entry, sorted."""

    @abc.abstractmethod
    def clear(self) -> None:
        """Remove every entry under every key."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state for a checkpoint."""

    @abc.abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""

    def size(self, key: str) -> int:
        """Number of entries under ``key``."""
        return len(self.entries(key))

    #: Checks a stored entry against the model that replays it (token ids, length, log_r
    #: bounds); returns why it is unusable, or None. Set by the training module.
    entry_check: EntryCheck | None = None

    def set_entry_check(self, check: EntryCheck | None) -> None:
        """Validate entries on read with ``check``; invalid ones are dropped from sampling,
        counted in :attr:`dropped` and warned about once, naming where they are stored."""
        self.entry_check = check
        self._dropped_ids: set[tuple[str, str]] = set()

    @property
    def dropped(self) -> int:
        """How many distinct stored entries :attr:`entry_check` rejected so far."""
        return len(getattr(self, "_dropped_ids", ()))

    def where(self, key: str) -> str:
        """Where ``key``'s entries are stored, for messages."""
        return f"replay buffer key {key!r}"

    def usable_entries(self, key: str) -> list[BufferEntry]:
        """:meth:`entries` of ``key`` that pass :attr:`entry_check`."""
        pool = self.entries(key)
        if self.entry_check is None:
            return pool
        good = []
        for e in pool:
            problem = self.entry_check(e)
            if problem is None:
                good.append(e)
                continue
            ident = (key, e.entry_id())
            if ident not in self._dropped_ids:
                self._dropped_ids.add(ident)
                log.warning(
                    "%s: dropped entry %s from replay: %s", self.where(key), ident[1], problem
                )
        return good

    def sample(
        self,
        key: str,
        n: int,
        generator: torch.Generator,
        prioritized: bool = True,
        temperature: float = 1.0,
    ) -> list[BufferEntry]:
        """``n`` entries of ``key`` drawn with replacement using ONLY ``generator``.

        Prioritised: P(entry) = softmax(log_r / temperature) over the key's entries; otherwise
        uniform. Returns ``[]`` when the key has no usable entry (the caller then samples
        on-policy).
        """
        pool = self.usable_entries(key)
        idx = sample_indices([e.log_r for e in pool], n, generator, prioritized, temperature)
        return [pool[i] for i in idx]


def _check_policy_args(max_size: int, near_dup_ratio: float) -> None:
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
        raise ValueError(f"buffer max_size must be an int >= 1, got {max_size!r}")
    if not 0 <= near_dup_ratio <= 1:
        raise ValueError(f"buffer near_dup_ratio must be in [0, 1], got {near_dup_ratio!r}")


class MemoryBuffer(ReplayBuffer):
    """In-process buffer; its ``state_dict`` goes into the Lightning checkpoint."""

    def __init__(self, max_size: int = 50, near_dup_ratio: float = NEAR_DUP_RATIO) -> None:
        _check_policy_args(max_size, near_dup_ratio)
        self.max_size = max_size
        self.near_dup_ratio = near_dup_ratio
        self._data: dict[str, list[BufferEntry]] = {}
        self._lock = threading.Lock()  # dataloader threads may add while the step samples

    def add(self, key: str, entries: Iterable[BufferEntry]) -> int:
        new = list(entries)
        with self._lock:
            merged = merge_entries(self._data.get(key, []), new, self.max_size, self.near_dup_ratio)
            if merged:
                self._data[key] = merged
            new_ids = {id(e) for e in new}
            return sum(id(e) in new_ids for e in merged)

    def entries(self, key: str) -> list[BufferEntry]:
        with self._lock:
            return list(self._data.get(key, []))

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(k for k, v in self._data.items() if v)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def state_dict(self) -> dict[str, Any]:
        """``{"version", "max_size", "near_dup_ratio", "entries": {key: [entry dict, ...]}}``."""
        with self._lock:
            return {
                "version": STATE_VERSION,
                "max_size": self.max_size,
                "near_dup_ratio": self.near_dup_ratio,
                "entries": {k: [e.to_dict() for e in v] for k, v in self._data.items()},
            }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the contents by ``state``; entries are re-merged under THIS buffer's policy
        (so a smaller configured ``max_size`` truncates). Raises ``BufferCorruptError``."""
        if not isinstance(state, Mapping):
            raise BufferCorruptError(f"buffer state: expected a dict, got {type(state).__name__}")
        version = state.get("version")
        if version != STATE_VERSION:
            raise BufferCorruptError(
                f"buffer state: key 'version' = {version!r}, expected {STATE_VERSION}"
            )
        raw = state.get("entries")
        if not isinstance(raw, Mapping):
            raise BufferCorruptError("buffer state: key 'entries' must be a dict of key -> list")
        data: dict[str, list[BufferEntry]] = {}
        for key, items in raw.items():
            if not isinstance(key, str) or not isinstance(items, (list, tuple)):
                raise BufferCorruptError(
                    f"buffer state: entries[{key!r}] must be a list under a string key"
                )
            loaded = [
                BufferEntry.from_dict(d, f"buffer state entries[{key!r}][{i}]")
                for i, d in enumerate(items)
            ]
            merged = merge_entries([], loaded, self.max_size, self.near_dup_ratio)
            if merged:
                data[key] = merged
        with self._lock:
            self._data = data


def _retrying(
    fn: Callable[[], T],
    retries: int,
    backoff: float,
    where: str,
    on_fail: Callable[[Exception], ReplayBufferError],
) -> T:
    """Run ``fn``, retrying connection errors with exponential back-off (plus jitter)."""
    import redis

    attempt = 0
    while True:
        try:
            return fn()
        except (redis.exceptions.AuthenticationError, redis.exceptions.NoPermissionError):
            raise
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            if attempt >= retries:
                raise on_fail(e) from None
            delay = backoff * (2**attempt) * (1 + 0.25 * random.random())
            log.warning(
                "redis %s failed (%s); retry %d/%d in %.2fs",
                where,
                type(e).__name__,
                attempt + 1,
                retries,
                delay,
            )
            time.sleep(delay)
            attempt += 1


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
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        _check_policy_args(max_size, near_dup_ratio)
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
        self.socket_timeout = float(socket_timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        kwargs: dict[str, Any] = {}
        if self.ssl:
            kwargs.update(
                ssl_ca_certs=ssl_ca_certs, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile
            )
        # decode_responses=False: we decode ourselves so bad bytes become BufferCorruptError.
        # retry=0: our _call retries whole operations (a WATCH transaction must restart from
        # its reads), instead of redis-py's default per-command retries.
        self._client = redis.Redis(
            host=host,
            port=self.port,
            db=self.db,
            username=username,
            password=password,
            ssl=self.ssl,
            socket_timeout=self.socket_timeout,
            socket_connect_timeout=self.socket_timeout,
            decode_responses=False,
            retry=Retry(NoBackoff(), 0),
            **kwargs,
        )
        self._password_set = password is not None
        self._call(self._client.ping, "ping", retries=0)

    # -- plumbing --------------------------------------------------------------------------

    def __repr__(self) -> str:  # never shows the password
        return (
            f"RedisBuffer(host={self.host!r}, port={self.port}, db={self.db}, ssl={self.ssl}, "
            f"namespace={self.namespace!r}, max_size={self.max_size})"
        )

    def _unavailable(self, err: Exception) -> BufferUnavailableError:
        return BufferUnavailableError(
            f"Redis replay buffer at {self.host}:{self.port} (db {self.db}) is unavailable "
            f"({type(err).__name__}: {err}). Start a local server with "
            f"`contraq redis start --port {self.port}`, or set buffer.backend=memory."
        )

    def _call(self, fn: Callable[[], T], what: str, retries: int | None = None) -> T:
        """Run a Redis operation: retries on connection loss, clean errors for auth/corruption."""
        import redis

        try:
            return _retrying(
                fn,
                self.retries if retries is None else retries,
                self.backoff,
                what,
                self._unavailable,
            )
        except (redis.exceptions.AuthenticationError, redis.exceptions.NoPermissionError) as e:
            hint = "wrong password?" if self._password_set else "no password given"
            raise BufferUnavailableError(
                f"Redis at {self.host}:{self.port} refused authentication ({hint}; "
                f"{type(e).__name__}). Set the right password in CONTRAQ_REDIS_PASSWORD."
            ) from None
        except redis.exceptions.ResponseError as e:
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
        """Validate a sorted set's (id, score) pairs against the hash of id -> entry JSON."""
        zkey, hkey = self._zkey(key), self._hkey(key)
        if len(raw) != len(members):
            raise BufferCorruptError(
                f"Redis keys {zkey!r} and {hkey!r} disagree: {len(members)} ids in the sorted set, "
                f"{len(raw)} entries in the hash"
            )
        out = []
        for member, score in members:
            if member not in raw:
                raise BufferCorruptError(
                    f"Redis key {hkey!r} has no field for id {member!r} listed in {zkey!r}"
                )
            e = BufferEntry.from_json(raw[member], f"Redis key {hkey!r} field {member!r}")
            if e.log_r != score:
                raise BufferCorruptError(
                    f"Redis key {zkey!r}: score {score!r} of id {member!r} differs from the "
                    f"entry's log_r {e.log_r!r}"
                )
            out.append(e)
        return sort_entries(out)

    # -- API -------------------------------------------------------------------------------

    def add(self, key: str, entries: Iterable[BufferEntry]) -> int:
        """Atomic merge: WATCH both keys, merge client-side, MULTI/EXEC; retry on conflict.

        If the connection drops after EXEC but before its reply, the retry sees the entries
        already stored and reports them as not inserted (the buffer itself stays correct).
        """
        import redis

        new = list(entries)
        if not new:
            return 0
        zkey, hkey = self._zkey(key), self._hkey(key)

        def attempt() -> int:
            conflicts = 0
            with self._client.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        pipe.watch(zkey, hkey)
                        # Read on another pooled connection, atomically; any write after our
                        # WATCH (including between these reads and EXEC) aborts the EXEC.
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
                        pipe.execute()
                        return len(added)
                    except redis.exceptions.WatchError:
                        # Another writer changed the key between our read and EXEC: redo.
                        conflicts += 1
                        if conflicts > _MAX_CONFLICTS:
                            raise ReplayBufferError(
                                f"Redis buffer key {key!r}: gave up after {conflicts} concurrent "
                                f"write conflicts"
                            ) from None
                        time.sleep(min(0.05, 0.001 * conflicts) * random.random())

        return self._call(attempt, "add")

    def entries(self, key: str) -> list[BufferEntry]:
        return self._call(lambda: self._snapshot(key), "entries")

    def size(self, key: str) -> int:
        return int(self._call(lambda: self._client.zcard(self._zkey(key)), "size"))

    def keys(self) -> list[str]:
        def read() -> list[str]:
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

        return self._call(read, "keys")

    def clear(self) -> None:
        """Delete every key of this namespace's buffer (other namespaces are untouched)."""
        import redis

        def run() -> None:
            with self._client.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        pipe.watch(self._index_key)
                        names = [
                            k.decode("utf-8", "replace") for k in pipe.smembers(self._index_key)
                        ]
                        pipe.multi()
                        for k in names:
                            pipe.delete(self._zkey(k), self._hkey(k))
                        pipe.delete(self._index_key)
                        pipe.execute()
                        return
                    except redis.exceptions.WatchError:
                        time.sleep(0.01 * random.random())

        self._call(run, "clear")

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


# --------------------------------------------------------------------------------------------
# Construction from config
# --------------------------------------------------------------------------------------------

#: Keys read by the training module, not by the buffer itself.
_MODULE_KEYS = {"prioritized", "use_buffer_prob", "temperature", "sample_temperature"}
_MEMORY_KEYS = {"backend", "max_size", "near_dup_ratio"} | _MODULE_KEYS
_REDIS_KEYS = _MEMORY_KEYS | {
    "host",
    "port",
    "db",
    "password",
    "username",
    "ssl",
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "namespace",
    "autostart",
    "data_dir",
    "socket_timeout",
    "retries",
    "backoff",
}


def build_buffer(cfg: Mapping[str, Any] | Any) -> ReplayBuffer:
    """Build a buffer from ``{backend: memory|redis, max_size, ...}`` (dict or DictConfig).

    For ``redis``: ``password: null`` falls back to env ``CONTRAQ_REDIS_PASSWORD``; with
    ``autostart: true`` and a local host, a redis-server is started in ``data_dir`` if none
    answers (see :func:`contraq.redis_server.ensure_running`). Unknown keys are an error
    (typos would otherwise be silently ignored).
    """
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(cfg, Mapping):
        raise ValueError(f"buffer config must be a mapping, got {type(cfg).__name__}")
    cfg = dict(cfg)
    backend = cfg.get("backend", "memory")
    allowed = {"memory": _MEMORY_KEYS, "redis": _REDIS_KEYS}.get(backend)
    if allowed is None:
        raise ValueError(f"buffer.backend must be 'memory' or 'redis', got {backend!r}")
    unknown = set(cfg) - allowed
    if unknown:
        raise ValueError(f"buffer config ({backend}): unknown key(s) {sorted(unknown)}")
    max_size = cfg.get("max_size", 50)
    ratio = cfg.get("near_dup_ratio", NEAR_DUP_RATIO)
    if backend == "memory":
        return MemoryBuffer(max_size=max_size, near_dup_ratio=ratio)

    password = cfg.get("password") or os.environ.get(PASSWORD_ENV) or None
    host = cfg.get("host", "127.0.0.1")
    port = int(cfg.get("port", 6399))
    if cfg.get("autostart", False):
        from contraq import redis_server

        data_dir = cfg.get("data_dir") or redis_server.DEFAULT_DATA_DIR
        try:
            redis_server.ensure_running(host, port, data_dir, password)
        except redis_server.RedisServerError as e:
            raise BufferUnavailableError(str(e)) from None
    return RedisBuffer(
        host=host,
        port=port,
        db=int(cfg.get("db", 0)),
        password=password,
        username=cfg.get("username"),
        ssl=bool(cfg.get("ssl", False)),
        ssl_ca_certs=cfg.get("ssl_ca_certs"),
        ssl_certfile=cfg.get("ssl_certfile"),
        ssl_keyfile=cfg.get("ssl_keyfile"),
        namespace=cfg.get("namespace") or "contraq:default",
        max_size=max_size,
        socket_timeout=float(cfg.get("socket_timeout", 5.0)),
        retries=int(cfg.get("retries", 5)),
        backoff=float(cfg.get("backoff", 0.2)),
        near_dup_ratio=ratio,
    )
