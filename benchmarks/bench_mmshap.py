"""MM-SHAP per product on a trained bundle: T-SHAP error and wall time, ours against the reference.

For each image mode, the first --products products with --min-players..--max-players players and
both modalities are explained:

- yardstick: estimate_mm_shap with >= --truth coalitions (its own stderr is printed);
- reference (Parcalabescu & Frank's MM-SHAP code, shap's PermutationExplainer): 10 antithetic
  permutations, plug-in |phi|, 20(n + 1) coalitions. Its T-SHAP is computed with batched calls
  (--seeds seeds; a coalition's value does not depend on its batch), and its wall time is timed
  once per product as the reference runs it: one forward pass per coalition;
- ours: estimate_mm_shap at fixed budgets (fractions of the reference's count) and at the
  default policy (target stderr 0.03, cap 4000), --seeds seeds each, timed as pipeline/mmshap.py
  runs it (batched calls of up to 512 coalitions).

RMSE is over products x seeds against the yardstick. Every coalition runs in float32 on the CPU.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_mmshap.py --bundle BUNDLE --feed FEED [--products 6]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from pipeline.backend import InProcessBackend
from pipeline.bundle import load_bundle
from pipeline.feed import read_feed
from pipeline.mmshap import DEFAULT_CAP, DEFAULT_TARGET_STDERR, predicted_classes, product_game
from pipeline.records import Product
from pipeline.shapley import estimate_mm_shap, mm_shap, reference_permutation_shapley


def one_at_a_time(value_fn):
    """The reference's cost model: every coalition is its own forward pass."""
    return lambda masks: np.concatenate([value_fn(m[None]) for m in masks])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--feed", required=True)
    ap.add_argument("--products", type=int, default=6)
    ap.add_argument("--min-players", type=int, default=60)
    ap.add_argument("--max-players", type=int, default=240)
    ap.add_argument("--fractions", default="0.1,0.2,0.5,1", help="our fixed budgets, as fractions of 20(n + 1)")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--truth", type=int, default=20_000)
    ap.add_argument("--modes", default="pixel,token")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    backend = InProcessBackend(load_bundle(args.bundle, device="cpu"), device="cpu")
    products = [p for p in read_feed(args.feed) if isinstance(p, Product) and p.has_text and p.has_image]
    fractions = [float(f) for f in args.fractions.split(",")]
    for mode in args.modes.split(","):
        chosen, n_players = [], []
        for start in range(0, len(products), 64):
            enc = backend.encode(products[start : start + 64])
            pred = predicted_classes(backend, enc)
            for i in range(len(enc)):
                value_fn, text = product_game(backend, enc, i, mode, pred)
                if args.min_players <= len(text) <= args.max_players:
                    chosen.append((value_fn, text))
                    n_players.append(len(text))
                if len(chosen) == args.products:
                    break
            if len(chosen) == args.products:
                break
        rows: dict[str, list] = {}
        truth_se = []
        for k, (value_fn, text) in enumerate(chosen):
            n = len(text)
            ref = 20 * (n + 1)
            truth = estimate_mm_shap(value_fn, text, args.truth, seed=10_000 + k)
            truth_se.append(truth.stderr)

            def add(name, t, se, evals, seconds):
                rows.setdefault(name, []).append((t - truth.t_shap, se, evals / ref, evals, seconds))

            t0 = time.perf_counter()
            phi, evals = reference_permutation_shapley(one_at_a_time(value_fn), n, n_permutations=10, seed=0)
            ref_s = time.perf_counter() - t0
            for s in range(args.seeds):
                phi, evals = reference_permutation_shapley(value_fn, n, n_permutations=10, seed=s)
                add("reference: 10 antithetic permutations, 1 coalition per pass", mm_shap(phi, text)[0], np.nan,
                    evals, ref_s)
            policies = [(f"ours, budget {f:g}x", int(f * ref), None) for f in fractions]
            policies.append((f"ours, default: target {DEFAULT_TARGET_STDERR:g}, cap {DEFAULT_CAP}", DEFAULT_CAP,
                             DEFAULT_TARGET_STDERR))
            for name, budget, target in policies:
                for s in range(args.seeds):
                    t0 = time.perf_counter()
                    e = estimate_mm_shap(value_fn, text, budget, seed=s, target_stderr=target)
                    seconds = time.perf_counter() - t0
                    add(name, np.nan if e.t_shap is None else e.t_shap, np.nan if e.stderr is None else e.stderr,
                        e.n_evaluations, seconds)
            print(f"  {mode} product {k}: n = {n}, yardstick T-SHAP {truth.t_shap:.4f} +- {truth.stderr:.4f} "
                  f"({truth.n_evaluations} coalitions), reference {ref_s:.1f} s", flush=True)
            table(mode, rows, n_players[: k + 1], truth_se, args.seeds)


def table(mode: str, rows: dict, n_players: list, truth_se: list, seeds: int) -> None:
    """The rows so far (printed after every product, so that a cut-short run still reports)."""
    print("| mode | method | players (mean) | coalitions / product | evals / reference | T-SHAP RMSE "
          "| RMSE / reference's | coverage +-2 stderr | wall s / product | speed-up vs reference |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    ref_rows = np.array(rows[next(iter(rows))], float)
    ref_rmse, ref_s = math.sqrt(np.nanmean(ref_rows[:, 0] ** 2)), ref_rows[:, 4].mean()
    for name, values in rows.items():
        err, se, frac, evals, seconds = np.array(values, float).T
        ok = ~np.isnan(err)
        rmse = math.sqrt(np.mean(err[ok] ** 2)) if ok.any() else float("nan")
        cover = f"{np.mean(np.abs(err[ok]) <= 2 * se[ok]):.2f}" if ok.any() and not np.isnan(se).all() else "-"
        speed = f"{ref_s / seconds.mean():.0f}x" if not name.startswith("reference") else "1x"
        print(f"| {mode} | {name} | {np.mean(n_players):.0f} | {evals.mean():.0f} | {frac.mean():.2f} | {rmse:.4f} | "
              f"{rmse / ref_rmse:.2f} | {cover} | {seconds.mean():.2f} | {speed} |" + ("" if ok.all() else f" ({(~ok).sum()} NULL)"))
    print(f"  {mode}: {len(n_players)} products, players {min(n_players)}-{max(n_players)}, {seeds} seeds, "
          f"yardstick stderr median {np.median(truth_se):.4f}", flush=True)


if __name__ == "__main__":
    main()
