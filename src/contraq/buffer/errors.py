"""Error kinds of the replay buffer."""

from __future__ import annotations

from contraq.errors import UserError


class ReplayBufferError(RuntimeError):
    """Base class of replay-buffer errors."""


class BufferCorruptError(UserError, ReplayBufferError, ValueError):
    """A stored value (JSON, Redis key, state dict) is not a valid buffer entry."""


class BufferUnavailableError(UserError, ReplayBufferError):
    """The buffer's backend (Redis) cannot be reached or refuses us."""
