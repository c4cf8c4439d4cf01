"""Host syncs per decode step of the sampler and of the greedy answer loop (no GPU needed).

Counts the tensor calls that wait for a GPU's queue (:mod:`contraq.syncs`) while the tiny
random Llama of the tests samples questions and answers them, apart for the loop's own code
and for the model's forward passes (transformers' mask code checks the padding once per step).
Twice: on the CPU's schedule (the loops look at their rows every step) and on a GPU's
(:data:`contraq.syncs.GPU_CHECK_EVERY` steps between looks, run here with
:func:`contraq.syncs.checking_every`). On a GPU the sampler draws from a generator on the
device seeded once per call (:func:`contraq.lm.sampling.device_generator`), so no step's
probabilities go to the host.

    python bench/bench_syncs.py
"""

from __future__ import annotations

import torch

import contraq.lm.forward as lm_forward
import contraq.lm.sampling as sampler_module
import contraq.reward.answers as answers_module
from contraq.lm.models import (
    ModelConfig,
    attach_lora,
    base_model,
    build_tiny_model,
    load_smollm2_tokenizer,
    termination_token_id,
)
from contraq.lm.tokens import left_pad
from contraq.reward.contradiction import ContradictionReward
from contraq.syncs import GPU_CHECK_EVERY, checking_every, count_host_syncs


def counting_forward(counts: dict[str, int], original):
    """``forward`` whose syncs are counted apart, in ``counts['forward']``."""

    def call(*args, **kwargs):
        with count_host_syncs() as inner:  # counted by the outer counter too
            out = original(*args, **kwargs)
        counts["forward"] += sum(inner.values())
        counts["steps"] += 1
        return out

    return call


def main() -> None:
    torch.set_num_threads(1)
    tok = load_smollm2_tokenizer()
    policy = attach_lora(build_tiny_model("llama", tok, seed=0), ModelConfig(source="tiny"))
    policy.eval()
    term = termination_token_id(tok, "?")
    original = lm_forward.forward
    cfg = sampler_module.SamplerConfig(
        termination_token_id=term, pad_token_id=tok.pad_token_id, min_len=20, max_len=20
    )
    prompts = [tok.encode("Ask about Apple.")] * 8 + [tok.encode("Ask about Paris.")] * 8
    ids, mask = left_pad(prompts, tok.pad_token_id, torch.device("cpu"))
    reward = ContradictionReward(
        policy, tok, None, {"answer_max_new_tokens": 20, "frozen_weights": "shared"}, term
    )
    rows = reward._prompt_rows([f"Question number {i}?" for i in range(16)])
    runs = {
        "sampler": (sampler_module, lambda: sampler_module.sample(policy, ids, mask, cfg)),
        "answer loop": (answers_module, lambda: reward.greedy_continuations(rows, policy)),
    }
    for schedule, every in (("CPU", 1), ("GPU", GPU_CHECK_EVERY)):
        for name, (module, run) in runs.items():
            counts = {"forward": 0, "steps": 0}
            # The loops call `forward` directly or through lm.forward's decode_step / prefill.
            module.forward = lm_forward.forward = counting_forward(counts, original)
            try:
                with checking_every(every), base_model(policy), count_host_syncs() as own:
                    run()
            finally:
                module.forward = lm_forward.forward = original
            steps, inside = counts["steps"], counts["forward"]
            print(
                f"{name} ({schedule} schedule, a look every {every} steps): {steps} forward "
                f"passes; host syncs per pass: the loop's own code "
                f"{(sum(own.values()) - inside) / steps:.2f}, inside the forward "
                f"{inside / steps:.2f}"
            )


if __name__ == "__main__":
    main()
