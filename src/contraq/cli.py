"""The `contraq` command: one sub-command per job.

contraq train [overrides]           train a sampler (configs/train.yaml)
contraq demo [overrides]            train, then eval + report (configs/demo.yaml)
contraq sample checkpoint=RUN facts=FILE out=FILE [overrides]
                                    questions for new edit facts (configs/sample.yaml)
contraq eval checkpoint=RUN [overrides]
                                    trained policy vs baselines on held-out facts
                                    (configs/eval.yaml, configs/evaluation/)
contraq report run=RUN [overrides]  curves + Markdown summary of a run (configs/report.yaml)
contraq smooth run=RUN out=DIR [overrides]
                                    maximum likelihood on a run's best buffer questions
                                    (configs/smooth.yaml)
contraq rescore records=EVAL judge=NLI out=DIR [overrides]
                                    an eval's questions and answers judged again
                                    (configs/rescore.yaml)
contraq compare mode=paired a=EVAL b=EVAL | mode=splits test=[EVAL,..] val=[EVAL,..]
        | mode=labels labels=FILE records=EVAL
                                    tables from eval folders: paired over facts, both
                                    splits, hand-label precision (configs/compare.yaml)
contraq edit facts=FILE out=DIR [editor=ft|in_context|external] [overrides]
                                    edit the base LM with facts (configs/edit.yaml)
contraq probe edited=DIR|in_context questions=FILE out=DIR [overrides]
                                    an edited model answers questions, judged against
                                    each edit (configs/probe.yaml)
contraq nli-train [overrides]       train the offline MiniLM NLI judge once
                                    (configs/nli-train.yaml: nli.train.out=DIR, force=true)
contraq redis start|stop|status     a local redis-server for buffer=redis

Overrides are Hydra's key=value; `contraq CMD --help` lists a command's settings and their
defaults. A bad input (config value, file, run folder, server) prints one line and exits with
code 2; `contraq --debug CMD ...` or CONTRAQ_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contraq.errors import UserError

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


# What the machine, not the program, refused: a read-only or foreign folder, a full disk.
WRITE_ERRNOS = {
    errno.EACCES: "no permission (a read-only or another user's folder?)",
    errno.EPERM: "not permitted (a read-only or system folder?)",
    errno.EROFS: "a read-only file system",
    errno.ENOSPC: "the disk is full: free some space and relaunch (the last checkpoint is kept)",
    errno.EDQUOT: "the disk quota is used up: free some space and relaunch",
}


def os_error_line(exc: OSError) -> str | None:
    """The one line for an :class:`OSError` that :data:`WRITE_ERRNOS` names (the path and
    why), else None (a bug: its traceback is kept)."""
    why = WRITE_ERRNOS.get(exc.errno or -1)
    if why is None:
        return None
    where = exc.filename if exc.filename is not None else "a file"
    return f"cannot write {where}: {why}"


def config_dir() -> Path:
    """configs/ of the checkout (editable install), or $CONTRAQ_CONFIG_DIR."""
    path = Path(os.environ.get("CONTRAQ_CONFIG_DIR", REPO_ROOT / "configs"))
    if not (path / "train.yaml").exists():
        raise SystemExit(
            f"contraq: no train.yaml in {path}; set CONTRAQ_CONFIG_DIR to the repo's configs/"
        )
    return path


def _offline_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class OverrideError(UserError):
    """A command-line override Hydra cannot apply (unknown key, bad syntax, unknown option)."""


def _hydra(job: Callable[..., object], overrides: list[str], prog: str, config: str) -> int:
    """Run `job(cfg)` under hydra.main (config ``configs/<config>.yaml``) so users get
    Hydra's whole command line: run folder, multirun, job logging."""
    import hydra

    from contraq.config.checks import check_name_override, one_line_errors
    from contraq.config.schema import check_added_keys, register_schemas

    check_added_keys(overrides, config_dir())  # `+trian.lr=0.5`: refused, not trained at 2e-4
    check_name_override(overrides)  # Hydra creates outputs/<name> before the job runs
    register_schemas()
    _offline_env()
    wrapped = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config)(job)
    rank = int(os.environ.get("RANK", "0") or 0)
    if rank > 0:
        # Under torchrun every rank runs this: only rank 0 writes Hydra's files and job log.
        overrides = [*overrides, "hydra.output_subdir=null", f"hydra.job.name=rank{rank}"]
    else:  # .hydra/ is written once the config is accepted (contraq.run.hydra_record)
        from contraq.run import hydra_record

        overrides = hydra_record.defer(overrides)
    argv = sys.argv
    sys.argv = [prog, *overrides]
    try:
        with one_line_errors():  # a wrong type or unknown key: one line naming it
            wrapped()
    finally:
        sys.argv = argv
    return 0


