"""Using a trained sampler: `contraq sample`, `contraq eval`, `contraq demo`.

The metrics live in :mod:`contraq.metrics`. Commands: :func:`sample_main` (`contraq sample`), :func:`eval_main` (`contraq eval`),
:func:`report_main` (`contraq report`, see :mod:`contraq.report`) and :func:`run_demo`
(`contraq demo`: train, evaluate on the held-out test facts, write the report).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import random
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from contraq.errors import UserError
from contraq.metrics import Embedder, rate_flags, summarize
from contraq.stats import frontier_value, paired_bootstrap, per_fact_counts

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- run folders


class RunError(UserError, ValueError):
    """A run folder, checkpoint or facts file cannot be used (the message names the path)."""


@dataclass
class RunRef:
    """What ``--checkpoint`` points at: the run folder and, for a ``.ckpt``, that file."""

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


def load_run_config(run_dir: Path) -> Any:
    """The resolved config that training wrote (``config.yaml``)."""
    from omegaconf import OmegaConf

    path = run_dir / "config.yaml"
    try:
        return OmegaConf.load(path)
    except Exception as exc:  # omegaconf/yaml raise many types; name the file
        raise RunError(f"{path}: cannot read the run config ({exc})") from exc


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` = CUDA when available, else CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {name}: CUDA is not available on this machine")
    return dev


def _load_lora_from_ckpt(policy: torch.nn.Module, ckpt: Path) -> None:
    """Copy the LoRA weights stored in a Lightning checkpoint into ``policy``.

    ``GFlowNetModule.on_save_checkpoint`` keeps only trainable tensors, under ``policy.*``.
    """
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RunError(
            f"{ckpt}: cannot read the checkpoint safely (weights_only=True): {exc}; "
            "pass the run folder to use its adapter/ instead"
        ) from exc
    sd = state.get("state_dict") if isinstance(state, dict) else None
    if not isinstance(sd, dict):
        raise RunError(f"{ckpt}: no state_dict in the checkpoint")
    lora = {k[len("policy.") :]: v for k, v in sd.items() if k.startswith("policy.")}
    own = {n for n, p in policy.named_parameters() if p.requires_grad}
    if not lora or set(lora) != own:
        missing, extra = sorted(own - set(lora))[:3], sorted(set(lora) - own)[:3]
        raise RunError(
            f"{ckpt}: LoRA weights do not match the run's config (missing e.g. {missing}, "
            f"unexpected e.g. {extra})"
        )
    policy.load_state_dict(lora, strict=False)


def load_parts(
    ref: RunRef,
    plain: bool = False,
    device: torch.device | None = None,
    judge: str | None = None,
) -> Any:
    """``contraq.train.Parts`` of a run: its base LM with the trained adapter (from the
    ``.ckpt`` when one was named, else ``adapter/``).

    ``plain``: a fresh, untrained LoRA instead (no adapter files needed). The reward needs a
    peft model (its base LM is the policy with adapters disabled), so callers sample a plain
    policy with ``base=True``. ``judge``: an NLI checkpoint folder (or hub id) that replaces the
    run's judge (``nli.path``), e.g. to score every method with a judge training never saw.
    """
    from contraq.train import Parts

    cfg = load_run_config(ref.run_dir)
    if judge is not None:
        cfg.nli.path = str(judge)
    if plain:
        parts = Parts(cfg, with_lora=True)
    elif ref.ckpt is not None:
        parts = Parts(cfg, with_lora=True)
        _load_lora_from_ckpt(parts.policy, ref.ckpt)
    else:
        if not (ref.adapter_dir / "adapter_config.json").is_file():
            raise RunError(
                f"{ref.adapter_dir}: no adapter_config.json (training saves the adapter every "
                "callbacks.checkpoint_every_n_steps steps; pass a .ckpt or --plain)"
            )
        parts = Parts(cfg, adapter_dir=ref.adapter_dir)
    parts.policy.to(device or pick_device()).eval()
    return parts


def heldout_facts(cfg: Any) -> list[Any]:
    """The run's held-out test facts (``cfg.data``: path, val_fraction, test_fraction,
    split_seed), the split training never saw."""
    from contraq.data import load_facts, resolve_path, split_facts

    d = cfg.data
    facts = load_facts(resolve_path(d.path))
    split = split_facts(
        facts,
        val_fraction=float(d.val_fraction),
        test_fraction=float(d.test_fraction),
        seed=int(d.split_seed),
    )
    if not split.test:
        raise RunError(
            f"the held-out test split of {d.path} is empty (data.test_fraction={d.test_fraction}); "
            "pass --facts FILE"
        )
    return split.test


# --------------------------------------------------------------------------- generation


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Left-padded ``(ids [B, P], mask [B, P])`` of token-id lists."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), int(pad_id), dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long, device=device)
        mask[i, width - len(p) :] = 1
    return ids, mask


def select_rows(batch: Any, rows: Sequence[int]) -> Any:
    """The SampleBatch of the given rows."""
    from contraq.sampler import SampleBatch

    idx = torch.tensor(list(rows), dtype=torch.long, device=batch.actions.device)
    return SampleBatch(**{k: getattr(batch, k)[idx] for k in SampleBatch.__dataclass_fields__})


def decode_questions(tokenizer: Any, batch: Any) -> list[str]:
    """The questions of a SampleBatch as the reward decodes them (specials skipped, stripped)."""
    rows = [batch.actions[b, : int(batch.lengths[b])].tolist() for b in range(len(batch))]
    return [q.strip() for q in tokenizer.batch_decode(rows, skip_special_tokens=True)]


def dedup_key(question: str) -> str:
    """Questions equal up to case and whitespace count as duplicates."""
    return " ".join(question.split()).lower()


def reward_step(cfg: Any) -> int:
    """A step at which the reward is its final form (after any hybrid warm-up)."""
    reward = cfg.get("reward", {}) or {}
    return int(reward.get("hybrid_steps", 0) or 0)


def sample_policy(
    parts: Any,
    prompts: Sequence[Sequence[int]],
    temperature: float,
    generator: torch.Generator,
    base: bool = False,
) -> Any:
    """One question per prompt from the policy (``base``: with adapters disabled) at
    ``temperature``; log-probs in the batch are the untempered policy's."""
    from dataclasses import replace

    from contraq.models import base_model
    from contraq.sampler import sample

    device = next(parts.policy.parameters()).device
    ids, mask = left_pad(prompts, parts.sampler_cfg.pad_token_id, device)
    cfg = replace(parts.sampler_cfg, temperature=float(temperature))
    if base:
        with base_model(parts.policy) as lm:
            return sample(lm, ids, mask, cfg, generator=generator)
    return sample(parts.policy, ids, mask, cfg, generator=generator)


