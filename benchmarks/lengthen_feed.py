"""A feed with longer texts, for MM-SHAP benchmarks at 60-240 players.

Each product's description is joined with those of 2-5 other products of its category, so the
synthetic catalogue's texts reach the `small` preset's 62 tokens (pixel mode: 60-126 players).
Images stay where they were: the output CSV is written next to the input's image folder.

    PYTHONPATH=. .venv/bin/python benchmarks/lengthen_feed.py cat/catalogue.csv cat/long.csv --rows 300
"""

from __future__ import annotations

import argparse
import csv

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("feed")
    ap.add_argument("out")
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with open(args.feed, newline="") as f:
        rows = list(csv.DictReader(f))
    rng = np.random.default_rng(args.seed)
    by_class: dict[str, list[str]] = {}
    for r in rows:
        by_class.setdefault(r["category"], []).append(r["description"])
    out = []
    for r in rows[: args.rows]:
        others = [d for d in by_class[r["category"]] if d != r["description"]]
        k = min(len(others), int(rng.integers(2, 6)))
        picked = [others[j] for j in rng.choice(len(others), k, replace=False)]
        out.append({**r, "description": " ".join([r["description"], *picked])})
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(out)


if __name__ == "__main__":
    main()
