"""Throughput of the contradiction reward: batched vs one question at a time.

SmolLM2-135M-Instruct answers (greedy, chat prompt) and a MiniLM-L6-sized BERT judges: the
trained offline judge from the cache when present, else MiniLM-L6 with a random 3-way head
(same architecture, hence the same speed). Questions are made from CounterFact prompts
("The mother tongue of X is" -> "What is the mother tongue of X?").

    python bench/bench_reward.py [--batch 16] [--n 32] [--threads 1] [--prefixes]

Prints questions/s of each mode and their ratio (target >= 3x), and whether both modes gave
the same answers.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from transformers import AutoTokenizer, BertForSequenceClassification  # noqa: E402

from contraq.data import EditFact, load_facts  # noqa: E402
from contraq.judge.config import NLITrainConfig  # noqa: E402
from contraq.judge.scorer import NLIScorer  # noqa: E402
from contraq.lm.models import (  # noqa: E402
    ModelConfig,
    attach_lora,
    load_model_and_tokenizer,
    termination_token_id,
)
from contraq.lm.packaged import minilm_dir  # noqa: E402
from contraq.lm.sampling import SampleBatch  # noqa: E402
from contraq.reward.contradiction import ContradictionReward  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def judge_dir(tmp: Path) -> tuple[Path, str]:
    """The trained judge if cached, else MiniLM-L6 + a random 3-way head saved under ``tmp``."""
    cfg = NLITrainConfig.from_any(OmegaConf.load(REPO / "configs" / "nli" / "minilm-zsre.yaml"))
    trained = cfg.output_dir()
    if (trained / "config.json").is_file():
        return trained, f"trained judge {trained}"
    labels = {0: "entailment", 1: "neutral", 2: "contradiction"}
    model = BertForSequenceClassification.from_pretrained(
        str(minilm_dir()), num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()}
    )
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(tmp)
    return tmp, "MiniLM-L6 + random 3-way head (no trained judge in the cache)"


def questions_from_facts(n: int) -> list[tuple[EditFact, str]]:
    """``n`` (fact, question) pairs from CounterFact prompts of the form 'The ... is'."""
    out = []
    for fact in load_facts(REPO / "data" / "counterfact_1000.jsonl"):
        p = (fact.prompt or "").strip()
        if p.startswith("The ") and p.endswith(" is"):
            out.append((fact, "What is the " + p[4:-3]))
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} usable CounterFact prompts, asked for {n}")


def make_batch(
    tok, pairs: list[tuple[EditFact, str]], term: int, device: torch.device
) -> SampleBatch:
    """Chat-templated question prompts (left-padded) and the questions as actions."""
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": f"Ask one short question about {f.subject}."}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for f, _ in pairs
    ]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    qs = [tok.encode(q, add_special_tokens=False) + [term] for _, q in pairs]
    actions = torch.full((len(qs), max(map(len, qs))), tok.pad_token_id, dtype=torch.long)
    for i, q in enumerate(qs):
        actions[i, : len(q)] = torch.tensor(q)
    lengths = torch.tensor([len(q) for q in qs])
    zeros = torch.zeros(actions.shape)
    batch = SampleBatch(enc["input_ids"], enc["attention_mask"], actions, lengths, zeros, zeros)
    return batch.to(device)


def run(
    reward: ContradictionReward, tok, pairs, term, device, chunk: int
) -> tuple[float, list[str], int]:
    """Seconds, answers and generate calls for all pairs, ``chunk`` questions per call."""
    calls = 0
    original = reward.policy.generate

    def counted(*args, **kwargs):
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    reward.policy.generate = counted
    answers: list[str] = []
    try:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for lo in range(0, len(pairs), chunk):
            part = pairs[lo : lo + chunk]
            out = reward.terminal([f for f, _ in part], make_batch(tok, part, term, device))
            answers += out.answers or []
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, answers, calls
    finally:
        del reward.policy.generate


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batch", type=int, default=16, help="questions per batched reward call")
    ap.add_argument("--n", type=int, default=32, help="questions in all")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--max-new-tokens", type=int, default=30)
    ap.add_argument("--prefixes", action="store_true", help="also time per-prefix rewards (SubTB)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )

    model, tok = load_model_and_tokenizer(ModelConfig(source="smollm2"))
    policy = attach_lora(model, ModelConfig(source="smollm2")).to(device).eval()
    term = termination_token_id(tok, "?")
    pairs = questions_from_facts(args.n)
    with tempfile.TemporaryDirectory() as tmp:
        path, judge = judge_dir(Path(tmp))
        nli = NLIScorer(path, device=device, batch_size=64)
        cfg = {"batch_size": args.batch, "answer_max_new_tokens": args.max_new_tokens, "min_len": 0}
        reward = ContradictionReward(policy, tok, nli, cfg, term)
        run(reward, tok, pairs[:2], term, device, 2)  # warm-up

        n0 = nli.n_forward_calls
        t_batch, a_batch, g_batch = run(reward, tok, pairs, term, device, args.batch)
        nli_batch = nli.n_forward_calls - n0
        n0 = nli.n_forward_calls
        t_one, a_one, g_one = run(reward, tok, pairs, term, device, 1)
        nli_one = nli.n_forward_calls - n0

        n = len(pairs)
        print(f"device {device}, torch threads {torch.get_num_threads()}, judge: {judge}")
        print(f"{n} questions, answers of at most {args.max_new_tokens} new tokens")
        print(f"{'mode':<14}{'seconds':>9}{'questions/s':>13}{'generate':>10}{'NLI fwd':>9}")
        print(
            f"{f'batch {args.batch}':<14}{t_batch:>9.2f}{n / t_batch:>13.2f}{g_batch:>10}{nli_batch:>9}"
        )
        print(f"{'one at a time':<14}{t_one:>9.2f}{n / t_one:>13.2f}{g_one:>10}{nli_one:>9}")
        print(f"speed-up: {t_one / t_batch:.2f}x (target >= 3x)")
        same = sum(a == b for a, b in zip(a_batch, a_one, strict=True))
        print(f"identical answers in both modes: {same}/{n}")
        for (_, q), a in list(zip(pairs, a_batch, strict=True))[:4]:
            print(f"  {q}? -> {a}")
        if args.prefixes:
            part = pairs[: args.batch]
            batch = make_batch(tok, part, term, device)
            t0 = time.perf_counter()
            reward.prefixes([f for f, _ in part], batch, min_len=1)
            dt = time.perf_counter() - t0
            print(
                f"prefixes of {len(part)} questions (mean {batch.lengths.float().mean():.1f} tokens): "
                f"{dt:.2f} s = {dt / (len(part) / (n / t_batch)):.1f}x the terminal reward"
            )


if __name__ == "__main__":
    main()
