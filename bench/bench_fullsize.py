"""Full-size check of the GPU preset (gpt2-large + DeBERTa-v3-large MNLI judge), no model hub.

Builds both architectures at their real sizes from ``configs/archs/*.json`` with random weights
(stand-in tokenizers: see ``bench/preset_check.py``), saves them as local HF folders (cached under
``--weights-dir``), loads them through ``model.name_or_path`` / ``nli.path`` of
``experiment=gpu-gpt2-large`` and runs, with the project's own code path:

1. one training step with TB and one with modified SubTB (KV-cached sampling, answers by the base
   LM = policy with adapters disabled, NLI judge, loss, backward, AdamW step): float32 on CPU, the
   preset's bf16-mixed on CUDA;
2. one scoring-only pass with both models loaded in bfloat16.

It asserts the GPT-2 LoRA targets (Conv1D attention layers wrapped, trainable count exact) and
the judge's contradiction index, reports parameters per component, time per phase and peak
memory (RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA), and projects the per-GPU
memory of the preset's batch (``train.facts_per_step x train.n_samples``) and where it stops
fitting ``--gpu-gib``.

    python bench/bench_fullsize.py [--device cpu|cuda] [--facts 2] [--samples 2] [--max-len 8]

Takes a few minutes and ~8 GiB of RAM on CPU (the first run also writes ~4.8 GB of weights).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import preset_check as pc  # noqa: E402  (bench/preset_check.py, beside this file)
from contraq.files import default_cache_dir  # noqa: E402
from contraq.run.parts import Parts  # noqa: E402

GIB = 2**30


class Memory:
    """Peak memory per phase: RSS sampled every 5 ms on CPU, the allocator's peak on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peaks: dict[str, int] = {}
        self.phase = "start"
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        if device.type == "cpu":
            threading.Thread(target=self._poll, daemon=True).start()

    def now(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.now())

    def enter(self, phase: str) -> None:
        if self.device.type == "cuda":
            self.peaks[self.phase] = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.now())
        self.phase = phase

    def process_peak(self) -> int:
        if self.device.type == "cuda":
            return max(self.peaks.values())
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def project(counts: dict[str, int], step: pc.StepReport, cfg: Any, gib: float) -> dict[str, Any]:
    """Per-GPU memory of the preset's batch under bf16-mixed, from the measured step.

    fixed = fp32 base + judge in ``nli.dtype`` + LoRA/log Z with grads and two AdamW moments
    + bf16 copies of the frozen weights that autocast saves for backward (measured on CUDA,
    2 bytes/parameter when measured in float32) + 1 GiB CUDA context and allocator slack;
    per question = saved hidden activations per token x (P + T) + saved vocabulary-wide
    tensors per action x T + two float32 [T, V] gradients in backward. Activations measured
    in float32 are an upper bound for bf16-mixed, where matmul inputs are saved in bf16.
    """
    b, p, t = step.batch, step.prompt_width, step.action_width
    vocab = int(cfg.get("vocab_size", 50257))
    per_tok = step.saved_other_bytes / (b * (p + t))
    per_act = step.saved_vocab_bytes / (b * t)
    judge_bytes = 2 if str(cfg.get("nli_dtype")) in ("bfloat16", "float16") else 4
    casts = step.saved_weight_cast_bytes or 2 * counts["base"]
    trainable = counts["lora"] + counts.get("log_z_head", 0)
    fixed = 4 * counts["base"] + judge_bytes * counts["judge"] + 16 * trainable + casts + GIB
    pp, tt = int(cfg.get("prompt_width_max", step.prompt_width)), int(cfg["max_len"])
    per_q = per_tok * (pp + tt) + per_act * tt + 2 * 4 * tt * vocab
    preset_b = int(cfg["facts_per_step"]) * int(cfg["n_samples"])
    limit = gib * GIB
    return {
        "per_token_hidden_MiB": per_tok / 2**20,
        "per_action_vocab_MiB": per_act / 2**20,
        "fixed_GiB": fixed / GIB,
        "per_question_MiB": per_q / 2**20,
        "preset_batch": preset_b,
        "prompt_width": pp,
        "max_len": tt,
        "preset_GiB": (fixed + preset_b * per_q) / GIB,
        "fits": fixed + preset_b * per_q <= limit,
        "max_batch": max(0, int((limit - fixed) // per_q)),
        "gpu_GiB": gib,
    }


def prompt_width_max(cfg: Any, tokenizer: Any) -> int:
    """The widest question prompt over the training facts: a batch is left-padded to its
    widest prompt, so this bounds P for any batch of the preset."""
    from contraq.data import load_facts
    from contraq.files import resolve_path
    from contraq.run.parts import build_prompts

    facts = load_facts(resolve_path(cfg.data.path))
    return max(len(p) for p in build_prompts(cfg, facts, tokenizer))


def overrides(args: argparse.Namespace, device: torch.device) -> list[str]:
    out = [
        f"train.facts_per_step={args.facts}",
        f"train.n_samples={args.samples}",
        f"sampler.max_len={args.max_len}",
        f"reward.answer_max_new_tokens={args.answer_tokens}",
    ]
    if device.type == "cpu":  # the preset's trainer is bf16-mixed on one GPU
        out += ["trainer.accelerator=cpu", "trainer.precision=32-true"]
    return out


def train_steps(
    args: argparse.Namespace, dirs: tuple[Path, Path], device: torch.device, mem: Memory
) -> dict[str, Any]:
    cfg = pc.preset_config(*dirs, *overrides(args, device))
    mem.enter("load_fp32")
    t0 = time.perf_counter()
    parts = Parts(cfg)
    parts.reward()
    load_s = time.perf_counter() - t0
    mem.enter("loaded_fp32")
    res: dict[str, Any] = {"load_seconds": load_s, "rss_after_load": mem.now()}
    res["lora_trainable"] = pc.check_gpt2_lora(parts.policy, int(cfg.model.lora_r))
    res["contradiction_index"] = pc.check_judge(parts)
    res["labels"] = parts.reward().nli.labels
    for loss in ("tb", "subtb"):
        step_cfg = pc.preset_config(*dirs, *overrides(args, device), f"loss={loss}")
        t0 = time.perf_counter()
        report = pc.run_step(
            step_cfg, parts, on_phase=lambda ph, loss=loss: mem.enter(f"{loss}:{ph}")
        )
        if not (report.lora_changed and report.judge_calls > 0):
            raise RuntimeError(f"{loss}: LoRA unchanged or judge never called: {report}")
        res[loss] = {**report.__dict__, "total_seconds": time.perf_counter() - t0}
    module = pc.build_module(cfg, parts)
    res["params"] = pc.param_counts(parts, module)
    preset = pc.preset_config(*dirs)  # the preset's own batch sizes and lengths
    res["cfg"] = {
        "facts_per_step": int(preset.train.facts_per_step),
        "n_samples": int(preset.train.n_samples),
        "max_len": int(preset.sampler.max_len),
        "vocab_size": parts.policy.config.vocab_size,
        "nli_dtype": preset.nli.dtype,
        "prompt_width_max": prompt_width_max(preset, parts.tokenizer),
    }
    del parts, module
    gc.collect()
    return res


def bf16_pass(
    args: argparse.Namespace, dirs: tuple[Path, Path], device: torch.device, mem: Memory
) -> dict[str, Any]:
    cfg = pc.preset_config(
        *dirs, *overrides(args, device), "model.dtype=bfloat16", "nli.dtype=bfloat16"
    )
    mem.enter("load_bf16")
    parts = Parts(cfg)
    mem.enter("score_bf16")
    out = pc.score_pass(cfg, parts, device)
    mem.enter("done")
    del parts
    gc.collect()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--facts", type=int, default=2, help="facts per step in the measured step")
    ap.add_argument("--samples", type=int, default=2, help="questions per fact")
    ap.add_argument("--max-len", type=int, default=8, help="sampler.max_len of the measured step")
    ap.add_argument("--answer-tokens", type=int, default=8, help="reward.answer_max_new_tokens")
    ap.add_argument("--gpu-gib", type=float, default=24.0, help="per-GPU memory to project to")
    ap.add_argument("--weights-dir", default=str(Path(default_cache_dir()) / "bench-fullsize"))
    ap.add_argument("--lm-layers", type=int, default=None, help="debug: fewer GPT-2 blocks")
    ap.add_argument("--nli-layers", type=int, default=None, help="debug: fewer DeBERTa layers")
    ap.add_argument("--skip-bf16", action="store_true")
    ap.add_argument("--json", default=None, help="write all figures to this file")
    ap.add_argument("--from-json", default=None, help="re-project a saved run (no model run)")
    args = ap.parse_args()
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        step = pc.StepReport(**_report(res["tb"]))
        res["projection"] = project(res["params"], step, res["cfg"], args.gpu_gib)
        print_report(res, tuple(Path(d) for d in res["dirs"]))
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    mem = Memory(device)
    lm = pc.arch_dict(pc.LM_ARCH, **({"n_layer": args.lm_layers} if args.lm_layers else {}))
    nli_over = {"num_hidden_layers": args.nli_layers} if args.nli_layers else {}
    nli = pc.arch_dict(pc.NLI_ARCH, **nli_over)
    mem.enter("write_weights")
    t0 = time.perf_counter()
    dirs = pc.write_random_weights(args.weights_dir, lm, nli)
    write_s = time.perf_counter() - t0
    gc.collect()
    res = train_steps(args, dirs, device, mem)
    res["write_seconds"] = write_s
    if not args.skip_bf16:
        res["bf16"] = bf16_pass(args, dirs, device, mem)
    mem.enter("end")
    res["peaks"] = dict(mem.peaks)
    res["process_peak"] = mem.process_peak()
    res["projection"] = project(
        res["params"], pc.StepReport(**_report(res["tb"])), res["cfg"], args.gpu_gib
    )
    res["device"] = str(device)
    res["dirs"] = [str(d) for d in dirs]
    res["threads"] = torch.get_num_threads()
    print_report(res, dirs)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))


