"""Reproduces docs/EXPERIMENTS.md section 10, "What the reward's target looks like" (posterior-v5).

What the reward's target looks like: the untrained policy's questions filtered by the reward.

With ``log R = log C / beta + log P_Q`` and small ``beta``, the GFlowNet's target is the
untrained policy (the prior, T=1) restricted to counted contradictions. This script draws
``pool`` prior questions per held-out fact, scores them with the run's reward (judge
``judge=``), and reports what an exact sampler of that target would give:

- the prior's counted rate and the share of facts with any counted question among ``pool``;
- the diversity of the prior's questions (all of them, and random ``n``-subsets: the eval's
  measure) and of the counted ones (facts with at least two distinct counted questions);
- an exact target sampler at the eval's budget: ``n`` draws with replacement from each fact's
  counted questions (facts with none: counted rate 0 there), its counted rate, coverage and
  diversity, averaged over ``resamples`` draws.

Usage (the run only supplies its base LM, prompt, reward and held-out split)::

    python scripts/posterior.py run=outputs/cf-genuine judge=~/.cache/contraq/nli/minilm-zsre-v8 \
        out=docs/results/posterior pool=64 n=8 max_facts=32
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from contraq.evaluation.baselines import policy_records
from contraq.evaluation.metrics import Embedder, grouped_diversity, rate_summary
from contraq.evaluation.questions import progress_bar
from contraq.run.load import heldout_facts, load_parts, pick_device, resolve_run
from contraq.run.parts import build_prompts


def _args(argv: list[str]) -> dict[str, str]:
    """``key=value`` pairs (the same style as the contraq commands)."""
    out = {"pool": "64", "n": "8", "max_facts": "32", "seed": "0", "resamples": "20"}
    for a in argv:
        key, _, value = a.partition("=")
        if not value:
            sys.exit(f"posterior.py: expected key=value, got {a!r}")
        out[key] = value
    for key in ("run", "out"):
        if key not in out:
            sys.exit(f"posterior.py: {key}= is required")
    return out


def main(argv: list[str]) -> None:
    args = _args(argv)
    pool, n, seed = int(args["pool"]), int(args["n"]), int(args["seed"])
    out = Path(args["out"])
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    device = pick_device("auto")
    parts = load_parts(resolve_run(args["run"]), device=device, judge=args.get("judge"))
    facts = heldout_facts(parts.cfg)[: int(args["max_facts"])]
    prompts = build_prompts(parts.cfg, facts, parts.tokenizer)
    with progress_bar() as progress:
        records = policy_records(
            parts, facts, prompts, "prior", 1.0, True, pool, 32, seed, progress
        )
    with (out / "questions.jsonl").open("w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    embedder = Embedder(device=device)
    by_fact: dict[int, list[dict]] = {}
    for r in records:
        by_fact.setdefault(int(r["fact_index"]), []).append(r)
    counted = {f: [r for r in rs if r.get("genuine")] for f, rs in by_fact.items()}
    distinct = {f: sorted({str(r["question"]) for r in rs}) for f, rs in counted.items()}
    rng = random.Random(seed)
    resamples = int(args["resamples"])
    subsets = [
        [[str(r["question"]) for r in rng.sample(rs, n)] for rs in by_fact.values()]
        for _ in range(resamples)
    ]
    exact_rates, exact_div = [], []
    for _ in range(resamples):
        groups = [
            [str(rng.choice(cs)["question"]) for _ in range(n)] for cs in counted.values() if cs
        ]
        exact_div.append(grouped_diversity(groups, embedder))
        exact_rates.append(len(groups) / len(by_fact))
    result = {
        "settings": {**{k: v for k, v in args.items()}, "n_facts": len(facts)},
        "prior": {
            **rate_summary(records, seed=seed),
            "diversity_all": grouped_diversity(
                [[str(r["question"]) for r in rs] for rs in by_fact.values()], embedder
            ),
            "diversity_n_subsets": sum(grouped_diversity(s, embedder) for s in subsets) / resamples,
        },
        "counted": {
            "facts_with_any": sum(1 for cs in counted.values() if cs),
            "facts_with_two_distinct": sum(1 for d in distinct.values() if len(d) >= 2),
            "distinct_per_fact": {str(f): len(d) for f, d in distinct.items()},
            "diversity_distinct": grouped_diversity(list(distinct.values()), embedder),
        },
        "exact_target_sampler": {
            "n": n,
            "counted_rate": sum(exact_rates) / resamples,  # = share of facts with any
            "diversity": sum(exact_div) / resamples,
        },
        "examples": {str(f): d[:6] for f, d in sorted(distinct.items()) if d},
        "seconds": time.time() - t0,
    }
    (out / "posterior.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
