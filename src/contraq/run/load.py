"""A trained run, loaded back: its folder, config, policy (with the trained LoRA) and facts.

What `contraq sample` and `contraq eval` point ``checkpoint=`` at: the run folder, its
``adapter/`` directory or a Lightning ``.ckpt`` inside it (see :mod:`contraq.training.train` for the
folder's layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from contraq.config.upgrade import upgrade_saved_config
from contraq.data import EditFact
from contraq.errors import UserError
from contraq.run.parts import Parts, run_split


class RunError(UserError, ValueError):
    """A run folder, checkpoint or facts file cannot be used (the message names the path)."""


@dataclass
class RunRef:
    """What ``checkpoint=`` points at: the run folder and, for a ``.ckpt``, that file."""

    run_dir: Path
    ckpt: Path | None = None

    @property
    def adapter_dir(self) -> Path:
        return self.run_dir / "adapter"


def resolve_run(path: str | Path) -> RunRef:
    """The run folder of ``path``: the run folder itself, its ``adapter/`` directory, or a
    ``.ckpt`` inside it (``checkpoints/last.ckpt``). The run folder is the nearest folder
    (``path`` or up to two parents) that holds ``config.yaml``.

    Raises:
        RunError: nothing there, or no ``config.yaml`` found.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise RunError(f"{p}: no such run folder, adapter directory or checkpoint")
    ckpt = p if p.is_file() else None
    if ckpt is not None and ckpt.suffix != ".ckpt":
        raise RunError(f"{p}: expected a run folder, its adapter/ directory or a .ckpt file")
    start = p.parent if ckpt else p
    for cand in (start, start.parent, start.parent.parent):
        if (cand / "config.yaml").is_file():
            return RunRef(cand.resolve(), ckpt.resolve() if ckpt else None)
    raise RunError(f"{p}: no config.yaml here or in its parents (not a contraq run folder?)")


def load_run_config(run_dir: Path) -> DictConfig:
    """The resolved config that training wrote (``config.yaml``)."""
    path = run_dir / "config.yaml"
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # omegaconf/yaml raise many types; name the file
        raise RunError(f"{path}: cannot read the run config ({exc})") from exc
    if not isinstance(cfg, DictConfig):
        raise RunError(f"{path}: expected a mapping, not a list")
    plain = OmegaConf.to_container(cfg, resolve=False)
    return OmegaConf.create(upgrade_saved_config(plain))  # type: ignore[arg-type]


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` = CUDA when available, else CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise RunError(f"device={name}: not a device (auto, cpu, cuda, cuda:1...)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"device={name}: CUDA is not available on this machine")
    return dev


def _load_lora_from_ckpt(policy: torch.nn.Module, ckpt: Path) -> None:
    """Copy the LoRA weights stored in a Lightning checkpoint into ``policy``.

    ``GFlowNetModule.on_save_checkpoint`` keeps only trainable tensors, under ``policy.*``.
    """
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad or hostile file
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise RunError(
            f"{ckpt}: cannot read the checkpoint safely (weights_only=True; "
            f"{type(exc).__name__}: {first}); pass the run folder to use its adapter/ instead"
        ) from None
    sd = state.get("state_dict") if isinstance(state, dict) else None
    if not isinstance(sd, dict):
        raise RunError(f"{ckpt}: no state_dict in the checkpoint")
    lora = {k[len("policy.") :]: v for k, v in sd.items() if k.startswith("policy.")}
    own = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    if not lora or set(lora) != set(own):
        missing, extra = sorted(set(own) - set(lora))[:3], sorted(set(lora) - set(own))[:3]
        raise RunError(
            f"{ckpt}: LoRA weights do not match the run's config (missing e.g. {missing}, "
            f"unexpected e.g. {extra})"
        )
    shapes = [(n, tuple(v.shape), tuple(own[n].shape)) for n, v in lora.items()]
    wrong = [s for s in shapes if s[1] != s[2]]
    if wrong:  # e.g. a checkpoint of a run with another model.lora_r
        name, got, want = wrong[0]
        raise RunError(
            f"{ckpt}: LoRA weights do not match the run's config ({name} is {list(got)}, the "
            f"run's model.lora_r makes {list(want)}); pass the checkpoint of this run"
        )
    policy.load_state_dict(lora, strict=False)


def load_parts(
    ref: RunRef,
    plain: bool = False,
    device: torch.device | None = None,
    judge: str | None = None,
    reward_batch: int | None = None,
) -> Parts:
    """The :class:`contraq.run.parts.Parts` of a run: its base LM with the trained adapter (from
    the ``.ckpt`` when one was named, else ``adapter/``).

    ``plain``: a fresh, untrained LoRA instead (no adapter files needed). The reward needs a
    peft model (its base LM is the policy with adapters disabled), so callers sample a plain
    policy with ``base=True``. ``judge``: an NLI checkpoint folder (or hub id) that replaces the
    run's judge (``nli.path``), e.g. to score every method with a judge training never saw.
    ``reward_batch``: replaces the run's ``reward.batch_size`` (questions per answering call):
    a greedy decode step of 32 rows costs about 1.5x one of 16 (``bench/bench_decode.py``),
    so an eval answers more at a time than a training step has.
    """
    cfg = load_run_config(ref.run_dir)
    if judge is not None:
        cfg.nli.path = str(judge)
    if reward_batch is not None:
        cfg.reward.batch_size = int(reward_batch)
    if plain:
        parts = Parts(cfg, with_lora=True)
    elif ref.ckpt is not None:
        parts = Parts(cfg, with_lora=True)
        _load_lora_from_ckpt(parts.policy, ref.ckpt)
    else:
        if not (ref.adapter_dir / "adapter_config.json").is_file():
            raise RunError(
                f"{ref.adapter_dir}: no adapter_config.json (training saves the adapter every "
                "callbacks.model_checkpoint.every_n_train_steps steps; pass a .ckpt or plain=true)"
            )
        parts = Parts(cfg, adapter_dir=ref.adapter_dir)
    parts.policy.to(device or pick_device()).eval()
    return parts


SPLITS = {"test": "held-out test split", "val": "validation split"}


def heldout_facts(cfg: Any, split: str = "test") -> list[EditFact]:
    """Facts that training never trained on, from the split it made
    (:func:`contraq.run.parts.run_split`): ``test`` (never trained or validated on) or ``val``
    (training samples the first ``eval.n_facts`` of them for its ``val/`` metrics only)."""
    if split not in SPLITS:
        raise RunError(f"split={split!r}: expected one of {sorted(SPLITS)}")
    facts = getattr(run_split(cfg), split)
    if not facts:
        raise RunError(
            f"the {SPLITS[split]} of {cfg.data.path} is empty "
            f"(data.{split}_fraction={getattr(cfg.data, f'{split}_fraction')}); pass facts=FILE"
        )
    return facts