def _no_advert(record: logging.LogRecord) -> bool:
    """False for Lightning's suggestion to install its cloud logger (LitLogger)."""
    return "litlogger" not in str(record.msg).lower()


def quiet_lightning() -> None:
    """Each Lightning line once and only the lines that concern the run (before a Trainer).

    ``import lightning`` gives the "lightning" logger a console handler of its own while its
    records also reach the root logger's (Hydra's job log, or :func:`main`'s basicConfig): every
    line came twice. The root's handler stays. Also gone: the LitLogger advertisement, and
    torch's deprecation of ``LeafSpec``, which Lightning's ``_pytree`` (not our code) constructs.
    """
    import lightning  # noqa: F401  (its import adds the handler removed here)

    if logging.getLogger().hasHandlers():
        own = logging.getLogger("lightning")
        for handler in list(own.handlers):
            own.removeHandler(handler)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _no_advert not in rank_zero.filters:
        rank_zero.addFilter(_no_advert)
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )


def _guarded(cmd: str, job: Callable[[Any], object]) -> Callable[[Any], None]:
    """Hydra prints a traceback for any exception of the job: user errors and a stop by
    signal leave it as SystemExit with one line instead."""

    def run(cfg: Any) -> None:
        from contraq.errors import TrainingInterrupted

        try:
            job(cfg)
        except TrainingInterrupted as e:
            print(f"contraq {cmd}: {e}", file=sys.stderr)
            raise SystemExit(128 + e.signum) from None
        except UserError as e:
            raise SystemExit(report_user_error(cmd, e)) from None

    return run


def _train(cfg: Any) -> None:
    from contraq.config.checks import validate

    validate(cfg)  # before the heavy imports: a bad value is reported at once
    quiet_lightning()
    from contraq.training.train import run_training

    run_training(cfg)


def _demo(cfg: Any) -> None:
    """Train as configured, evaluate on the held-out test facts (``cfg.evaluation``), write
    the report; prints where everything is."""
    from contraq.config.checks import validate
    from contraq.config.settings import typed
    from contraq.evaluation.evaluate import EvalConfig, evaluate_run
    from contraq.evaluation.report import eval_table, write_report
    from contraq.training.train import run_training

    validate(cfg)  # both before training: a bad value is reported at once
    ecfg = typed(EvalConfig, cfg.evaluation, prefix="evaluation.")
    quiet_lightning()
    run_dir = Path(run_training(cfg))  # the run's config.yaml leaves `evaluation` out
    result = evaluate_run(run_dir, ecfg, run_dir / "eval")
    report = write_report(run_dir)
    print(eval_table(result["summary"]))
    print(
        f"\nrun folder:  {run_dir}\n"
        f"adapter:     {run_dir / 'adapter'}\n"
        f"metrics:     {run_dir / 'logs' / 'metrics.csv'}\n"
        f"eval:        {run_dir / 'eval' / 'eval.md'}\n"
        f"report:      {report}\n"
        f"sample more: contraq sample checkpoint={run_dir} facts=FACTS.jsonl n=32 out=q.jsonl"
    )