# Whether group beam search works here; set False after the first failure.
_DIVERSE_BEAM = {"ok": True}


class _StepBias:
    """HF logits processor applying the sampler's length masks and banned-token penalty, then
    renormalising: beam search then ranks by the same masked policy log P_F as the sampler."""

    def __init__(self, cfg: Any, prompt_width: int) -> None:
        self.cfg, self.width = cfg, prompt_width

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        from contraq.sampler import step_bias

        t = torch.tensor([input_ids.shape[1] - self.width], device=scores.device)
        bias = step_bias(self.cfg, t, scores.shape[-1])[0].to(scores.dtype)
        return torch.log_softmax(scores + bias, dim=-1)


def beam_questions(
    parts: Any,
    prompts: Sequence[Sequence[int]],
    n: int,
    groups: int = 1,
    diversity_penalty: float = 0.0,
) -> tuple[Any, bool]:
    """``n`` beams per prompt from the base LM (adapters disabled), cut at the termination
    token, as a SampleBatch of ``len(prompts) * n`` rows (row order: prompt-major).

    With ``groups > 1`` diverse (group) beam search is tried first; transformers 5 moved it to
    a hub repository (``trust_remote_code``), so offline it falls back to plain beam search.

    Returns:
        ``(batch, diverse)``: ``diverse`` says whether group beam search actually ran.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    from contraq.models import base_model
    from contraq.sampler import SampleBatch, score_actions

    scfg = parts.sampler_cfg
    device = next(parts.policy.parameters()).device
    ids, mask = left_pad(prompts, scfg.pad_token_id, device)
    width = ids.shape[1]
    common = {
        "max_new_tokens": scfg.max_len,
        "do_sample": False,
        "num_beams": n,
        "num_return_sequences": n,
        "eos_token_id": scfg.termination_token_id,
        "pad_token_id": scfg.pad_token_id,
    }
    processors = LogitsProcessorList([_StepBias(scfg, width)])
    diverse = False
    with base_model(parts.policy) as lm, torch.no_grad():
        out = None
        if groups > 1 and n % groups == 0 and _DIVERSE_BEAM["ok"]:
            try:
                gen = GenerationConfig(
                    **common, num_beam_groups=groups, diversity_penalty=diversity_penalty
                )
                out = lm.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    generation_config=gen,
                    logits_processor=processors,
                )
                diverse = True
            except (ValueError, OSError, ImportError) as exc:
                _DIVERSE_BEAM["ok"] = False  # do not retry (and warn) for every chunk
                log.warning(
                    "diverse beam search unavailable (%s); using plain beam search", str(exc)[:200]
                )
        if out is None:
            gen = GenerationConfig(**common)
            out = lm.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=gen,
                logits_processor=processors,
            )
        new = out[:, width:].tolist()
        term, pad = scfg.termination_token_id, scfg.pad_token_id
        seqs: list[list[int]] = []
        for row in new:
            cut = row[: row.index(term) + 1] if term in row else row[: scfg.max_len - 1] + [term]
            seqs.append(cut)
        width_a = max(len(s) for s in seqs)
        actions = torch.full((len(seqs), width_a), pad, dtype=torch.long, device=device)
        for i, s in enumerate(seqs):
            actions[i, : len(s)] = torch.tensor(s, dtype=torch.long, device=device)
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long, device=device)
        rep_ids, rep_mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
        log_pf, log_pterm = score_actions(lm, rep_ids, rep_mask, actions, scfg)
    batch = SampleBatch(
        prompt_ids=rep_ids,
        prompt_mask=rep_mask,
        actions=actions,
        lengths=lengths,
        log_pf=log_pf.detach(),
        log_pterm=log_pterm.detach(),
    )
    return batch, diverse


def score_records(
    parts: Any,
    facts: Sequence[Any],
    fact_ids: Sequence[int],
    batch: Any,
    method: str,
    step: int,
) -> list[dict[str, Any]]:
    """Score a batch with the run's reward: one record per question.

    Args:
        facts: all facts; ``fact_ids[b]`` is row b's fact.
    """
    rows = [facts[i] for i in fact_ids]
    with torch.no_grad():
        out = parts.reward().terminal(rows, batch, step=step)
    comps = {
        k: v.detach().float().cpu().tolist()
        for k, v in out.components.items()
        if torch.is_tensor(v) and v.dim() == 1
    }
    log_r = out.log_r.detach().float().cpu().tolist()
    n_actions = batch.lengths.cpu().tolist()
    records = []
    for b, i in enumerate(fact_ids):
        f = facts[i]
        rec: dict[str, Any] = {
            "method": method,
            "fact_index": int(i),
            "subject": f.subject,
            "edit_fact": f.edit_fact,
            "original_answer": f.original_answer,
            "question": out.questions[b],
            "answer": out.answers[b] if out.answers is not None else None,
            "log_r": log_r[b],
        }
        for k, v in comps.items():
            rec[k] = v[b]
        rec["n_actions"] = int(n_actions[b])
        rec.setdefault("length", float(n_actions[b]))
        records.append(rec)
    return records


def _progress() -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + max(1, size)]


def sample_unique(
    parts: Any,
    facts: Sequence[Any],
    n: int,
    temperature: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    max_rounds: int = 10,
    base: bool = False,
    method: str = "trained",
    progress: Any = None,
) -> list[list[dict[str, Any]]]:
    """``n`` distinct questions per fact (by :func:`dedup_key`), each scored by the reward.

    Rounds sample each unfinished fact's shortfall again (duplicates are dropped before the
    costly reward), up to ``max_rounds`` rounds; facts that still have fewer are returned
    with fewer (the caller reports it).

    Returns:
        per fact, its records in sampling order.
    """
    from contraq.train import build_prompts

    prompts = build_prompts(parts.cfg, facts, parts.tokenizer)
    device = next(parts.policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(int(seed))
    step = reward_step(parts.cfg)
    found: list[dict[str, dict[str, Any]]] = [{} for _ in facts]
    task = progress.add_task("sampling", total=n * len(facts)) if progress else None
    for _ in range(max_rounds):
        rows = [i for i in range(len(facts)) for _ in range(n - len(found[i]))]
        if not rows:
            break
        for chunk in _chunks(rows, batch_size):
            batch = sample_policy(
                parts, [prompts[i] for i in chunk], temperature, generator, base=base
            )
            keep, pending = [], [set() for _ in facts]
            for b, (i, q) in enumerate(
                zip(chunk, decode_questions(parts.tokenizer, batch), strict=True)
            ):
                key = dedup_key(q)
                if key and key not in found[i] and key not in pending[i]:
                    pending[i].add(key)
                    keep.append(b)
            if not keep:
                continue
            recs = score_records(
                parts, facts, [chunk[b] for b in keep], select_rows(batch, keep), method, step
            )
            for rec in recs:
                slot = found[rec["fact_index"]]
                if len(slot) < n:
                    slot[dedup_key(rec["question"])] = rec
                    if progress:
                        progress.advance(task)
    return [list(f.values()) for f in found]


# --------------------------------------------------------------------------- eval


@dataclass
class EvalConfig:
    """Settings of `contraq eval` (and of the `demo:` config section).

    Attributes:
        n: questions per fact and method.
        temperatures: tempered sampling of the untrained policy, one method per value.
        beam: include beam search on the base LM.
        beam_groups: > 1 tries diverse (group) beam search with that many groups.
        diversity_penalty: group beam search's penalty.
        batch_size: sequences per sampling call.
        seed: every sampling method starts from a generator seeded with it.
        max_facts: use the first ``max_facts`` facts (0 = all).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
    """

    # 32 facts x 8 questions x 4 methods: about 15 min on 2 CPU cores (intervals over facts
    # need >= 32 facts; 16 questions per fact did not fit the budget).
    n: int = 8
    temperatures: list[float] = field(default_factory=lambda: [0.5, 0.7])
    beam: bool = True
    beam_groups: int = 2
    diversity_penalty: float = 1.0
    batch_size: int = 32
    seed: int = 0
    max_facts: int = 32
    device: str = "auto"
    judge: str | None = None  # an NLI checkpoint replacing the run's judge for every method

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"eval n={self.n}: must be >= 1")
        if any(not t > 0 for t in self.temperatures):
            raise ValueError(f"eval temperatures={self.temperatures}: must be > 0")
        if self.batch_size < 1:
            raise ValueError(f"eval batch_size={self.batch_size}: must be >= 1")


def _method_samples(
    parts: Any,
    facts: Sequence[Any],
    prompts: Sequence[Sequence[int]],
    ecfg: EvalConfig,
    name: str,
    temperature: float,
    base: bool,
    progress: Any,
) -> list[dict[str, Any]]:
    device = next(parts.policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(ecfg.seed)  # same seed for every method
    rows = [i for i in range(len(facts)) for _ in range(ecfg.n)]
    task = progress.add_task(name, total=len(rows))
    records: list[dict[str, Any]] = []
    for chunk in _chunks(rows, ecfg.batch_size):
        batch = sample_policy(parts, [prompts[i] for i in chunk], temperature, generator, base=base)
        records += score_records(parts, facts, list(chunk), batch, name, reward_step(parts.cfg))
        progress.advance(task, len(chunk))
    return records


def _beam_samples(
    parts: Any,
    facts: Sequence[Any],
    prompts: Sequence[Sequence[int]],
    ecfg: EvalConfig,
    progress: Any,
) -> tuple[str, list[dict[str, Any]]]:
    per_call = max(1, ecfg.batch_size // ecfg.n)
    task = progress.add_task("beam", total=len(facts) * ecfg.n)
    records: list[dict[str, Any]] = []
    any_plain = False
    ids = list(range(len(facts)))
    batches = []
    for chunk in _chunks(ids, per_call):
        batch, diverse = beam_questions(
            parts, [prompts[i] for i in chunk], ecfg.n, ecfg.beam_groups, ecfg.diversity_penalty
        )
        any_plain |= not diverse
        batches.append((chunk, batch))
        progress.advance(task, len(chunk) * ecfg.n)
    name = "beam" if any_plain else "diverse_beam"
    for chunk, batch in batches:
        fact_ids = [i for i in chunk for _ in range(ecfg.n)]
        records += score_records(parts, facts, fact_ids, batch, name, reward_step(parts.cfg))
    return name, records


def evaluate_run(
    checkpoint: str | Path,
    out_dir: str | Path | None = None,
    facts_path: str | Path | None = None,
    ecfg: EvalConfig | None = None,
) -> dict[str, Any]:
    """Compare the trained policy with baselines on the same facts and question budget.

    Methods: ``trained`` (T=1), ``untrained`` (base LM, T=1), ``untrained_T<t>`` per
    temperature, ``beam``/``diverse_beam`` (base LM). Writes into ``out_dir`` (default
    ``RUN/eval``): ``eval.json`` (settings, summary per method, examples), ``eval.md``,
    ``questions.jsonl`` (every question with its reward parts) and two PNGs.

    Args:
        checkpoint: run folder, its ``adapter/`` or a ``.ckpt`` (see :func:`resolve_run`).
        facts_path: a facts file (full or minimal schema); ``None`` = the run's held-out
            test split.
        ecfg: settings; ``None`` = :class:`EvalConfig` defaults.

    Returns:
        the ``eval.json`` object.
    """
    from omegaconf import OmegaConf

    from contraq.data import load_facts
    from contraq.report import (
        eval_markdown,
        plot_rate_vs_diversity,
        plot_reward_distributions,
        plot_reward_vs_diversity,
    )
    from contraq.train import build_prompts

    ecfg = ecfg or EvalConfig()
    ref = resolve_run(checkpoint)
    out = Path(out_dir) if out_dir is not None else ref.run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(ecfg.device)
    started = time.time()
    parts = load_parts(ref, device=device, judge=ecfg.judge)
    if facts_path is not None:
        facts = load_facts(facts_path, minimal_ok=True, on_error="raise")
        facts_label = str(facts_path)
    else:
        facts = heldout_facts(parts.cfg)
        facts_label = f"{parts.cfg.data.path} (held-out test split)"
    if ecfg.max_facts > 0:
        facts = facts[: ecfg.max_facts]
    prompts = build_prompts(parts.cfg, facts, parts.tokenizer)

    methods: list[tuple[str, float, bool]] = [("trained", 1.0, False), ("untrained", 1.0, True)]
    methods += [(f"untrained_T{t:g}", float(t), True) for t in ecfg.temperatures]
    records: dict[str, list[dict[str, Any]]] = {}
    seconds: dict[str, float] = {}
    notes: list[str] = []
    with _progress() as progress:
        for name, temp, base in methods:
            t0 = time.time()
            records[name] = _method_samples(parts, facts, prompts, ecfg, name, temp, base, progress)
            seconds[name] = time.time() - t0
        if ecfg.beam:
            t0 = time.time()
            name, recs = _beam_samples(parts, facts, prompts, ecfg, progress)
            records[name] = recs
            seconds[name] = time.time() - t0
            if ecfg.beam_groups > 1 and name == "beam":
                notes.append(
                    "diverse beam search is not available in the installed transformers "
                    "(moved to a hub repository); plain beam search was used"
                )

    embedder = Embedder(device=device)
    summary = {}
    for name, recs in records.items():
        summary[name] = summarize(recs, embedder)
        summary[name]["seconds"] = seconds[name]
    pick = random.Random(ecfg.seed)
    examples = {
        name: sorted(pick.sample(recs, min(10, len(recs))), key=lambda r: r["fact_index"])
        for name, recs in records.items()
    }
    frontier_methods = ["untrained", *(f"untrained_T{t:g}" for t in ecfg.temperatures)]
    result: dict[str, Any] = {
        "settings": {
            "run": str(ref.run_dir),
            "checkpoint": str(ref.ckpt or ref.adapter_dir),
            "facts": facts_label,
            "n_facts": len(facts),
            "n": ecfg.n,
            "seed": ecfg.seed,
            "temperatures": list(ecfg.temperatures),
            "beam_groups": ecfg.beam_groups,
            "diversity_penalty": ecfg.diversity_penalty,
            "device": str(device),
            "reward": str(parts.cfg.reward.name),
            "judge": str(
                OmegaConf.select(parts.cfg, "nli.path")
                or OmegaConf.select(parts.cfg, "nli.train.name")
            ),
            "seconds": time.time() - started,
            "notes": notes,
        },
        "summary": summary,
        "comparisons": compare_to_trained(records),
        "frontier": frontier_summary(summary, frontier_methods),
        "examples": examples,
    }
    with (out / "questions.jsonl").open("w") as fh:
        for recs in records.values():
            for r in recs:
                fh.write(json.dumps(r) + "\n")
    plots = {
        "Reward per method": plot_reward_distributions(
            {k: [float(r["log_r"]) for r in v] for k, v in records.items()},
            out / "reward_distribution.png",
        ).name,
        "Reward vs diversity": plot_reward_vs_diversity(
            summary, out / "reward_vs_diversity.png"
        ).name,
        "Counted rate vs diversity": plot_rate_vs_diversity(
            summary, frontier_methods, out / "rate_vs_diversity.png"
        ).name,
    }
    (out / "eval.json").write_text(json.dumps(_json_safe(result), indent=2))
    (out / "eval.md").write_text(eval_markdown(result, plots))
    return result


def compare_to_trained(
    records: dict[str, list[dict[str, Any]]], key: str = "genuine_rate"
) -> dict[str, dict[str, float]]:
    """Paired bootstrap over facts of the trained policy's rate ``key`` minus each other
    method's (:func:`contraq.stats.paired_bootstrap`); empty without a ``trained`` method or
    where the rate is not measurable."""
    if "trained" not in records:
        return {}

    def counts(recs: list[dict[str, Any]]) -> dict[int, tuple[float, int]]:
        rows = [(int(r["fact_index"]), rate_flags(r, key)) for r in recs]
        rows = [(f, x) for f, x in rows if x is not None]
        return per_fact_counts([f for f, _ in rows], [x for _, x in rows])

    mine = counts(records["trained"])
    if not mine:
        return {}
    return {
        name: paired_bootstrap(mine, counts(recs))
        for name, recs in records.items()
        if name != "trained"
    }


def frontier_summary(
    summary: dict[str, dict[str, float]], methods: Sequence[str], key: str = "genuine_rate"
) -> dict[str, float] | None:
    """The untrained policy's rate-vs-diversity frontier (``methods``: it at several
    temperatures) read at the trained policy's diversity (:func:`contraq.stats.frontier_value`)."""
    if "trained" not in summary:
        return None
    points = [(summary[m]["diversity"], summary[m][key]) for m in methods if m in summary]
    x = summary["trained"]["diversity"]
    return {
        "diversity": x,
        "trained_rate": summary["trained"][key],
        "frontier_rate": frontier_value(points, x),
    }


