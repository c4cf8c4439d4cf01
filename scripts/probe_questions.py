"""Reproduces the inputs of docs/results/probe-cf32 (its README: facts.jsonl, questions.jsonl).

Edit facts and questions to probe an edited model with, before a trained sampler exists:
the first N held-out (test split) facts of a run config, and N_Q distinct questions per fact
from the untrained policy (the base LM at T=1, as `contraq sample plain=true` draws them) and
from beam search on the base LM (as `contraq eval` runs it), each scored by the run's reward
(so every row records the base LM's own answer and whether it contradicts the edit).

    python scripts/probe_questions.py OUT_DIR [--facts 32] [--n 8] [--facts-only] [overrides...]

Writes OUT_DIR/facts.jsonl (the facts' raw records, case_id kept) and
OUT_DIR/questions.jsonl (`contraq sample`'s schema plus `method`: untrained or beam).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from contraq.config.schema import compose_run
from contraq.evaluation.baselines import beam_records
from contraq.evaluation.questions import progress_bar, sample_distinct_records
from contraq.files import REPO_ROOT, iter_jsonl, resolve_path
from contraq.run.load import heldout_facts
from contraq.run.parts import Parts, build_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--facts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--facts-only", action="store_true", help="write facts.jsonl only")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    cfg = compose_run(REPO_ROOT / "configs", args.overrides)
    facts = heldout_facts(cfg, "test")[: args.facts]
    raw = dict(iter_jsonl(resolve_path(cfg.data.path)))
    (out / "facts.jsonl").write_text("".join(json.dumps(raw[f.line]) + "\n" for f in facts))
    if args.facts_only:
        return
    start = time.perf_counter()
    parts = Parts(cfg, with_lora=True)
    with progress_bar() as progress:
        untrained = sample_distinct_records(
            parts, facts, args.n, base=True, method="untrained", seed=0, progress=progress
        )
        prompts = build_prompts(cfg, facts, parts.tokenizer)
        _, beam = beam_records(parts, facts, prompts, args.n, 32, 1, 0.0, progress)
    rows = [r for recs in untrained for r in recs] + beam
    with (out / "questions.jsonl").open("w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    print(f"{len(rows)} questions for {len(facts)} facts in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
