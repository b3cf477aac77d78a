"""Shapley estimators at equal evaluation counts: ours, the reference MM-SHAP sampler, shap.

    .venv/bin/python benchmarks/bench_estimator.py              # main table (a few minutes)
    .venv/bin/python benchmarks/bench_estimator.py --crossover  # where regression beats permutations

Error is relative MSE, mean over players and seeds of (phi - truth)^2 / mean(truth^2). Truth is
exact: enumeration for n = 12, closed forms for n = 64 (Harsanyi dividends split equally; weighted
majority by counting pivotal coalitions), except the n = 64 MLP, whose truth is the reference
sampler with 5000 permutations (650k evaluations, error far below the numbers measured here).
Budgets are the reference sampler's 2 * P * (n + 1) for P permutations; shap gets the same
max_evals and uses floor(B / (2n + 1)) * (2n + 1) of them, ours at most B.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import mmshap  # noqa: E402
from pipeline.mmshap import estimate_shapley, exact_shapley, reference_permutation_shapley  # noqa: E402


def harsanyi(n: int, rng: np.random.Generator):
    """Sparse interactions of order 1-3, Shapley known in closed form."""
    sets = [rng.choice(n, rng.integers(1, 4), replace=False) for _ in range(2 * n)]
    div = rng.normal(size=len(sets))
    phi = np.zeros(n)
    for t, d in zip(sets, div):
        phi[t] += d / len(t)
    return (lambda m: sum(d * m[:, t].all(1) for t, d in zip(sets, div)).astype(float)), phi


def majority(n: int, rng: np.random.Generator):
    """Weighted voting: a threshold game, the hard case for permutation sampling."""
    w = rng.integers(1, 10, n)
    quota = w.sum() / 2
    phi = np.zeros(n)
    for i in range(n):  # count coalitions of the others, by size and weight, where i is pivotal
        count = np.zeros((n, w.sum() + 1))
        count[0, 0] = 1
        for j in np.delete(np.arange(n), i):
            count[1:, w[j]:] += count[:-1, :-w[j]].copy()
        weights = np.arange(w.sum() + 1)
        pivotal = count[:, (weights < quota) & (weights >= quota - w[i])].sum(1)
        phi[i] = sum(pivotal[k] / (n * math.comb(n - 1, k)) for k in range(n))
    return (lambda m: (m @ w >= quota).astype(float)), phi


def pair_triple(n: int, rng: np.random.Generator):
    a = rng.normal(size=n)
    pairs, triples = rng.choice(n, (n, 2)), rng.choice(n, (n // 2, 3))
    b, c = 2 * rng.normal(size=len(pairs)), 3 * rng.normal(size=len(triples))

    def v(m):
        m = m.astype(float)
        return m @ a + m[:, pairs].prod(2) @ b + m[:, triples].prod(2) @ c
    return v, None


def mlp(n: int, rng: np.random.Generator, hidden: int = 32):
    """A smooth nonlinear model over masked inputs, the closest of these to a real network."""
    x = rng.normal(size=n)
    w1, b1 = 2 * rng.normal(size=(n, hidden)) / math.sqrt(n), 0.5 * rng.normal(size=hidden)
    w2 = rng.normal(size=hidden) / math.sqrt(hidden)
    return (lambda m: np.tanh((m * x) @ w1 + b1) @ w2), None


def truth_of(v, phi, n: int) -> np.ndarray:
    if phi is not None:
        return phi
    if n <= 16:
        return exact_shapley(v, n)
    return reference_permutation_shapley(v, n, n_permutations=5000, seed=12345)[0]


def shap_permutation(v, n: int, max_evals: int, seed: int) -> tuple[np.ndarray, int]:
    """shap's PermutationExplainer: x = all ones, background all zeros, so masked rows are masks."""
    import shap

    used = [0]

    def model(x):
        used[0] += len(x)
        return v(np.asarray(x) > 0.5)
    masker = shap.maskers.Independent(np.zeros((1, n)), max_samples=1)
    explainer = shap.explainers.Permutation(model, masker, seed=seed)
    return np.asarray(explainer(np.ones((1, n)), max_evals=max_evals, silent=True).values[0]), used[0]


def rel_mse(estimates: list[np.ndarray], truth: np.ndarray) -> float:
    return float(np.mean([(e - truth) ** 2 for e in estimates]) / np.mean(truth**2))


def main_table(seeds: int) -> None:
    print("| n | game | budget | ours | reference | shap | reference/ours | shap/ours | shap evals |")
    print("|---|---|---|---|---|---|---|---|---|")
    games = {12: [("majority", majority), ("pair_triple", pair_triple), ("mlp", mlp)],
             64: [("majority", majority), ("harsanyi", harsanyi), ("mlp", mlp)]}
    for n, named in games.items():
        for name, make in named:
            v, phi = make(n, np.random.default_rng(0))
            truth = truth_of(v, phi, n)
            for perms in (2, 10, 40):
                budget = 2 * perms * (n + 1)
                ours, ref, sh, shap_evals = [], [], [], 0
                for seed in range(seeds):
                    ours.append(estimate_shapley(v, n, budget=budget, seed=seed)[0])
                    ref.append(reference_permutation_shapley(v, n, n_permutations=perms, seed=seed)[0])
                    phi_shap, shap_evals = shap_permutation(v, n, budget, seed)
                    sh.append(phi_shap)
                o, r, s = rel_mse(ours, truth), rel_mse(ref, truth), rel_mse(sh, truth)
                print(f"| {n} | {name} | {budget} | {o:.2e} | {r:.2e} | {s:.2e} | {r / o:.1f} | {s / o:.1f} "
                      f"| {shap_evals} |", flush=True)


def crossover_table(seeds: int) -> None:
    """Regression-adjusted over antithetic-permutation MSE, forcing each, by budget per player."""
    print("| n | budget / n | harsanyi: regression/permutation | mlp: regression/permutation | "
          "majority: regression/permutation | switch at budget / n |")
    print("|---|---|---|---|---|---|")
    for n in (12, 32, 64, 128):
        games = [make(n, np.random.default_rng(g)) for make in (harsanyi, mlp, majority) for g in range(2)]
        games = [(v, truth_of(v, phi, n)) for v, phi in games]
        for per_player in (8, 16, 32, 64):
            budget = per_player * n
            ratios = []
            for k in range(3):
                reg, perm = [], []
                for v, truth in games[2 * k:2 * k + 2]:
                    for seed in range(seeds):
                        rng = np.random.default_rng(seed)
                        reg.append(np.mean((mmshap._regression_adjusted(v, n, budget, rng)[0] - truth) ** 2))
                        rng = np.random.default_rng(seed)
                        perm.append(np.mean((mmshap._antithetic_permutations(v, n, budget, rng)[0] - truth) ** 2))
                ratios.append(np.mean(reg) / np.mean(perm))
            switch = mmshap.regression_threshold(n) / n
            print(f"| {n} | {per_player} | {ratios[0]:.2f} | {ratios[1]:.2f} | {ratios[2]:.2f} | {switch:.1f} |",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--crossover", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    start = time.time()
    (crossover_table if args.crossover else main_table)(args.seeds)
    print(f"\n{time.time() - start:.0f} s, numpy {np.__version__}", file=sys.stderr)


if __name__ == "__main__":
    main()
