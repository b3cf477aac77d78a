"""Target mode (the default MM-SHAP policy) on games with exact Shapley values: how often the
stated +-2 stderr covers the true T-SHAP, what it spends, and its RMSE, per number of players.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_target_coverage.py [--seeds 30] [--target 0.03]

Cap: the reference procedure's 20(n + 1) evaluations. Families and seeds as
tests/test_shapley.py::test_mm_target_mode_covered_also_where_it_stopped_first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from pipeline.shapley import estimate_mm_shap  # noqa: E402
from shapley_games import make_game  # noqa: E402

FAMILIES = ("mixed", "noisytext", "redundant", "lowrank")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=30)
    ap.add_argument("--target", type=float, default=0.03)
    ap.add_argument("--players", default="60,120,240")
    args = ap.parse_args()
    print("| n | coverage +-2 stderr | evals / reference | T-SHAP RMSE |\n|---|---:|---:|---:|")
    for n in map(int, args.players.split(",")):
        cap = 20 * (n + 1)
        hits, cost, err = [], [], []
        for family in FAMILIES:
            game = make_game(n, 41 + n, family=family)
            truth = game.t_shap()
            for seed in range(args.seeds):
                e = estimate_mm_shap(game, game.is_text, cap, seed=seed, target_stderr=args.target)
                hits.append(abs(e.t_shap - truth) <= 2 * e.stderr)
                cost.append(e.n_evaluations / cap)
                err.append(e.t_shap - truth)
        print(f"| {n} | {np.mean(hits):.2f} | {np.mean(cost):.2f} | {np.sqrt(np.mean(np.square(err))):.3f} |")


if __name__ == "__main__":
    main()
