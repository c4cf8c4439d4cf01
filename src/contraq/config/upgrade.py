"""A run folder's saved ``config.yaml`` brought up to today's layout: keys that moved, blocks
that were retired and ``_target_`` paths into modules that moved, so that run folders written by
older versions still load, evaluate and resume (:func:`upgrade_saved_config`)."""

from __future__ import annotations

import copy
from typing import Any

# Keys that moved since a run folder's config.yaml may have been written: old -> new.
MOVED_KEYS = {
    "reward.reward_temp_start": "train.reward_temp.start",
    "reward.reward_temp_end": "train.reward_temp.end",
    "reward.reward_temp_horizon": "train.reward_temp.horizon",
    "buffer.use_buffer_prob": "train.replay.prob",
    "buffer.prioritized": "train.replay.prioritized",
    "callbacks.checkpoint_every_n_steps": "callbacks.model_checkpoint.every_n_train_steps",
    "callbacks.keep_step_checkpoints": "callbacks.model_checkpoint.save_top_k",
    "callbacks.samples_every_n_steps": "callbacks.sample_writer.every_n_steps",
}
# callbacks.progress_bar=rich|tqdm|none became a node (configs/callbacks/progress_bar/).
PROGRESS_BARS = {
    "rich": {"_target_": "lightning.pytorch.callbacks.RichProgressBar", "leave": True},
    "tqdm": {"_target_": "lightning.pytorch.callbacks.TQDMProgressBar", "leave": True},
}
DROPPED_KEYS = ("demo",)  # the demo's eval settings now live in configs/evaluation/


def upgrade_saved_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A run folder's saved config (plain dict) in today's key layout: moved keys are moved
    (:data:`MOVED_KEYS`), retired blocks dropped, ``_target_`` paths into moved modules renamed
    (:data:`MOVED_MODULES`), so runs written by older versions still load, evaluate and resume.
    Returns a new dict; ``cfg`` is not modified."""
    out = copy.deepcopy(cfg)
    for old, new in MOVED_KEYS.items():
        group, key = old.split(".")
        if isinstance(out.get(group), dict) and key in out[group]:
            value = out[group].pop(key)
            node = out
            *parents, leaf = new.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node.setdefault(leaf, value)
    callbacks = out.get("callbacks")
    if isinstance(callbacks, dict) and isinstance(callbacks.get("progress_bar"), str):
        bar = PROGRESS_BARS.get(callbacks.pop("progress_bar"))
        if bar is not None:
            callbacks["progress_bar"] = dict(bar)
    for key in DROPPED_KEYS:
        out.pop(key, None)
    return _renamed_targets(out)


# Modules that moved into packages (issue 27): a saved ``_target_`` may name the old path
# (``contraq.callbacks.StepTimer``, ``contraq.runs.AppendingCSVLogger``, a user's callback).
MOVED_MODULES = {
    "contraq.models": "contraq.lm.models",
    "contraq.lm_forward": "contraq.lm.forward",
    "contraq.sampler": "contraq.lm.sampling",
    "contraq.stochastic_beam": "contraq.lm.stochastic_beam",
    "contraq.tokens": "contraq.lm.tokens",
    "contraq.embedding": "contraq.lm.embedding",
    "contraq.module": "contraq.training.module",
    "contraq.losses": "contraq.training.losses",
    "contraq.distributed": "contraq.training.distributed",
    "contraq.launch": "contraq.training.launch",
    "contraq.callbacks": "contraq.training.callbacks",
    "contraq.train": "contraq.training.train",
    "contraq.smooth": "contraq.training.smooth",
    "contraq.eval_methods": "contraq.evaluation.methods",
    "contraq.evaluate": "contraq.evaluation.evaluate",
    "contraq.baselines": "contraq.evaluation.baselines",
    "contraq.questions": "contraq.evaluation.questions",
    "contraq.metrics": "contraq.evaluation.metrics",
    "contraq.stats": "contraq.evaluation.stats",
    "contraq.reuse": "contraq.evaluation.reuse",
    "contraq.plots": "contraq.evaluation.plots",
    "contraq.yields": "contraq.evaluation.yields",
    "contraq.question_file": "contraq.evaluation.question_file",
    "contraq.report": "contraq.evaluation.report",
    "contraq.rescore": "contraq.evaluation.rescore",
    "contraq.parts": "contraq.run.parts",
    "contraq.runload": "contraq.run.load",
    "contraq.runs": "contraq.run.folder",
    "contraq.hydra_record": "contraq.run.hydra_record",
    "contraq.conf": "contraq.config.schema",
    "contraq.config_check": "contraq.config.checks",
    "contraq.settings": "contraq.config.settings",
}


def moved_target(target: str) -> str:
    """``target`` with its module renamed when that module moved (:data:`MOVED_MODULES`)."""
    module, _, name = target.rpartition(".")
    return f"{MOVED_MODULES[module]}.{name}" if module in MOVED_MODULES else target


def _renamed_targets(node: Any) -> Any:
    """``node`` with every ``_target_`` string under it passed through :func:`moved_target`."""
    if isinstance(node, dict):
        return {
            k: moved_target(v) if k == "_target_" and isinstance(v, str) else _renamed_targets(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_renamed_targets(v) for v in node]
    return node
