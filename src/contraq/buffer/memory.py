"""The in-process replay buffer, saved in the Lightning checkpoint as JSON."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any

from contraq.buffer.entry import BufferEntry
from contraq.buffer.errors import BufferCorruptError
from contraq.buffer.policy import (
    NEAR_DUP_RATIO,
    STATE_VERSION,
    ReplayBuffer,
    check_policy_args,
    merge_entries,
)


class MemoryBuffer(ReplayBuffer):
    """In-process buffer; its ``state_dict`` goes into the Lightning checkpoint."""

    def __init__(self, max_size: int = 50, near_dup_ratio: float = NEAR_DUP_RATIO) -> None:
        check_policy_args(max_size, near_dup_ratio)
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
