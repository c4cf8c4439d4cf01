"""Benchmark the sampler and the teacher-forced re-evaluation on SmolLM2-135M (+ LoRA).

Prints, each a median over ``--repeats`` runs after one warm-up:
 1. sampler tokens/s vs ``model.generate(do_sample=True)`` on the same batch and the same
    number of new tokens (no early stop: min_len = max_len = new tokens); target >= 0.95x.
 2. teacher-forced ``score_actions`` + backward vs a token-by-token KV-cached replay with
    grad + backward (LoRA grads); target >= 2.8x.
 3. peak memory of one training step (sample, score, backward, AdamW step): process RSS on
    CPU, ``torch.cuda.max_memory_allocated`` on GPU.

Usage: python bench/bench_sampler.py [--device cpu|cuda] [--batch 8] [--new-tokens 24]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from contraq.lm.models import ModelConfig, attach_lora, load_model_and_tokenizer  # noqa: E402
from contraq.lm.sampling import SamplerConfig, sample, score_actions  # noqa: E402

SUBJECTS = [
    "the Eiffel Tower",
    "Marie Curie",
    "the Amazon River",
    "Toyota",
    "the Great Wall of China",
    "Lionel Messi",
    "Mount Kilimanjaro",
    "the Python programming language",
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def once(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def replay_backward(model, prompt_ids, prompt_mask, actions, cfg: SamplerConfig) -> torch.Tensor:
    """Token-by-token KV-cached replay of the given actions WITH grad (the slow way).

    Returns the summed log_pf + log_pterm (before backward)."""
    batch, width = prompt_ids.shape
    n_steps = actions.shape[1]
    mask = torch.cat([prompt_mask, torch.ones_like(actions)], dim=1)
    pos0 = prompt_mask.sum(dim=1, keepdim=True)
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=(prompt_mask.cumsum(1) - 1).clamp(min=0),
        use_cache=True,
        logits_to_keep=1,
    )
    total = torch.zeros((), device=prompt_ids.device)
    term = cfg.termination_token_id
    for t in range(n_steps):
        logits = out.logits[:, -1].float()
        bias = torch.zeros_like(logits)
        if t < cfg.min_len and t < cfg.max_len - 1:
            bias[:, term] = -torch.inf
        if t >= cfg.max_len - 1:
            bias[:] = -torch.inf
            bias[:, term] = 0
        logp = torch.log_softmax(logits + bias, -1)
        total = total + logp.gather(1, actions[:, t : t + 1]).sum()
        if t >= cfg.min_len:
            total = total + logp[:, term].sum()
        if t + 1 < n_steps:
            out = model(
                input_ids=actions[:, t : t + 1],
                attention_mask=mask[:, : width + t + 1],
                position_ids=pos0 + t,
                cache=out.cache,
                use_cache=True,
                logits_to_keep=1,
            )
    return total


def fmt(times: list[float]) -> str:
    return "[" + ", ".join(f"{t:.2f}s" for t in times) + "]"


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device(args.device)

    model, tok = load_model_and_tokenizer(ModelConfig(source="smollm2"))
    policy = attach_lora(model, ModelConfig(source="smollm2")).to(device)
    with torch.no_grad():  # a trained-looking adapter: B non-zero
        gen = torch.Generator().manual_seed(args.seed)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen).to(device) * 0.01)
    policy.eval()
    rss_loaded = rss_mib()

    prompts = [f"Generate a question about {s}:\nQuestion:" for s in SUBJECTS]
    prompts = (prompts * (args.batch // len(prompts) + 1))[: args.batch]
    enc = tok(prompts, return_tensors="pt", padding=True).to(device)
    n = args.new_tokens
    cfg = SamplerConfig(
        termination_token_id=tok.convert_tokens_to_ids("?"),
        pad_token_id=tok.pad_token_id,
        min_len=n,
        max_len=n,
    )
    rng = torch.Generator(device=device).manual_seed(args.seed)
    print(
        f"device={device} threads={torch.get_num_threads()} batch={args.batch} new_tokens={n}",
        flush=True,
    )

    # --- 3. peak memory of one training step (first, so RSS peaks are the step's own)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batch = sample(policy, enc.input_ids, enc.attention_mask, cfg, rng)
    log_pf, log_pterm = score_actions(policy, enc.input_ids, enc.attention_mask, batch.actions, cfg)
    (-(log_pf.sum(1) + log_pterm.sum(1)).mean()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    if device.type == "cuda":
        mem = f"cuda max allocated {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
    else:
        mem = f"peak RSS {rss_mib():.0f} MiB (after model load: {rss_loaded:.0f} MiB)"

    # --- 1. sampler vs generate
    def run_sampler() -> None:
        sample(policy, enc.input_ids, enc.attention_mask, cfg, rng)

    def run_generate() -> None:
        with torch.no_grad():
            out = policy.generate(
                input_ids=enc.input_ids,
                attention_mask=enc.attention_mask,
                do_sample=True,
                max_new_tokens=n,
                min_new_tokens=n,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                pad_token_id=tok.pad_token_id,
            )
        assert out.shape[1] == enc.input_ids.shape[1] + n

    tokens = args.batch * n
    # Interleaved so that load changes on a shared machine hit both alike.
    t_s, t_g = [], []
    run_sampler(), run_generate()  # warm-up
    for _ in range(args.repeats):
        t_s.append(once(run_sampler, device))
        t_g.append(once(run_generate, device))
    s_tps, g_tps = tokens / statistics.median(t_s), tokens / statistics.median(t_g)
    print(f"   sampler runs {fmt(t_s)} | generate runs {fmt(t_g)}", flush=True)

    # --- 2. teacher-forced score + backward vs token-by-token replay + backward
    actions = sample(policy, enc.input_ids, enc.attention_mask, cfg, rng).actions

    def run_teacher_forced() -> None:
        lp, lt = score_actions(policy, enc.input_ids, enc.attention_mask, actions, cfg)
        (lp.sum() + lt.sum()).backward()
        policy.zero_grad(set_to_none=True)

    def run_replay() -> None:
        replay_backward(policy, enc.input_ids, enc.attention_mask, actions, cfg).backward()
        policy.zero_grad(set_to_none=True)

    with torch.no_grad():
        lp, lt = score_actions(policy, enc.input_ids, enc.attention_mask, actions, cfg)
        check = replay_backward(policy, enc.input_ids, enc.attention_mask, actions, cfg)
    diff = abs(float(lp.sum() + lt.sum()) - float(check))
    t_tf, t_rp = [], []
    run_teacher_forced(), run_replay()  # warm-up
    for _ in range(args.repeats):
        t_tf.append(once(run_teacher_forced, device))
        t_rp.append(once(run_replay, device))
    tf, rp = statistics.median(t_tf), statistics.median(t_rp)
    print(f"   teacher-forced runs {fmt(t_tf)} | replay runs {fmt(t_rp)}", flush=True)

    print(
        f"1. sampler {s_tps:8.1f} tok/s | generate {g_tps:8.1f} tok/s | "
        f"ratio {s_tps / g_tps:.2f} (target >= 0.95)"
    )
    print(
        f"2. score_actions+backward {tf * 1e3:7.1f} ms | replay+backward {rp * 1e3:7.1f} ms | "
        f"speed-up {rp / tf:.2f}x (target >= 2.8x; |sum diff| {diff:.1e})"
    )
    print(f"3. one training step: {mem}")


if __name__ == "__main__":
    main()
