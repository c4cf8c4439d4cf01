"""Replay buffer of good questions per edit fact (docs/DESIGN.md section 4).

- :mod:`~contraq.buffer.entry` - :class:`BufferEntry` (one stored question, validated on
  read), :func:`prompt_key`, :func:`entry_problem`.
- :mod:`~contraq.buffer.policy` - the top-K / de-duplication / sampling policy shared by both
  backends, and the :class:`ReplayBuffer` interface.
- :mod:`~contraq.buffer.memory` - :class:`MemoryBuffer`, a dict in this process, saved in the
  Lightning checkpoint through ``state_dict()`` (JSON-able data only).
- :mod:`~contraq.buffer.redis_backend` - :class:`RedisBuffer`, shared by processes, survives
  restarts.
- :mod:`~contraq.buffer.build` - :func:`build_buffer` from the ``buffer`` config group.
"""

from contraq.buffer.build import build_buffer
from contraq.buffer.entry import BufferEntry, entry_problem, prompt_key
from contraq.buffer.errors import BufferCorruptError, BufferUnavailableError, ReplayBufferError
from contraq.buffer.memory import MemoryBuffer
from contraq.buffer.policy import (
    ReplayBuffer,
    edit_distance_below,
    is_near_duplicate,
    merge_entries,
    sample_indices,
)
from contraq.buffer.redis_backend import RedisBuffer

__all__ = [
    "BufferCorruptError",
    "BufferEntry",
    "BufferUnavailableError",
    "MemoryBuffer",
    "RedisBuffer",
    "ReplayBuffer",
    "ReplayBufferError",
    "build_buffer",
    "edit_distance_below",
    "entry_problem",
    "is_near_duplicate",
    "merge_entries",
    "prompt_key",
    "sample_indices",
]
