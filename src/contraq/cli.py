"""The `contraq` command: one sub-command per job.

contraq train [hydra overrides]     train a sampler (configs/train.yaml)
contraq demo [hydra overrides]      train on the embedded default, then eval + report
contraq sample --checkpoint RUN ... questions for new edit facts
contraq eval --checkpoint RUN ...   trained policy vs baselines on held-out facts
contraq report RUN                  curves + Markdown summary of a run
contraq nli-train ...               train the offline MiniLM NLI judge
contraq redis start|stop|status     a local redis-server for buffer=redis
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


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
        wrapped()
    finally:
        sys.argv = argv
    return 0


def _train(cfg) -> None:  # noqa: ANN001 - hydra passes a DictConfig
    from contraq.train import run_training

    run_training(cfg)


def _demo(cfg) -> None:  # noqa: ANN001
    from contraq.evaluate import run_demo

    run_demo(cfg)


USAGE = __doc__ or ""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        return _hydra(_train, rest, "contraq train")
    if cmd == "demo":
        return _hydra(_demo, rest, "contraq demo")
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