def _report(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != "total_seconds"}


def print_report(res: dict[str, Any], dirs: tuple[Path, Path]) -> None:
    p = res["params"]
    print(f"weights: {dirs[0]} | {dirs[1]} (written/reused in {res['write_seconds']:.0f} s)")
    print(
        "tokenizers: SmolLM2 BPE (49,152 tokens, no chat template) for gpt2-large; "
        "MiniLM-L6 WordPiece for DeBERTa-v3-large"
    )
    print(f"device {res['device']}, {res['threads']} threads; load {res['load_seconds']:.0f} s")
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in p.items()))
    print(
        f"GPT-2 LoRA: attn.c_attn + attn.c_proj (Conv1D) wrapped, {res['lora_trainable']:,} "
        f"trainable; judge labels {res['labels']}, contradiction index "
        f"{res['contradiction_index']}"
    )
    for loss in ("tb", "subtb"):
        r = res[loss]
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in r["seconds"].items())
        print(
            f"{loss}: loss {r['loss']:.2f}, batch {r['batch']} (P={r['prompt_width']}, "
            f"T={r['action_width']}), {r['total_seconds']:.0f} s [{phases}]; saved for "
            f"backward: hidden {r['saved_other_bytes'] / 2**20:.0f} MiB, vocab-wide "
            f"{r['saved_vocab_bytes'] / 2**20:.0f} MiB"
        )
    if "bf16" in res:
        b = res["bf16"]
        print(
            f"bf16 scoring: {b['seconds']:.0f} s, {b['dtype']} / judge {b['judge_dtype']}, "
            f"|log P_F sampler - teacher-forced| max {b['log_pf_max_abs_diff']:.3f}"
        )
    print(
        f"RSS after fp32 load: {res['rss_after_load'] / GIB:.2f} GiB (safetensors are "
        f"memory-mapped: pages count once touched); process peak "
        f"{res['process_peak'] / GIB:.2f} GiB"
    )
    print(
        "peak per phase (GiB): "
        + ", ".join(f"{k} {v / GIB:.2f}" for k, v in res["peaks"].items() if v)
    )
    pr = res["projection"]
    print(
        f"projection (bf16-mixed, one GPU): fixed {pr['fixed_GiB']:.1f} GiB + "
        f"{pr['per_question_MiB']:.0f} MiB/question (P={pr['prompt_width']}, "
        f"T={pr['max_len']}, widest prompt of the data) -> preset batch {pr['preset_batch']}: {pr['preset_GiB']:.1f} GiB "
        f"({'fits' if pr['fits'] else 'does NOT fit'} {pr['gpu_GiB']:.0f} GiB); "
        f"stops fitting above {pr['max_batch']} questions per step"
    )


if __name__ == "__main__":
    main()
