"""What one greedy decode step of the embedded base LM costs as the batch grows.

One KV-cached decode step of SmolLM2-135M-Instruct (the embedded default, random tokens after an
80-token prompt), timed for several batch sizes in one process, with the ratio to the 16-row
step (the batch of a default training step). If the step is bound by reading the weights, more
rows cost little: a bigger batch is cheap, and splitting a batch over processes saves little.

    python bench/bench_decode.py [--threads 1] [--rows 1 8 16 32 64] [--steps 10] [--bf16]
        [--lora] [--head]

``--head`` times the LM head alone on the last position of ``[rows, prompt, H]`` hidden states,
as transformers slices it (a strided view) and copied contiguous first (what
``contraq.lm.models.contiguous_head_input`` does for every loaded model), in float32 and bfloat16:
with frozen weights, ``F.linear`` on the strided view broadcasts and copies the head weight.

``--bf16`` times the same steps with the weights in bfloat16 too (CPUs with avx512_bf16 or
AMX run its matrix products natively), with the ratio fp32 / bf16 per batch size. ``--lora``
times the policy as training samples it, LoRA adapters active (rank 8 on the attention
projections), against the same model with them disabled: what merging the adapters into the
weights for sampling could save.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from contraq.config.schema import compose_run  # noqa: E402
from contraq.run.parts import Parts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def decode_step_seconds(lm: torch.nn.Module, rows: int, prompt: int, steps: int) -> float:
    """Mean seconds of one cached decode step for ``rows`` sequences after a ``prompt``-token
    prefill."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 10_000, (rows, prompt), generator=gen)
    out = lm(input_ids=ids, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = lm(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t0) / steps


@torch.no_grad()
def head_seconds(head: torch.nn.Linear, rows: int, width: int, contiguous: bool) -> float:
    """Seconds of the LM head on the last position of ``[rows, width, H]`` hidden states."""
    hidden = torch.randn(rows, width, head.in_features, dtype=head.weight.dtype)
    last = hidden[:, -1:]
    last = last.contiguous() if contiguous else last
    torch.nn.functional.linear(last, head.weight)  # warm-up
    t0 = time.perf_counter()
    torch.nn.functional.linear(last, head.weight)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    ap.add_argument("--prompt", type=int, default=80, help="prompt tokens before decoding")
    ap.add_argument("--steps", type=int, default=10, help="decode steps timed per batch size")
    ap.add_argument("--bf16", action="store_true", help="also time bfloat16 weights")
    ap.add_argument("--lora", action="store_true", help="also time the LoRA adapters active")
    ap.add_argument("--head", action="store_true", help="also time the head on a strided input")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # float32 is the baseline (model.dtype=auto would load bfloat16 on a CPU with AMX).
    policy = Parts(compose_run(str(REPO / "configs"), ["model.dtype=float32"])).policy.eval()
    # The base LM: the adapters disabled, as the reward answers with it (and as merged weights
    # would cost).
    with policy.disable_adapter():
        decode_step_seconds(policy, 2, args.prompt, 2)  # warm-up
        seconds = {r: decode_step_seconds(policy, r, args.prompt, args.steps) for r in args.rows}
    base = seconds.get(16, seconds[args.rows[0]])
    print(f"SmolLM2-135M decode step, {args.threads} thread(s), {args.prompt}-token prompt")
    print("  rows   seconds   vs 16 rows   seconds per row")
    for r, sec in seconds.items():
        print(f"  {r:4d}   {sec:7.4f}   {sec / base:9.2f}x   {sec / r:10.4f}")
    if args.lora:
        decode_step_seconds(policy, 2, args.prompt, 2)
        print("  rows   LoRA active seconds   active / disabled")
        for r in args.rows:
            sec = decode_step_seconds(policy, r, args.prompt, args.steps)
            print(f"  {r:4d}   {sec:19.4f}   {sec / seconds[r]:16.2f}x")
    if args.head:
        head = policy.get_output_embeddings()
        print(f"  LM head on the last of {args.prompt} positions: strided / contiguous seconds")
        for dtype in (torch.float32, torch.bfloat16):
            frozen = torch.nn.Linear(head.in_features, head.out_features, bias=False)
            frozen.weight = torch.nn.Parameter(head.weight.detach().to(dtype), requires_grad=False)
            for r in args.rows:
                strided = head_seconds(frozen, r, args.prompt, contiguous=False)
                copied = head_seconds(frozen, r, args.prompt, contiguous=True)
                name = str(dtype).removeprefix("torch.")
                print(
                    f"  {name:8s} {r:4d} rows   {strided:8.4f} / {copied:8.4f}   {strided / copied:7.1f}x"
                )
    if args.bf16:
        lm = policy.get_base_model().to(torch.bfloat16)
        with policy.disable_adapter():
            decode_step_seconds(lm, 2, args.prompt, 2)
            print("  rows   bf16 seconds   fp32 / bf16")
            for r in args.rows:
                sec = decode_step_seconds(lm, r, args.prompt, args.steps)
                print(f"  {r:4d}   {sec:12.4f}   {seconds[r] / sec:10.2f}x")


if __name__ == "__main__":
    sys.exit(main())
