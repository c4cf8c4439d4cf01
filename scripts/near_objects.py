"""A tool: rewrites the committed src/contraq/judge/tables/near_objects.json (judge v9).

Write src/contraq/judge/tables/near_objects.json: for every relation of the judge's edit
facts, each object's nearest other objects in all-MiniLM-L6-v2 embedding space
(contraq.judge.near). The judge's pair generator reads the table; rerun this after changing
the facts (`nli.train.facts`) and give the judge a new name.

    python scripts/near_objects.py [--k 5]
"""

from __future__ import annotations

import argparse
import json
from importlib.resources import files

from contraq.files import resolve_path
from contraq.judge.config import NLITrainConfig
from contraq.judge.facts import read_fact_rows
from contraq.judge.near import NEAR_TABLE, near_table
from contraq.judge.pairs import PairBuilder
from contraq.lm.embedding import Embedder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=5, help="neighbours kept per object")
    args = parser.parse_args()
    rows = [r for p in NLITrainConfig().facts for r in read_fact_rows(resolve_path(p))]
    builder = PairBuilder(rows)
    embedder = Embedder(device="cpu")
    table = near_table(builder.objects, embedder.encode, args.k)
    out = files("contraq.judge") / "tables" / f"{NEAR_TABLE}.json"
    text = json.dumps(table, ensure_ascii=False, indent=0, sort_keys=True)
    with open(str(out), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    n = sum(len(v) for v in table.values())
    print(f"{out}: {len(table)} relations, {n} objects with neighbours")


if __name__ == "__main__":
    main()
