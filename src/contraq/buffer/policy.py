"""The replay policy shared by both backends, and the :class:`ReplayBuffer` interface.

Each key (a prompt, see :func:`~contraq.buffer.entry.prompt_key`) holds at most ``max_size``
entries: the top-K by *unscaled* log-reward, de-duplicated by exact decoded text and by token
edit distance (near-duplicates), keeping the higher reward (:func:`merge_entries`). Replay
draws entries with P ~ softmax(log R / T) or uniformly (:func:`sample_indices`), skipping
entries the replaying model cannot use (:meth:`ReplayBuffer.set_entry_check`).
"""

from __future__ import annotations

import abc
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from contraq.buffer.entry import BufferEntry

if TYPE_CHECKING:  # torch is imported lazily: Redis worker processes and the CLI stay light
    import torch

log = logging.getLogger(__name__)

EntryCheck = Callable[[BufferEntry], "str | None"]

#: Default near-duplicate threshold: edit distance < ratio * (len1 + len2).
NEAR_DUP_RATIO = 0.25
#: Format version written by ``MemoryBuffer.state_dict`` and into each Redis namespace.
STATE_VERSION = 1


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
        """How many distinct stored entries were left out of replay so far (unreadable, or
        rejected by :attr:`entry_check`)."""
        return len(getattr(self, "_dropped_ids", ()))

    def where(self, key: str) -> str:
        """Where ``key``'s entries are stored, for messages."""
        return f"replay buffer key {key!r}"

    def unreadable(self, key: str) -> list[tuple[str, str]]:
        """(id, why) of stored entries of ``key`` that the last read could not parse (a
        backend holding untrusted data, like Redis, overrides this)."""
        return []

    def _drop(self, key: str, ident: str, problem: str) -> None:
        """Count and name an entry left out of replay, once per entry."""
        dropped = self.__dict__.setdefault("_dropped_ids", set())
        if (key, ident) not in dropped:
            dropped.add((key, ident))
            log.warning("%s: dropped entry %s from replay: %s", self.where(key), ident, problem)

    def usable_entries(self, key: str) -> list[BufferEntry]:
        """:meth:`entries` of ``key`` that pass :attr:`entry_check`; the others and the
        unreadable ones are counted and named (:meth:`_drop`)."""
        pool = self.entries(key)
        for ident, problem in self.unreadable(key):
            self._drop(key, ident, problem)
        if self.entry_check is None:
            return pool
        good = []
        for e in pool:
            problem = self.entry_check(e)
            if problem is None:
                good.append(e)
            else:
                self._drop(key, e.entry_id(), problem)
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


def check_policy_args(max_size: int, near_dup_ratio: float) -> None:
    """Raise ``ValueError`` unless ``max_size`` is an int >= 1 and the ratio is in [0, 1]."""
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
        raise ValueError(f"buffer max_size must be an int >= 1, got {max_size!r}")
    if not 0 <= near_dup_ratio <= 1:
        raise ValueError(f"buffer near_dup_ratio must be in [0, 1], got {near_dup_ratio!r}")
