"""Where a training step's time goes: sampling, answering, judging, log P_Q, loss + backward.

One Trajectory Balance step of the default experiment (SmolLM2-135M-Instruct + LoRA, the
offline MiniLM judge from the cache, or MiniLM-L6 with a random head of the same size), split
into the parts of :meth:`contraq.reward.ContradictionReward.terminal` and
:meth:`contraq.module.GFlowNetModule.compute_loss`, each timed on its own:

- sampling: the KV-cached sampler, ``facts x n`` questions at T=1;
- answering: greedy answers of the base LM (adapters disabled);
- judging: the judge on (edit, answer) and on (edit, question) (the echo check);
- log P_Q: one teacher-forced base pass over the questions;
- loss + backward: one teacher-forced policy pass with gradients, the TB loss, backward.

    python bench/bench_step.py [--facts 2] [--n 8] [--repeats 3] [--threads 2]
        [--baseline each-prompt|float32]

Prints seconds per part (median of the repeats) and their share of the step twice, a baseline
and the step as training runs, with the ratio baseline / new:

- ``--baseline each-prompt`` (default): every row runs its own prompt
  (``contraq.lm_forward.no_prompt_sharing``) against each distinct prompt once with its KV cache
  shared; both with the default config's weights (``model.dtype=auto``).
- ``--baseline float32``: float32 weights against bfloat16 (what ``model.dtype=auto`` picks on
  a CPU with AMX), both with shared prompts. The questions and answers differ a
  little between the two (bfloat16 rounds the logits), so lengths are printed for each.

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
from contraq.conf import compose_run  # noqa: E402
from contraq.data import load_split  # noqa: E402
from contraq.judge.scorer import NLIScorer  # noqa: E402
from contraq.lm_forward import no_prompt_sharing  # noqa: E402
from contraq.losses import LogZHead, trajectory_balance_loss  # noqa: E402
from contraq.models import weights_dtype  # noqa: E402
from contraq.parts import Parts, build_prompts  # noqa: E402
from contraq.reward.base import base_logprobs, frozen_base  # noqa: E402
from contraq.reward.build import build_reward  # noqa: E402
from contraq.sampler import sample, score_actions  # noqa: E402
from contraq.tokens import decode_questions, left_pad  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def time_parts(parts: Parts, reward, nli, ids, mask, rows, repeats: int) -> dict:
    """Seconds per part of one step (median of ``repeats``), plus the end-to-end reward."""
    width = ids.shape[1]
    gen = torch.Generator().manual_seed(0)
    policy = parts.policy
    policy.eval()

    def do_sample():
        gen.manual_seed(0)
        return sample(policy, ids, mask, parts.sampler_cfg, generator=gen)

    t_sample, batch = timed(do_sample, repeats)
    questions = decode_questions(parts.tokenizer, batch.actions, batch.lengths)
    edits = [f.edit_fact for f in rows]
    with frozen_base(policy) as lm:
        t_answer, (answers, _) = timed(lambda: reward.generate_answers(questions, lm), repeats)
        t_judge, _ = timed(
            lambda: (
                nli.log_contradiction(edits, answers),
                nli.log_contradiction(edits, questions),
            ),
            repeats,
        )
        t_pq, _ = timed(
            lambda: base_logprobs(
                lm, ids, mask, batch.actions, batch.lengths, parts.term_id, reward.cfg.batch_size
            ),
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
    }


def measure(parts: Parts, nli, args: argparse.Namespace, sharing: bool) -> dict:
    """:func:`time_parts` for ``parts``' model on the first ``args.facts`` training facts."""
    cfg = parts.cfg
    reward = build_reward(cfg.reward, parts.policy, parts.tokenizer, parts.term_id, nli=nli)
    rows = [f for f in load_split(cfg.data).train[: args.facts] for _ in range(args.n)]
    prompts = build_prompts(cfg, rows, parts.tokenizer)
    ids, mask = left_pad(prompts, parts.sampler_cfg.pad_token_id, torch.device("cpu"))
    with contextlib.nullcontext() if sharing else no_prompt_sharing():
        out = time_parts(parts, reward, nli, ids, mask, rows, args.repeats)
    out["prompt_tokens"] = ids.shape[1]
    out["dtype"] = weights_dtype(parts.policy)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--facts", type=int, default=2, help="facts per step")
    ap.add_argument("--n", type=int, default=8, help="questions per fact")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline", choices=["each-prompt", "float32"], default="each-prompt")
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
    inner = sum(new["parts"][k] for k in ("answering", "judging", "log P_Q"))
    print(
        f"reward.terminal end to end {new['terminal']:.2f} s vs answering + judging + log P_Q "
        f"{inner:.2f} s (ratio {new['terminal'] / inner:.2f})"
    )


if __name__ == "__main__":
    main()
