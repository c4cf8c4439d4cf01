"""Child processes that never outlive their parent: the kernel's ``PR_SET_PDEATHSIG`` for
any death of the parent (SIGKILL included), and SIGTERM turned into an exception so that the
parent's ``finally`` blocks stop its children and remove their temp folders."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None, sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies (no-op elsewhere).
    ``parent``: the pid the caller expects as parent (default: the current one); when it is
    already gone, this process kills itself at once."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    parent = os.getppid() if parent is None else parent
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d)", ctypes.get_errno())
        return False
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)
    return True


class Terminated(SystemExit):
    """SIGTERM arrived: unwinds like ``sys.exit(143)``, running every ``finally``."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


@contextlib.contextmanager
def sigterm_unwinds(what: str) -> Iterator[None]:
    """Inside the block SIGTERM raises :class:`Terminated` (Python's default is to die at
    once, leaving children and temp folders behind); one line names ``what`` stopped.
    A no-op outside the main thread (signal handlers live there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        print(f"{what}: stopped by {signal.Signals(signum).name}", file=sys.stderr)
        raise Terminated(signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
