"""Where a training step's time goes: sampling, answering, judging, log P_Q, loss + backward.

One Trajectory Balance step of the default experiment (SmolLM2-135M-Instruct + LoRA, the
offline MiniLM judge from the cache, or MiniLM-L6 with a random head of the same size), split
into the parts of :meth:`contraq.reward.ContradictionReward.terminal` and
:meth:`contraq.training.module.GFlowNetModule.compute_loss`, each timed on its own:

- sampling: the KV-cached sampler, ``facts x n`` questions at T=1;
- answering: greedy answers of the base LM (adapters disabled);
- judging: the judge on (edit, answer) and on (edit, question) (the echo check);
- log P_Q: one teacher-forced base pass over the questions;
- loss + backward: one teacher-forced policy pass with gradients, the TB loss, backward.

    python bench/bench_step.py [--facts 2] [--n 8] [--repeats 3] [--threads 2]
        [--baseline each-prompt|float32|today|padded] [--frozen auto|float16|int8] [--distinct D]

Prints seconds per part (median of the repeats) and their share of the step twice, a baseline
and the step as training runs, with the ratio baseline / new:

- ``--baseline each-prompt`` (default): every row runs its own prompt
  (``contraq.lm.forward.no_prompt_sharing``) against each distinct prompt once with its KV cache
  shared; both with the default config's weights (``model.dtype=auto``).
- ``--baseline float32``: float32 weights against bfloat16 (what ``model.dtype=auto`` picks on
  a CPU with AMX), both with shared prompts. The questions and answers differ a
  little between the two (bfloat16 rounds the logits), so lengths are printed for each.
- ``--baseline today``: the sampler, the answers and log P_Q on the policy's own weights
  (``train.sample_weights=shared``, ``reward.frozen_weights=shared``) with log P_Q of every
  row, against the sampler on the policy's float16 copy (``train.sample_weights=float16``) and
  the answers and log P_Q on ``--frozen`` (default ``auto``: a float16 copy of the base on a
  float32 CPU model) with log P_Q of each distinct (prompt, question) row once. The questions
  that differ, the answers that differ and the largest log P_Q difference are printed. The
  baseline's loss pass and log P_Q are also padded (below).
- ``--baseline padded``: the teacher-forced passes (loss + backward, log P_Q) with each
  question padded to the longest (``contraq.lm.packing.no_packing``) against one packed row
  with no padding (:mod:`contraq.lm.packing`), all else as training runs.

Answering times the distinct questions only, as the reward does. ``--distinct D`` makes each
fact's ``n`` sampled rows hold only ``D`` distinct questions (rows copied after sampling), as a
trained policy's late steps do (6-13 distinct of 16 in ``docs/results/cf-curve-s0``). The
padding of the loss pass (question slots past each row's end) is printed too.

Last, the end-to-end ``reward.terminal`` time against the sum of its parts (a check that the
split is complete).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_reward import judge_dir  # noqa: E402
from contraq.config.schema import compose_run  # noqa: E402
from contraq.data import load_split  # noqa: E402
from contraq.judge.scorer import NLIScorer  # noqa: E402
from contraq.lm.float16_copy import float16_policy_copy  # noqa: E402
from contraq.lm.forward import no_prompt_sharing  # noqa: E402
from contraq.lm.models import weights_dtype  # noqa: E402
from contraq.lm.packing import no_packing  # noqa: E402
from contraq.lm.sampling import SampleBatch, sample, score_actions  # noqa: E402
from contraq.lm.tokens import decode_questions, left_pad  # noqa: E402
from contraq.reward.base import base_logprobs, batch_logprobs, frozen_base  # noqa: E402
from contraq.reward.build import build_reward  # noqa: E402
from contraq.run.parts import Parts, build_prompts  # noqa: E402
from contraq.training.losses import LogZHead, trajectory_balance_loss  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def repeat_questions(batch: SampleBatch, n: int, distinct: int) -> SampleBatch:
    """Each block of ``n`` rows (one fact's) holding only its first ``distinct`` questions."""
    rows = [b - b % n + (b % n) % distinct for b in range(len(batch))]
    pick = torch.tensor(rows)
    return SampleBatch(**{k: getattr(batch, k)[pick] for k in batch.__dataclass_fields__})


def time_parts(
    parts: Parts, reward, nli, ids, mask, rows, args, dedup: bool, sampler_lm=None
) -> dict:
    """Seconds per part of one step (median of ``args.repeats``), plus the end-to-end reward.
    ``dedup``: log P_Q of each distinct row once (``batch_logprobs``), else of every row.
    ``sampler_lm``: what the sampler runs (default: the policy)."""
    repeats, width = args.repeats, ids.shape[1]
    gen = torch.Generator().manual_seed(0)
    policy = parts.policy
    policy.eval()
    sampler_lm = policy if sampler_lm is None else sampler_lm

    def do_sample():
        gen.manual_seed(0)
        return sample(sampler_lm, ids, mask, parts.sampler_cfg, generator=gen)

    t_sample, batch = timed(do_sample, repeats)
    if args.distinct:
        batch = repeat_questions(batch, args.n, args.distinct)
    questions = decode_questions(parts.tokenizer, batch.actions, batch.lengths)
    distinct_q = list(dict.fromkeys(questions))
    edits = [f.edit_fact for f in rows]
    with frozen_base(policy) as base:
        t0 = time.perf_counter()
        lm = reward.frozen_lm(base)  # a copy is made once, here
        t_copy = time.perf_counter() - t0
        t_answer, (answers, _) = timed(lambda: reward.generate_answers(distinct_q, lm), repeats)
        by_q = dict(zip(distinct_q, answers, strict=True))
        answers = [by_q[q] for q in questions]
        t_judge, _ = timed(
            lambda: (
                nli.log_contradiction(edits, answers),
                nli.log_contradiction(edits, questions),
            ),
            repeats,
        )
        term, size = parts.term_id, reward.cfg.batch_size
        if dedup:
            t_pq, (tok_lp, _) = timed(lambda: batch_logprobs(lm, batch, term, size), repeats)
        else:
            t_pq, (tok_lp, _) = timed(
                lambda: base_logprobs(lm, ids, mask, batch.actions, batch.lengths, term, size),
                repeats,
            )
    t_terminal, out = timed(lambda: reward.terminal(rows, batch), repeats)
    head = LogZHead(policy.config.hidden_size)

    def loss_backward():
        policy.train()
        log_pf, log_pterm, hidden = score_actions(
            policy, ids, mask, batch.actions, parts.sampler_cfg, return_prompt_hidden=True
        )
        log_z = head(hidden.float(), mask)
        loss = trajectory_balance_loss(
            log_z, log_pf, log_pterm, out.log_r, batch.generated_text, parts.term_id, width
        )
        loss.backward()
        policy.zero_grad(set_to_none=True)
        policy.eval()

    t_loss, _ = timed(loss_backward, repeats)
    return {
        "parts": {
            "sampling": t_sample,
            "answering": t_answer,
            "judging": t_judge,
            "log P_Q": t_pq,
            "loss + backward": t_loss,
        },
        "terminal": t_terminal,
        "batch": batch,
        "answers": answers,
        "questions": questions,
        "log_pq": tok_lp.sum(1),
        "copy_seconds": t_copy,
        "distinct": len(distinct_q),
    }


def measure(
    parts: Parts,
    nli,
    args: argparse.Namespace,
    sharing: bool,
    frozen: str = "shared",
    dedup: bool = False,
    sample16: bool = False,
    packing: bool = True,
) -> dict:
    """:func:`time_parts` for ``parts``' model on the first ``args.facts`` training facts, the
    answers and log P_Q on ``reward.frozen_weights=frozen``, the sampler on the policy's float16
    copy with ``sample16`` (``train.sample_weights=float16``); ``packing=False``: the loss pass
    and log P_Q padded (``contraq.lm.packing.no_packing``)."""
    cfg = parts.cfg
    reward = build_reward(cfg.reward, parts.policy, parts.tokenizer, parts.term_id, nli=nli)
    reward.cfg.frozen_weights = frozen
    rows = [f for f in load_split(cfg.data).train[: args.facts] for _ in range(args.n)]
    prompts = build_prompts(cfg, rows, parts.tokenizer)
    ids, mask = left_pad(prompts, parts.sampler_cfg.pad_token_id, torch.device("cpu"))
    with (
        contextlib.nullcontext() if sharing else no_prompt_sharing(),
        contextlib.nullcontext() if packing else no_packing(),
    ):
        lm = float16_policy_copy(parts.policy) if sample16 else None
        out = time_parts(parts, reward, nli, ids, mask, rows, args, dedup, lm)
    out["prompt_tokens"] = ids.shape[1]
    out["dtype"] = weights_dtype(parts.policy)
    return out


def print_padding(batch: SampleBatch) -> None:
    """Question slots of the loss pass past each row's end (its teacher-forced input is
    prompt + actions[:, :-1], rows padded to the longest)."""
    slots = batch.actions.shape[0] * batch.actions.shape[1]
    used = int(batch.lengths.sum())
    print(
        f"loss pass: {batch.actions.shape[0]} rows x {batch.actions.shape[1]} question slots, "
        f"{used} used ({100 * (slots - used) / slots:.0f}% padding)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--facts", type=int, default=2, help="facts per step")
    ap.add_argument("--n", type=int, default=8, help="questions per fact")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--baseline",
        choices=["each-prompt", "float32", "today", "padded"],
        default="each-prompt",
    )
    ap.add_argument("--frozen", choices=["auto", "float16", "int8"], default="auto")
    ap.add_argument("--distinct", type=int, default=0, help="distinct questions per fact")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path, what = judge_dir(Path(tmp))
        cfg = compose_run(REPO / "configs")
        nli = NLIScorer(path, device="cpu", batch_size=int(cfg.nli.batch_size))
        if args.baseline == "each-prompt":
            labels = ("each prompt", "shared prompts")
            parts = Parts(cfg)
            base = measure(parts, nli, args, sharing=False)
            new = measure(parts, nli, args, sharing=True)
        elif args.baseline == "today":
            labels = ("today", f"{args.frozen}+distinct+s16")
            parts = Parts(cfg)
            base = measure(parts, nli, args, sharing=True, packing=False)
            new = measure(parts, nli, args, True, args.frozen, dedup=True, sample16=True)
        elif args.baseline == "padded":
            labels = ("padded", "packed")
            parts = Parts(cfg)
            kw = {"frozen": args.frozen, "dedup": True, "sample16": True}
            base = measure(parts, nli, args, True, packing=False, **kw)
            new = measure(parts, nli, args, True, **kw)
        else:
            labels = ("float32", "bfloat16")
            base, new = (
                measure(Parts(compose_run(REPO / "configs", [f"model.dtype={d}"])), nli, args, True)
                for d in labels
            )
    batch = new["batch"]
    print(f"judge: {what}; {args.facts} facts x {args.n} questions; {args.threads} threads")
    print(
        f"prompt {new['prompt_tokens']} tokens; mean question length "
        f"{base['batch'].lengths.float().mean():.1f} / {batch.lengths.float().mean():.1f} tokens; "
        f"weights {base['dtype']} / {new['dtype']}; answers e.g. {new['answers'][0]!r}"
    )
    print(f"  {'':16s} {labels[0]:>18s} {labels[1]:>18s}  ratio")
    total_b, total_n = sum(base["parts"].values()), sum(new["parts"].values())
    for name, sec in new["parts"].items():
        b = base["parts"][name]
        print(
            f"  {name:16s} {b:7.2f} s {100 * b / total_b:5.1f}%   "
            f"{sec:7.2f} s {100 * sec / total_n:5.1f}%  {b / sec:5.2f}x"
        )
    print(
        f"  {'step':16s} {total_b:7.2f} s          {total_n:7.2f} s         {total_b / total_n:5.2f}x"
    )
    print_padding(batch)
    changed = sum(a != b for a, b in zip(base["answers"], new["answers"], strict=True))
    moved = sum(a != b for a, b in zip(base["questions"], new["questions"], strict=True))
    print(f"questions that differ {moved}/{len(batch)}")
    print(
        f"distinct questions {new['distinct']} of {len(batch)}; answers that differ "
        f"{changed}/{len(batch)}; largest |log P_Q difference| "
        f"{(base['log_pq'] - new['log_pq']).abs().max():.4f} nats; "
        f"copy of the frozen base made in {new['copy_seconds']:.2f} s"
    )
    inner = sum(new["parts"][k] for k in ("answering", "judging", "log P_Q"))
    print(
        f"reward.terminal end to end {new['terminal']:.2f} s vs answering + judging + log P_Q "
        f"{inner:.2f} s (ratio {new['terminal'] / inner:.2f})"
    )


if __name__ == "__main__":
    main()
