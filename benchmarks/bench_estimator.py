"""T-SHAP on synthetic games with exact Shapley values: the reference sampler against estimate_mm_shap.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_estimator.py [--seeds 10] [--ns 60,120,240]

Games: tests/shapley_games.make_game (additive part, weighted unanimity / redundancy / threshold /
saturating group terms, zero-mean higher-order "context" terms per modality with independent noise
scales), families mixed, noisytext (one-sided text noise), redundant, lowrank; 2 games per
(family, n), --seeds seeds per game. Budgets are fractions of the reference's 20(n + 1)
evaluations (10 antithetic permutations, nothing shared). "plug-in" is our draws with
sum_text |phi| / sum |phi| (no debiasing). "oracle signs" is our draws' phi with the true signs:
sum_text sign(phi_j) phi_hat_j / sum sign(phi_j) phi_hat_j, the ratio of two unbiased linear sums, a
floor for any treatment of |phi| from the same draws (what is left is the sampling design's
variance). Coverage: share of runs with |error| <= 2 stderr.
"""

from __future__ import annotations

import argparse
import collections
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from pipeline.shapley import estimate_mm_shap, mm_shap, reference_permutation_shapley  # noqa: E402
from shapley_games import make_game  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--ns", default="60,120,240")
    ap.add_argument("--families", default="mixed,noisytext,redundant,lowrank")
    ap.add_argument("--target", type=float, default=0.03)
    args = ap.parse_args()
    fractions = [0.1, 0.2, 0.5, 1.0]
    rows = collections.defaultdict(list)  # (n, method) -> [(error, stderr, evaluations)]
    t0 = time.time()
    for n in [int(x) for x in args.ns.split(",")]:
        ref = 20 * (n + 1)
        for family in args.families.split(","):
            for g in range(2):
                game = make_game(n, 1000 + 100 * g + n, family=family)
                truth = game.t_shap()
                for s in range(args.seeds):
                    phi, count = reference_permutation_shapley(game, n, n_permutations=10, seed=s)
                    rows[(n, "reference, 10 antithetic permutations")].append((mm_shap(phi, game.is_text)[0] - truth, np.nan, count))
                    for f in fractions:
                        e = estimate_mm_shap(game, game.is_text, int(f * ref), seed=s)
                        rows[(n, f"ours, budget {f:g}x")].append((e.t_shap - truth, e.stderr, e.n_evaluations))
                        rows[(n, f"ours plug-in |phi|, budget {f:g}x")].append((e.t_shap_plugin - truth, np.nan, e.n_evaluations))
                        signed = np.sign(game.shapley()) * e.phi
                        oracle = signed[game.is_text].sum() / signed.sum()
                        rows[(n, f"ours, oracle signs, budget {f:g}x")].append((oracle - truth, np.nan, e.n_evaluations))
                    e = estimate_mm_shap(game, game.is_text, ref, seed=s, target_stderr=args.target)
                    rows[(n, f"ours, target {args.target:g} (cap 1x)")].append((e.t_shap - truth, e.stderr, e.n_evaluations))
    print("| n | method | evals / reference | T-SHAP RMSE | RMSE / reference's | mean error (bias) | coverage +-2 stderr |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (n, method), values in rows.items():
        err, se, evals = np.array(values, float).T
        rmse = math.sqrt(np.mean(err**2))
        ref_err = np.array(rows[(n, "reference, 10 antithetic permutations")], float)[:, 0]
        cover = "-" if np.isnan(se).all() else f"{np.mean(np.abs(err) <= 2 * se):.2f}"
        print(f"| {n} | {method} | {evals.mean() / (20 * (n + 1)):.2f} | {rmse:.4f} | "
              f"{rmse / math.sqrt(np.mean(ref_err**2)):.2f} | {err.mean():+.4f} | {cover} |")
    print(f"\n{args.seeds} seeds x 2 games x {len(args.families.split(','))} families per n; {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
