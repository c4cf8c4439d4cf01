"""Counting host syncs: the tensor calls that make the host wait for a GPU's queue.

On a GPU, ``.item()``, ``.tolist()``, ``.cpu()``, ``bool(t)``, ``int(t)``, ``float(t)`` and
``.nonzero()`` copy a result to the host and so wait for every kernel queued before them; a
decode loop with one of those per token leaves the GPU idle while the host prepares the next
step. Counting them needs no GPU: the same calls run on the CPU (``bench/bench_syncs.py`` and
the tests count them per decode step).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch

SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__")
_PAUSED = [0]


@contextlib.contextmanager
def count_host_syncs() -> Iterator[Counter[str]]:
    """Counts calls of :data:`SYNC_METHODS` on tensors for the duration (outside
    :func:`not_counted`), by method name. Not thread-safe: for benchmarks and tests."""
    counts: Counter[str] = Counter()
    saved = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def counting(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def call(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not _PAUSED[0]:
                counts[name] += 1
            return method(self, *args, **kwargs)

        return call

    for name, method in saved.items():
        setattr(torch.Tensor, name, counting(name, method))
    try:
        yield counts
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@contextlib.contextmanager
def not_counted() -> Iterator[None]:
    """Syncs inside are not counted (e.g. those inside a library's forward pass)."""
    _PAUSED[0] += 1
    try:
        yield
    finally:
        _PAUSED[0] -= 1


# A decode loop looks at its state on the host (every row finished? which rows leave the
# batch?) once per this many steps on a GPU; on the CPU a look costs nothing and every step
# looks, so finished rows leave at once and the loop stops at the first step it could.
GPU_CHECK_EVERY = 8
_EVERY: list[int | None] = [None]


def check_every(device: torch.device | str) -> int:
    """Decode steps between a loop's host syncs on ``device``: 1 on the CPU,
    :data:`GPU_CHECK_EVERY` elsewhere, or what :func:`checking_every` set."""
    if _EVERY[0] is not None:
        return _EVERY[0]
    return 1 if torch.device(device).type == "cpu" else GPU_CHECK_EVERY


@contextlib.contextmanager
def checking_every(k: int) -> Iterator[None]:
    """Decode loops sync once per ``k`` steps on any device for the duration (the tests and
    ``bench/bench_syncs.py`` run the GPU's schedule on the CPU)."""
    if k < 1:
        raise ValueError(f"checking_every needs k >= 1, got {k}")
    saved, _EVERY[0] = _EVERY[0], k
    try:
        yield
    finally:
        _EVERY[0] = saved