def _json_safe(obj: Any) -> Any:
    """NaN/inf become None: strict JSON readers reject them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- commands

SAMPLE_FIELDS = (
    "fact_index",
    "subject",
    "edit_fact",
    "original_answer",
    "question",
    "answer",
    "log_r",
    "log_c",
    "log_pq",
    "length",
    "n_actions",
)


def _setup_env() -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def write_questions(records: Sequence[dict[str, Any]], path: Path, as_csv: bool) -> None:
    """JSON Lines (every field) or CSV (:data:`SAMPLE_FIELDS` then any other field)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not as_csv:
        with path.open("w") as fh:
            for r in records:
                fh.write(json.dumps(r) + "\n")
        return
    extra = sorted({k for r in records for k in r} - set(SAMPLE_FIELDS))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*SAMPLE_FIELDS, *extra], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def sample_main(argv: Sequence[str]) -> int:
    """``contraq sample``: questions for new edit facts from a trained run."""
    from contraq.data import DEFAULT_MAX_CHARS, DataError, load_facts

    ap = argparse.ArgumentParser(
        prog="contraq sample",
        description="Sample distinct questions per edit fact from a trained run, each with its "
        "answer, log C, log P_Q and log R.",
    )
    ap.add_argument("--checkpoint", required=True, help="run folder, its adapter/ or a .ckpt in it")
    ap.add_argument(
        "--facts",
        required=True,
        help="JSONL of facts: the full schema or {subject, edit_fact[, original_answer]}",
    )
    ap.add_argument("--n", type=int, default=32, help="distinct questions per fact (default 32)")
    ap.add_argument("--out", required=True, help="output file (.jsonl, or .csv with --csv)")
    ap.add_argument("--csv", action="store_true", help="write CSV instead of JSON Lines")
    ap.add_argument("--plain", action="store_true", help="the base LM without the trained adapter")
    ap.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature (default 1)"
    )
    ap.add_argument("--batch-size", type=int, default=32, help="sequences per sampling call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--max-rounds", type=int, default=10, help="resampling rounds to fill n distinct"
    )
    ap.add_argument(
        "--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1..."
    )
    args = ap.parse_args(list(argv))
    if args.n < 1 or args.batch_size < 1 or args.max_rounds < 1 or not args.temperature > 0:
        ap.error("--n, --batch-size and --max-rounds must be >= 1 and --temperature > 0")
    _setup_env()
    try:
        ref = resolve_run(args.checkpoint)
        data_cfg = load_run_config(ref.run_dir).get("data") or {}
        max_chars = int(data_cfg.get("max_fact_chars", DEFAULT_MAX_CHARS))
        facts = load_facts(args.facts, minimal_ok=True, on_error="raise", max_chars=max_chars)
        parts = load_parts(ref, plain=args.plain, device=pick_device(args.device))
    except (DataError, RunError) as exc:
        print(f"contraq sample: {exc}", file=sys.stderr)
        return 2
    with _progress() as progress:
        per_fact = sample_unique(
            parts,
            facts,
            args.n,
            temperature=args.temperature,
            batch_size=args.batch_size,
            seed=args.seed,
            max_rounds=args.max_rounds,
            method="plain" if args.plain else "trained",
            base=args.plain,
            progress=progress,
        )
    short = [(f, len(r)) for f, r in zip(facts, per_fact, strict=True) if len(r) < args.n]
    for f, k in short:
        print(
            f"contraq sample: {f.where} ({f.subject}): only {k} distinct questions of {args.n} "
            f"after {args.max_rounds} rounds",
            file=sys.stderr,
        )
    records = [r for recs in per_fact for r in recs]
    out = Path(args.out)
    write_questions(records, out, args.csv)
    print(f"wrote {len(records)} questions for {len(facts)} facts to {out}")
    return 0