def compose(name: str, overrides: list[str], schemas: bool = True) -> Any:
    """``configs/<name>.yaml`` with the overrides applied (Hydra's compose API: no run folder,
    no logging setup). Raises :class:`OverrideError` for an override Hydra refuses.
    ``schemas=False``: without the run schemas (their import loads torch)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    if schemas:
        from contraq.config.schema import register_schemas

        register_schemas()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return hydra_compose(config_name=name, overrides=overrides)
    except HydraException as e:
        lines = [x.strip() for x in str(e).splitlines() if not x.startswith("See https")]
        raise OverrideError(" ".join(lines[:2])) from None


# What `contraq CMD --help` prints: the command's config files (settings, defaults, comments).
HELP_FILES = {
    "sample": ("sample.yaml",),
    "eval": ("eval.yaml", "evaluation/default.yaml"),
    "report": ("report.yaml",),
    "smooth": ("smooth.yaml",),
    "rescore": ("rescore.yaml",),
    "compare": ("compare.yaml",),
    "nli-train": ("nli-train.yaml", "nli/minilm-zsre.yaml"),
    "edit": ("edit.yaml",),
    "probe": ("probe.yaml",),
}


def _command(cmd: str, rest: list[str]) -> int:
    """`contraq sample|eval|report|smooth|rescore|compare|edit|probe|nli-train`: compose ``configs/<cmd>.yaml``
    and run the command."""
    if any(a in ("-h", "--help") for a in rest):
        print("\n".join((config_dir() / f).read_text() for f in HELP_FILES[cmd]))
        return 0
    cfg = compose(cmd, rest, schemas=cmd not in ("nli-train", "compare"))
    refuse_unread_keys(cmd, cfg, rest)
    _offline_env()
    if cmd == "nli-train":
        _nli_train(cfg)
    elif cmd == "sample":
        from contraq.sample import run_sample

        run_sample(cfg)
    elif cmd == "eval":
        from contraq.evaluation.evaluate import run_eval

        run_eval(cfg)
    elif cmd == "smooth":
        from contraq.training.smooth import run_smooth

        quiet_lightning()
        run_smooth(cfg)
    elif cmd in ("edit", "probe"):
        from contraq.editing.commands import run_edit, run_probe

        (run_edit if cmd == "edit" else run_probe)(cfg)
    elif cmd == "rescore":
        from contraq.evaluation.rescore import run_rescore

        run_rescore(cfg)
    elif cmd == "compare":
        from contraq.evaluation.compare import run_compare

        run_compare(cfg)
    else:
        from contraq.evaluation.report import run_report

        run_report(cfg)
    return 0


def refuse_unread_keys(cmd: str, cfg: Any, overrides: list[str]) -> None:
    """Refuse a key that `contraq sample|eval|compare` would not read: Hydra adds any ``+key=value``
    and the command's typed settings skip it, so ``+temprature=0.5`` sampled at T=1 (the
    message is train's for its `+key`, :func:`contraq.config.schema.check_added_keys`).

    Raises:
        ConfigError: naming the first such key, before anything is loaded or written.
    """
    from dataclasses import fields

    from contraq.config.checks import ConfigError

    if cmd == "sample":
        from contraq.sample import SampleConfig

        schemas: tuple[type, ...] = (SampleConfig,)
    elif cmd == "eval":
        from contraq.evaluation.evaluate import EvalConfig, EvalTarget

        schemas = (EvalTarget, EvalConfig)
    elif cmd == "compare":
        from contraq.evaluation.compare import CompareConfig

        schemas = (CompareConfig,)
    else:
        return
    read = {f.name for schema in schemas for f in fields(schema)}
    for top in sorted(set(cfg) - read):
        given = (o.lstrip("+").split("=", 1)[0] for o in overrides)  # +evaluation.n=2
        key = next((k for k in given if k.split(".")[0] == top), str(top))
        raise ConfigError(
            key,
            f"no part of contraq reads this key (a typo?); `contraq {cmd} --help` lists every "
            "setting",
        )


def _nli_train(cfg: Any) -> None:
    """The judge's recipe typed (a bad value names its ``nli.train.`` key), then trained once."""
    from dataclasses import fields

    from contraq.config.checks import ConfigError, boolean
    from contraq.config.settings import typed
    from contraq.judge.cli import nli_train
    from contraq.judge.config import NLITrainConfig

    if cfg.nli.get("train") is None:
        raise OverrideError(f"nli={cfg.nli.name} has no train: recipe (nothing to train)")
    unknown = sorted(set(cfg.nli.train) - {f.name for f in fields(NLITrainConfig)})
    if unknown:  # typed() would skip them: a +key=value added by hand is a typo
        raise ConfigError(f"nli.train.{unknown[0]}", "unknown key of the judge's recipe")
    tcfg = typed(NLITrainConfig, cfg.nli.train, prefix="nli.train.")
    if boolean(cfg.force):  # never train on a misspelt no
        raise ConfigError("force", f"must be true or false, got {cfg.force!r}")
    nli_train(tcfg, force=cfg.force)


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
    try:
        return _dispatch(argv[0], argv[1:])
    except UserError as e:
        return report_user_error(argv[0], e)
    except OSError as e:
        line = os_error_line(e)
        if line is None or debug_enabled():
            raise
        print(f"contraq {argv[0]}: {line}", file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        if debug_enabled():
            raise
        print(f"contraq {argv[0]}: interrupted", file=sys.stderr)
        return 130


def _dispatch(cmd: str, rest: list[str]) -> int:
    from contraq.config.checks import refuse_secret_overrides

    refuse_secret_overrides(rest)  # before Hydra writes the command line anywhere
    if cmd == "train":
        return _hydra(_guarded(cmd, _train), rest, "contraq train", "train")
    if cmd == "demo":
        return _hydra(_guarded(cmd, _demo), rest, "contraq demo", "demo")
    if cmd == "redis":
        from contraq.redis_server import cli_main as redis_main

        return redis_main(rest)
    if cmd in HELP_FILES:
        return _command(cmd, rest)
    print(f"contraq: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
