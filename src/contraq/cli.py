"""The `contraq` command: one sub-command per job.

contraq train [hydra overrides]     train a sampler (configs/train.yaml)
contraq demo [hydra overrides]      train on the embedded default, then eval + report
contraq sample --checkpoint RUN ... questions for new edit facts
contraq eval --checkpoint RUN ...   trained policy vs baselines on held-out facts
contraq report RUN                  curves + Markdown summary of a run
contraq nli-train ...               train the offline MiniLM NLI judge
contraq redis start|stop|status     a local redis-server for buffer=redis

A bad input (config value, file, run folder, server) prints one line and exits with code 2;
`contraq --debug CMD ...` or CONTRAQ_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DEBUG_ENV = "CONTRAQ_DEBUG"
USER_ERROR_EXIT = 2


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def report_user_error(cmd: str, exc: BaseException) -> int:
    """One line on stderr for a user error (the traceback only in debug mode)."""
    if debug_enabled():
        raise exc
    print(f"contraq {cmd}: {exc}", file=sys.stderr)
    return USER_ERROR_EXIT


def config_dir() -> Path:
    """configs/ of the checkout (editable install), or $CONTRAQ_CONFIG_DIR."""
    path = Path(os.environ.get("CONTRAQ_CONFIG_DIR", REPO_ROOT / "configs"))
    if not (path / "train.yaml").exists():
        raise SystemExit(
            f"contraq: no train.yaml in {path}; set CONTRAQ_CONFIG_DIR to the repo's configs/"
        )
    return path


def _hydra(job: Callable[..., object], overrides: list[str], prog: str) -> int:
    """Run `job(cfg)` under hydra.main so users get Hydra's whole command line."""
    import hydra

    from contraq.conf import register_schemas
    from contraq.config_check import one_line_errors

    register_schemas()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    wrapped = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")(
        job
    )
    rank = int(os.environ.get("RANK", "0") or 0)
    if rank > 0:
        # Under torchrun every rank runs this: only rank 0 writes Hydra's files and job log.
        overrides = [*overrides, "hydra.output_subdir=null", f"hydra.job.name=rank{rank}"]
    argv = sys.argv
    sys.argv = [prog, *overrides]
    try:
        with one_line_errors():  # a wrong type or unknown key: one line naming it
            wrapped()
    finally:
        sys.argv = argv
    return 0


def _guarded(cmd: str, job: Callable[[Any], object]) -> Callable[[Any], None]:
    """Hydra prints a traceback for any exception of the job: user errors and a stop by
    signal leave it as SystemExit with one line instead."""

    def run(cfg: Any) -> None:
        from contraq.errors import TrainingInterrupted, UserError

        try:
            job(cfg)
        except TrainingInterrupted as e:
            print(f"contraq {cmd}: {e}", file=sys.stderr)
            raise SystemExit(128 + e.signum) from None
        except UserError as e:
            raise SystemExit(report_user_error(cmd, e)) from None

    return run


def _train(cfg: Any) -> None:
    from contraq.config_check import validate

    validate(cfg)  # before the heavy imports: a bad value is reported at once
    from contraq.train import run_training

    run_training(cfg)


def _demo(cfg: Any) -> None:
    from contraq.config_check import validate

    validate(cfg)
    from contraq.evaluate import run_demo

    run_demo(cfg)


USAGE = __doc__ or ""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:
        argv.remove("--debug")
        os.environ[DEBUG_ENV] = "1"  # also seen by ranks that Lightning re-launches
    if debug_enabled():
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    from contraq.errors import UserError

    try:
        return _dispatch(argv[0], argv[1:])
    except UserError as e:
        return report_user_error(argv[0], e)
    except KeyboardInterrupt:
        if debug_enabled():
            raise
        print(f"contraq {argv[0]}: interrupted", file=sys.stderr)
        return 130


def _dispatch(cmd: str, rest: list[str]) -> int:
    if cmd == "train":
        return _hydra(_guarded(cmd, _train), rest, "contraq train")
    if cmd == "demo":
        return _hydra(_guarded(cmd, _demo), rest, "contraq demo")
    if cmd == "nli-train":
        from contraq.nli import cli_main as nli_main

        return nli_main(rest)
    if cmd == "redis":
        from contraq.redis_server import cli_main as redis_main

        return redis_main(rest)
    if cmd in ("sample", "eval", "report"):
        from contraq import evaluate

        return {
            "sample": evaluate.sample_main,
            "eval": evaluate.eval_main,
            "report": evaluate.report_main,
        }[cmd](rest)
    print(f"contraq: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
