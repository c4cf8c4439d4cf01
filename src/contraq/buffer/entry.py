"""A stored question (:class:`BufferEntry`), its validation, and the key of a prompt.

Stored data (a Redis hash field, a checkpoint's state dict) is untrusted: every field is
checked on read, and a bad one raises :class:`BufferCorruptError` naming where it is stored.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from contraq.buffer.errors import BufferCorruptError

if TYPE_CHECKING:  # torch is imported lazily: Redis worker processes and the CLI stay light
    import torch

#: A replayed entry's |log_r| above this is corruption: log R sums log-probs of a few dozen
#: tokens (plus a finite floor), and a huge value makes the squared loss overflow.
MAX_ABS_LOG_R = 1e6


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


def entry_problem(
    entry: BufferEntry, vocab_size: int, max_len: int, termination_id: int | None = None
) -> str | None:
    """Why ``entry`` cannot be replayed by a model with ``vocab_size`` tokens and questions of
    at most ``max_len`` tokens ending with ``termination_id`` (once, last: trajectory balance
    needs complete trajectories); stored data may come from another model or be tampered."""
    top = max(entry.token_ids)
    if top >= vocab_size:
        return f"token id {top} >= the vocabulary size {vocab_size}"
    if len(entry.token_ids) > max_len:
        return f"{len(entry.token_ids)} tokens > sampler.max_len {max_len}"
    ids = entry.token_ids
    if termination_id is not None and (ids[-1] != termination_id or termination_id in ids[:-1]):
        return f"does not end with the termination token (id {termination_id}) exactly once"
    if abs(entry.log_r) > MAX_ABS_LOG_R:
        return f"log_r {entry.log_r!r} outside [-{MAX_ABS_LOG_R:g}, {MAX_ABS_LOG_R:g}]"
    return None
