"""The mark of a user error: the CLI prints its message as one line and exits with code 2
(``--debug`` or ``CONTRAQ_DEBUG=1`` shows the traceback). Anything else is a bug and keeps
its traceback."""

from __future__ import annotations

import signal
from pathlib import Path


class UserError(Exception):
    """Bad input from the user (config value, file, run folder, server); the message says
    which and what is accepted."""


class ConfigError(UserError, ValueError):
    """A config value is invalid; the message names the key and what it accepts."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped training after a step; ``last.ckpt`` holds that step."""

    def __init__(self, signum: int, step: int, ckpt: Path) -> None:
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} at step {step}; saved {ckpt}; run the same command to resume"
        )
        self.signum = signum


class TrainingAborted(TrainingInterrupted):
    """A second SIGINT/SIGTERM aborted the clean stop: ``last.ckpt`` is an earlier step."""

    def __init__(self, signum: int, ckpt: Path) -> None:
        Exception.__init__(
            self,
            f"aborted by a second {signal.Signals(signum).name}; the running step was not saved, "
            f"{ckpt} (if any) holds an earlier one; run the same command to resume",
        )
        self.signum = signum