def eval_main(argv: Sequence[str]) -> int:
    """``contraq eval``: trained policy vs baselines on held-out facts."""
    from contraq.data import DataError

    ap = argparse.ArgumentParser(
        prog="contraq eval",
        description="Trained policy vs the untrained policy, tempered sampling and beam search, "
        "on the same facts and question budget.",
    )
    ap.add_argument("--checkpoint", required=True, help="run folder, its adapter/ or a .ckpt in it")
    ap.add_argument(
        "--facts", default=None, help="facts JSONL (default: the run's held-out test split)"
    )
    dflt = EvalConfig()
    ap.add_argument(
        "--n", type=int, default=dflt.n, help=f"questions per fact and method (default {dflt.n})"
    )
    ap.add_argument("--out", default=None, help="output folder (default RUN/eval)")
    ap.add_argument(
        "--max-facts",
        type=int,
        default=dflt.max_facts,
        help=f"use the first N facts (0: all; default {dflt.max_facts})",
    )
    ap.add_argument(
        "--temperatures",
        default=",".join(f"{t:g}" for t in dflt.temperatures),
        help="tempered baselines, comma-separated ('' for none)",
    )
    ap.add_argument("--no-beam", action="store_true", help="skip the beam search baseline")
    ap.add_argument("--beam-groups", type=int, default=2, help=">1: diverse beam search groups")
    ap.add_argument("--diversity-penalty", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--judge",
        default=None,
        help="NLI checkpoint folder that scores every method instead of the run's judge",
    )
    args = ap.parse_args(list(argv))
    try:
        temps = [float(t) for t in args.temperatures.split(",") if t.strip()]
        ecfg = EvalConfig(
            n=args.n,
            temperatures=temps,
            beam=not args.no_beam,
            beam_groups=args.beam_groups,
            diversity_penalty=args.diversity_penalty,
            batch_size=args.batch_size,
            seed=args.seed,
            max_facts=args.max_facts,
            device=args.device,
            judge=args.judge,
        )
    except ValueError as exc:
        ap.error(str(exc))
    _setup_env()
    try:
        result = evaluate_run(args.checkpoint, args.out, args.facts, ecfg)
    except (DataError, RunError) as exc:
        print(f"contraq eval: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(result["settings"]["run"]) / "eval"
    from contraq.report import eval_table

    print(eval_table(result["summary"]))
    print(f"\nwrote {out / 'eval.md'}, {out / 'eval.json'}, {out / 'questions.jsonl'} and plots")
    return 0


def report_main(argv: Sequence[str]) -> int:
    """``contraq report RUN_DIR``: training curves and report.md."""
    from contraq.report import ReportError, write_report

    ap = argparse.ArgumentParser(
        prog="contraq report", description="Curves and a Markdown report of a run."
    )
    ap.add_argument("run_dir", help="the run folder (outputs/<name>)")
    ap.add_argument("--out", default=None, help="output folder (default RUN_DIR/report)")
    ap.add_argument(
        "--smoothing", type=float, default=None, help="EMA weight in [0, 1) (default: auto)"
    )
    args = ap.parse_args(list(argv))
    try:
        path = write_report(args.run_dir, args.out, args.smoothing)
    except (ReportError, ValueError) as exc:
        print(f"contraq report: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def demo_eval_config(cfg: Any) -> EvalConfig:
    """:class:`EvalConfig` from the ``demo:`` section (keys ``n_facts``, ``n_samples``,
    ``temperatures``, ``beam``, ``beam_groups``, ``diversity_penalty``, ``batch_size``,
    ``seed``, ``device``); missing keys take :class:`EvalConfig`'s defaults."""
    d = cfg.get("demo", None) or {}
    dflt = EvalConfig()
    return EvalConfig(
        n=int(d.get("n_samples", dflt.n)),
        temperatures=[float(t) for t in d.get("temperatures", dflt.temperatures)],
        beam=bool(d.get("beam", True)),
        beam_groups=int(d.get("beam_groups", 2)),
        diversity_penalty=float(d.get("diversity_penalty", 1.0)),
        batch_size=int(d.get("batch_size", 32)),
        seed=int(d.get("seed", cfg.get("seed", 0))),
        max_facts=int(d.get("n_facts", dflt.max_facts)),
        device=str(d.get("device", "auto")),
    )


def run_demo(cfg: Any) -> Path:
    """`contraq demo`: train as configured, evaluate on the held-out test facts, write the
    report; prints where everything is. Returns the run folder."""
    from contraq.report import eval_table, write_report
    from contraq.train import run_training

    run_dir = Path(run_training(cfg))
    ecfg = demo_eval_config(cfg)
    result = evaluate_run(run_dir, run_dir / "eval", None, ecfg)
    report = write_report(run_dir)
    print(eval_table(result["summary"]))
    print(
        f"\nrun folder:  {run_dir}\n"
        f"adapter:     {run_dir / 'adapter'}\n"
        f"metrics:     {run_dir / 'logs' / 'metrics.csv'}\n"
        f"eval:        {run_dir / 'eval' / 'eval.md'}\n"
        f"report:      {report}\n"
        f"sample more: contraq sample --checkpoint {run_dir} --facts FACTS.jsonl --n 32 --out q.jsonl"
    )
    return run_dir
