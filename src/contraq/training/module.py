"""The Lightning module: orchestrates sampling, reward, replay and the GFlowNet loss.

The maths lives elsewhere (`sampler`, `losses`, `reward`, `buffer`); this file only wires one
training step together:

1. take the step's plan from the DataLoader (``training.step``: the step index, its replay coin
   and its facts, all drawn from (seed, step), so a resumed run continues the same stream
   without any data-loader state); a replay step's facts are those with buffer entries;
2. get questions: replay from the buffer with probability ``train.replay.prob``, else sample from the
   policy (with probability ``pf_temp_prob`` at a random temperature: off-policy exploration);
3. score them with the reward (unscaled log R and its components) and add fresh ones to the buffer;
4. recompute log P_F in one teacher-forced pass (with grad) and take the TB or modified SubTB loss
   on log R / T_reward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from contraq.buffer import BufferEntry, ReplayBuffer, entry_problem, prompt_key
from contraq.config.schema import LossConfig, TrainConfig
from contraq.data import EditFact
from contraq.evaluation.metrics import contradiction_rate, distinct_n, grouped_diversity
from contraq.lm.float16_copy import float16_policy_copy, resolve_sample_weights
from contraq.lm.models import base_model
from contraq.lm.sampling import SampleBatch, SamplerConfig, sample, score_actions
from contraq.lm.stochastic_beam import sample_distinct
from contraq.lm.tokens import left_pad, right_pad
from contraq.reward.base import Reward, RewardOutput
from contraq.training import distributed
from contraq.training.losses import (
    LogZHead,
    modified_subtb_loss,
    trajectory_balance_loss,
    vargrad_loss,
)
from contraq.training.step import (
    StepBatch,
    StepPlan,
    pick_facts,
    plan_step,
    step_generator,
)

log = logging.getLogger(__name__)


class GFlowNetModule(L.LightningModule):
    """LoRA policy + log Z head trained as a GFlowNet over questions.

    Args:
        policy: a peft model (base LM + LoRA adapters; adapters disabled = the frozen base LM).
        tokenizer: its tokenizer (left padding).
        facts: the training edit facts.
        prompts: for each fact, its prompt token ids (no padding).
        reward: the reward (called under no_grad).
        buffer: the replay buffer (memory or Redis).
        sampler_cfg: lengths, termination token, banned tokens.
        cfg: the training loop's settings (the ``train`` group).
        loss_cfg: which GFlowNet loss (the ``loss`` group).
        seed: the run's seed (every random draw of a step derives from it).
        eval_facts / eval_prompts: validation facts sampled at T=1 by the evaluation hook.
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        tokenizer: Any,
        facts: Sequence[EditFact],
        prompts: Sequence[Sequence[int]],
        reward: Reward,
        buffer: ReplayBuffer,
        sampler_cfg: SamplerConfig,
        cfg: TrainConfig,
        loss_cfg: LossConfig,
        seed: int,
        eval_facts: Sequence[EditFact] = (),
        eval_prompts: Sequence[Sequence[int]] = (),
    ) -> None:
        super().__init__()
        if len(facts) != len(prompts) or not facts:
            raise ValueError("need one prompt per training fact and at least one fact")
        self.policy = policy
        self.tokenizer = tokenizer
        self.facts = list(facts)
        self.prompts = [list(p) for p in prompts]
        self.prompt_keys = [prompt_key(p) for p in self.prompts]
        self.reward = reward
        self.buffer = buffer
        self.sampler_cfg = sampler_cfg
        self.cfg = cfg
        self.loss_cfg = loss_cfg
        self.seed = seed
        self.eval_facts = list(eval_facts)
        self.eval_prompts = [list(p) for p in eval_prompts]
        hidden = (
            policy.config.hidden_size
            if hasattr(policy.config, "hidden_size")
            else policy.config.n_embd
        )
        self.log_z_head = LogZHead(hidden)
        # SubTB never uses log Z: frozen, so DDP needs no find_unused_parameters.
        self.log_z_head.requires_grad_(loss_cfg.name == "tb")
        # Only the LoRA adapters and the log Z head go into checkpoints (see on_save_checkpoint).
        self.strict_loading = False
        # Replayed entries must fit this model: ids inside its vocabulary, at most max_len
        # tokens, a bounded log R (a stored entry may come from another model or be tampered).
        vocab = min(len(tokenizer), policy.get_input_embeddings().num_embeddings)
        if hasattr(buffer, "set_entry_check"):
            buffer.set_entry_check(
                functools.partial(
                    entry_problem,
                    vocab_size=vocab,
                    max_len=sampler_cfg.max_len,
                    termination_id=int(sampler_cfg.termination_token_id),
                )
            )
        self.log_z_ready = False  # set by init_log_z on the first TB step (or a resume)
        self._sampling_copy: list[torch.nn.Module] = []  # a list: not a registered submodule

    # ------------------------------------------------------------------ helpers
    @property
    def pad_id(self) -> int:
        return int(self.sampler_cfg.pad_token_id)

    def _prompt_batch(self, fact_ids: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Left-padded prompts of the given training facts: (ids [B, P], mask [B, P])."""
        return left_pad([self.prompts[i] for i in fact_ids], self.pad_id, self.device)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The parameters that training changes (LoRA + log Z head)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def sampler_lm(self) -> torch.nn.Module:
        """What the sampler runs: the policy, or under ``train.sample_weights`` its float16
        copy sharing the LoRA modules (made once; :mod:`contraq.lm.float16_copy`)."""
        if resolve_sample_weights(self.cfg.sample_weights, self.policy) == "shared":
            return self.policy
        if not self._sampling_copy:
            self._sampling_copy.append(float16_policy_copy(self.policy))
        return self._sampling_copy[0]

    def current_reward_temperature(self) -> float:
        return self.cfg.reward_temp.at(self.global_step)

    # ------------------------------------------------------------------ data
    def plan(self, step: int) -> StepPlan:
        """The plan of ``step`` (:func:`~contraq.training.step.plan_step`) for this run's world."""
        world = self.trainer.world_size if self._trainer is not None else 1
        c = self.cfg
        return plan_step(self.seed, step, len(self.facts), c.facts_per_step, c.replay.prob, world)

    def first_step(self) -> int:
        """The step index the next plan starts at (after a resume: the checkpoint's)."""
        return self.global_step * self.trainer.accumulate_grad_batches

    def replay_facts(self, step: int, rank: int) -> list[int]:
        """A replay step's facts for ``rank``'s slice: drawn like the plan's (same generator),
        among the facts with buffer entries only (with hundreds of facts a random pick would
        almost never have any); [] when none has."""
        stored = set(self.buffer.keys())
        pool = [i for i in range(len(self.facts)) if self.prompt_keys[i] in stored]
        return pick_facts(self.seed, step, rank, pool, self.cfg.facts_per_step)

    @torch.no_grad()
    def sample_questions(
        self,
        fact_ids: Sequence[int],
        n_per_fact: int,
        temperature: float,
        generator: torch.Generator,
        base: bool = False,
    ) -> SampleBatch:
        """Sample n_per_fact questions for each fact (rows fact-major) from the policy, or
        from the base LM with ``base`` (eval mode, KV cache); ``train.draw=distinct`` draws
        each fact's questions without replacement."""
        cfg = dataclasses.replace(self.sampler_cfg, temperature=temperature)
        was_training = self.policy.training
        self.policy.eval()
        policy = self.sampler_lm()
        try:
            with base_model(policy) if base else contextlib.nullcontext(policy) as lm:
                if self.cfg.draw == "distinct":
                    ids, mask = self._prompt_batch(list(fact_ids))
                    out = sample_distinct(lm, ids, mask, cfg, n_per_fact, generator=generator)
                    if not bool(out.valid.all()):
                        raise RuntimeError("a fact has fewer possible questions than n_samples")
                    return out.batch
                rows = [i for i in fact_ids for _ in range(n_per_fact)]
                ids, mask = self._prompt_batch(rows)
                return sample(lm, ids, mask, cfg, generator=generator)
        finally:
            self.policy.train(was_training)

    def replay_questions(
        self, fact_ids: Sequence[int], n_per_fact: int, generator: torch.Generator
    ) -> tuple[SampleBatch, list[BufferEntry]] | None:
        """A batch of buffer entries for the facts, or None when a fact has no entry yet."""
        entries: list[BufferEntry] = []
        for i in fact_ids:
            got = self.buffer.sample(
                self.prompt_keys[i], n_per_fact, generator, prioritized=self.cfg.replay.prioritized
            )
            if not got:  # no entry yet, or none that this model can replay
                return None
            entries += got
        rows = [i for i in fact_ids for _ in range(n_per_fact)]
        ids, mask = self._prompt_batch(rows)
        actions = right_pad([e.token_ids for e in entries], self.pad_id, self.device)
        lengths = torch.tensor([len(e.token_ids) for e in entries], device=self.device)
        zeros = torch.zeros(actions.shape, dtype=torch.float32, device=self.device)
        batch = SampleBatch(
            prompt_ids=ids,
            prompt_mask=mask,
            actions=actions,
            lengths=lengths,
            log_pf=zeros,
            log_pterm=zeros,
        )
        return batch, entries

    def add_to_buffer(
        self, fact_rows: Sequence[int], batch: SampleBatch, out: RewardOutput
    ) -> None:
        by_key: dict[str, list[BufferEntry]] = {}
        for b, fact_id in enumerate(fact_rows):
            n = int(batch.lengths[b])
            entry = BufferEntry(
                token_ids=batch.actions[b, :n].tolist(),
                log_r=float(out.log_r[b]),
                components=out.row_components(b),
                text=out.questions[b],
            )
            by_key.setdefault(self.prompt_keys[fact_id], []).append(entry)
        for key, entries in by_key.items():
            self.buffer.add(key, entries)

    # ------------------------------------------------------------------ training
    def make_batch(self, plan: StepPlan, ranks: Sequence[int] | None = None) -> StepBatch:
        """Questions, unscaled log-rewards and components for one step (no grad).

        ``ranks``: whose slices to draw, concatenated (default: this rank's own). Rank 0 under
        ``train.sampling=rank0`` draws every rank's slice in one batch and scatters them
        (``contraq.training.distributed.share_batch``); ``slices[i]`` is the row range of slice
        i. The plan's replay coin depends on (seed, step) only, so all ranks agree on it.
        """
        c, step = self.cfg, plan.step
        ranks = [self.global_rank] if ranks is None else list(ranks)
        g = step_generator(self.seed, step, ranks[0], 1)
        per_slice = [list(plan.facts[r]) for r in ranks]
        replay = None
        if plan.replay:
            per_slice = [self.replay_facts(step, r) for r in ranks]
            if all(per_slice):
                replay = self.replay_questions(
                    [i for ids in per_slice for i in ids], c.n_samples, g
                )
            if replay is None:
                per_slice = [list(plan.facts[r]) for r in ranks]
        fact_ids = [i for ids in per_slice for i in ids]
        rows = [i for i in fact_ids for _ in range(c.n_samples)]
        ends = torch.tensor([len(ids) * c.n_samples for ids in per_slice]).cumsum(0).tolist()
        slices = tuple((a, b) for a, b in zip([0, *ends[:-1]], ends, strict=True))
        facts = tuple(self.facts[i] for i in rows)
        temp: float | None = None
        base: bool | None = None
        if replay is not None:
            batch, entries = replay
            log_r = torch.tensor([e.log_r for e in entries], device=self.device)
            out = None
        else:
            temp = 1.0
            if torch.rand((), generator=g).item() < c.pf_temp_prob:
                u = torch.rand((), generator=g).item()
                temp = c.pf_temp_low + u * (c.pf_temp_high - c.pf_temp_low)
            # Drawn only when asked, so runs without base exploration keep their streams.
            base = c.base_prob > 0 and torch.rand((), generator=g).item() < c.base_prob
            if base:
                temp = 1.0  # the prior itself: its counted questions are target samples
            batch = self.sample_questions(fact_ids, c.n_samples, temp, g, base=base)
            with torch.no_grad():
                out = self.reward.terminal(list(facts), batch, step=step)
            log_r = out.log_r.to(self.device)
            self.add_to_buffer(rows, batch, out)
        prefix_log_r = None
        if self.loss_cfg.name == "subtb":
            with torch.no_grad():
                prefix_log_r = self.reward.prefixes(
                    list(facts), batch, step=step, min_len=self.sampler_cfg.min_len
                )
        return StepBatch(
            step=step,
            batch=batch,
            facts=facts,
            fact_rows=tuple(rows),
            log_r=log_r,
            prefix_log_r=prefix_log_r,
            reward_out=out,
            slices=slices,
            replay=replay is not None,
            pf_temperature=temp,
            base_draw=base,
        )

    def compute_loss(self, sb: StepBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """GFlowNet loss on one step batch; log-rewards are tempered by the scheduled T_reward."""
        batch = sb.batch
        t_reward = self.current_reward_temperature()
        log_pf, log_pterm, prompt_hidden = score_actions(
            self.policy,
            batch.prompt_ids,
            batch.prompt_mask,
            batch.actions,
            self.sampler_cfg,
            return_prompt_hidden=True,
        )
        gen = batch.generated_text
        prompt_len = batch.prompt_ids.shape[1]
        term = self.sampler_cfg.termination_token_id
        extra: dict[str, Tensor] = {}
        if self.loss_cfg.name == "tb":
            log_z = self.log_z_head(prompt_hidden.float(), batch.prompt_mask)
            log_r = sb.log_r / t_reward
            if not self.log_z_ready:
                log_z = self.init_log_z(log_z, log_r, log_pf, batch.lengths)
            loss = trajectory_balance_loss(log_z, log_pf, log_pterm, log_r, gen, term, prompt_len)
            extra["log_z"] = log_z.detach().mean()
        elif self.loss_cfg.name == "subtb":
            loss = modified_subtb_loss(
                log_pf,
                sb.prefix_log_r / t_reward,
                log_pterm,
                gen,
                term,
                prompt_len,
                subtb_lambda=self.loss_cfg.subtb_lambda,
                min_len=self.sampler_cfg.min_len,
            )
        elif self.loss_cfg.name == "vargrad":
            groups = torch.as_tensor(sb.fact_rows, device=log_pf.device)
            log_r = sb.log_r / t_reward
            loss, log_z = vargrad_loss(log_pf, log_pterm, log_r, gen, term, prompt_len, groups)
            extra["log_z"] = log_z.mean()
        else:
            raise ValueError(
                f"loss.name must be 'tb', 'subtb' or 'vargrad', got {self.loss_cfg.name!r}"
            )
        mask = torch.arange(log_pf.shape[1], device=log_pf.device)[None] < batch.lengths[:, None]
        extra["log_pf"] = (log_pf * mask).sum(1).detach().mean()
        return loss, extra

    def training_step(self, plan: StepPlan, batch_idx: int) -> dict[str, Any]:
        """Draw the plan's rows (this rank's, or every rank's on rank 0 under ``rank0``
        sampling), hand each rank its own, and take the loss. The step batch goes back to the
        callbacks in ``outputs["step_batch"]``."""
        acc = self.trainer.accumulate_grad_batches
        expected = self.global_step * acc + batch_idx % acc
        if plan.step != expected:  # the loader's stream must follow the step counter
            raise RuntimeError(f"step plan {plan.step} at step index {expected}")
        mode, world = self.cfg.sampling, self.trainer.world_size
        ranks = distributed.slices_to_draw(mode, self.global_rank, world)
        drawn = self.make_batch(plan, ranks) if ranks else None
        sb = distributed.share_batch(drawn, plan.step, mode, self.facts, self.device)
        loss, extra = self.compute_loss(sb)
        self.log_step(loss, sb, extra)
        return {"loss": loss, "step_batch": sb}

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        return batch  # a StepPlan holds no tensors (and, frozen, cannot be copied field-wise)

    def log_step(self, loss: Tensor, sb: StepBatch, extra: dict[str, Tensor]) -> None:
        metrics: dict[str, float] = {"train/loss": float(loss.detach())}
        metrics["train/log_r"] = float(sb.log_r.mean())
        metrics["train/reward_temperature"] = self.current_reward_temperature()
        metrics.update({f"train/{k}": float(v) for k, v in extra.items()})
        metrics.update({f"train/{k}": float(v) for k, v in sb.stats().items()})
        out = sb.reward_out
        if out is not None:
            for k, v in out.components.items():
                if torch.is_tensor(v) and v.numel() > 0:
                    metrics[f"train/{k}"] = float(v.float().mean())
                elif isinstance(v, (int, float)):
                    metrics[f"train/{k}"] = float(v)
            if "log_c" in out.components:
                metrics["train/contradiction_rate"] = contradiction_rate(out.components["log_c"])
            metrics["train/distinct_2"] = distinct_n(out.questions, 2)
        if self.global_rank == 0:  # only rank 0 logs (and, with rank0 sampling, has a buffer)
            total = sum(self.buffer.size(k) for k in set(self.prompt_keys))
            metrics["train/buffer_entries"] = float(total)
            metrics["train/replay_dropped"] = float(getattr(self.buffer, "dropped", 0))
        self.log_dict(metrics, on_step=True, prog_bar=False, sync_dist=False, rank_zero_only=True)
        self.log("loss", metrics["train/loss"], prog_bar=True, logger=False)
        self.log("log_r", metrics["train/log_r"], prog_bar=True, logger=False)

    # ------------------------------------------------------------------ fresh samples
    @torch.no_grad()
    def evaluate_fresh(self, n_samples: int, embedder: Any = None) -> dict[str, float]:
        """Sample the validation facts on-policy (T=1) and summarise their rewards.

        The training stream mixes replay and tempered samples; this is the clean measure of
        what the policy itself generates, logged under ``val/``.
        """
        if not self.eval_facts:
            return {}
        g = step_generator(self.seed, -1, self.global_rank, 2)  # same draws at every call
        rows = [i for i in range(len(self.eval_facts)) for _ in range(n_samples)]
        ids, mask = left_pad([self.eval_prompts[i] for i in rows], self.pad_id, self.device)
        was_training = self.policy.training
        self.policy.eval()
        try:
            batch = sample(self.sampler_lm(), ids, mask, self.sampler_cfg, generator=g)
            out = self.reward.terminal(
                [self.eval_facts[i] for i in rows], batch, step=self.global_step
            )
        finally:
            self.policy.train(was_training)
        metrics = {"val/log_r": float(out.log_r.mean())}
        for k, v in out.per_row_components().items():
            if v.numel():
                metrics[f"val/{k}"] = float(v.float().mean())
        if "log_c" in out.components:
            metrics["val/contradiction_rate"] = contradiction_rate(out.components["log_c"])
        groups = [
            out.questions[i * n_samples : (i + 1) * n_samples] for i in range(len(self.eval_facts))
        ]
        metrics["val/distinct_2"] = sum(distinct_n(q, 2) for q in groups) / len(groups)
        if embedder is not None:
            metrics["val/diversity"] = grouped_diversity(groups, embedder)
        return metrics

    def init_log_z(self, log_z: Tensor, log_r: Tensor, log_pf: Tensor, lengths: Tensor) -> Tensor:
        """Start log Z at its first-batch estimate mean(log R / T - log P_F(x)).

        A log Z far from balance makes every residual the same sign, so the first updates push
        all sampled questions up (or down) together and the policy drifts; shifting the head's
        output bias once removes that transient. Averaged over ranks so DDP replicas agree.
        """
        with torch.no_grad():
            mask = torch.arange(log_pf.shape[1], device=log_pf.device)[None] < lengths[:, None]
            gap = (log_r.float() - (log_pf.float() * mask).sum(1) - log_z.float()).mean()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(gap)
                gap /= torch.distributed.get_world_size()
            self.log_z_head.fc2.bias.add_(gap.to(self.log_z_head.fc2.bias.dtype))
        self.log_z_ready = True
        return log_z + gap  # outside no_grad: the head stays in the graph (DDP needs its grads)

    def on_fit_start(self) -> None:
        # Lightning keeps a module's mode, and the LM was loaded in eval mode; gradient
        # checkpointing only acts in train mode (dropout is 0: the log-probs are the same).
        self.policy.train()
        # The judge is no submodule (it is not trained or checkpointed): follow the policy's device.
        nli = getattr(self.reward, "nli", None)
        if nli is not None and getattr(nli, "device", None) != self.device:
            nli.model.to(self.device)
            nli.device = self.device

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        c = self.cfg
        lora = [p for n, p in self.policy.named_parameters() if p.requires_grad]
        groups = [
            {"params": lora, "lr": c.lr, "weight_decay": c.weight_decay},
            {"params": list(self.log_z_head.parameters()), "lr": c.logz_lr, "weight_decay": 0.0},
        ]
        opt = torch.optim.AdamW(groups)
        warm = max(1, c.lr_warmup_steps)
        # Warm up the policy only: log Z must track the rewards from the first step.
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, [lambda s: min(1.0, (s + 1) / warm), lambda s: 1.0]
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The frozen base LM is referenced by the config, not copied into every checkpoint.
        checkpoint["state_dict"] = self.trainable_state_dict()
        state = getattr(self.buffer, "state_dict", None)
        checkpoint["contraq_buffer"] = json.dumps(state()) if state else None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.log_z_ready = True  # the checkpointed head is already initialised
        raw = checkpoint.get("contraq_buffer")
        load = getattr(self.buffer, "load_state_dict", None)
        if raw and load:
            load(json.loads(raw))


def save_adapter(module: GFlowNetModule, out_dir: str | Path) -> Path:
    """Write the LoRA adapter (peft format) and the log Z head next to it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    module.policy.save_pretrained(str(out))
    from safetensors.torch import save_file

    save_file(
        {k: v.detach().cpu().contiguous() for k, v in module.log_z_head.state_dict().items()},
        str(out / "log_z_head.safetensors"),
    )
    return out
