"""Word-level against WordPiece text players: what `--mmshap-players word` changes, per product.

For the first --products products of a feed with both modalities, MM-SHAP is estimated on the
bundle's multimodal model twice per seed, with WordPiece players and with word players (all
pieces of a word present or absent together), at the default policy (target stderr, cap), and
once more per player kind at a high budget (--truth coalitions) as the yardstick of that game.
Printed per player kind: players, coalitions spent, stated stderr, RMSE against its own
yardstick, share meeting the target, wall time; and how far the two games' T-SHAP lie apart
(their yardsticks: the same model, players of another grain).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_players.py --bundle BUNDLE --feed FEED \\
        [--products 30] [--mode token] [--seeds 2] [--truth 4000]
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
from pipeline.mmshap import DEFAULT_CAP, DEFAULT_TARGET_STDERR, PLAYERS, predicted_classes, product_game
from pipeline.records import Product
from pipeline.shapley import estimate_mm_shap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--feed", required=True)
    ap.add_argument("--products", type=int, default=30)
    ap.add_argument("--mode", default="token", choices=("token", "pixel"))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--truth", type=int, default=4000)
    ap.add_argument("--target", type=float, default=DEFAULT_TARGET_STDERR)
    ap.add_argument("--cap", type=int, default=DEFAULT_CAP)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    backend = InProcessBackend(load_bundle(args.bundle, device="cpu"), device="cpu", batch_size=256)
    products = [p for p in read_feed(args.feed) if isinstance(p, Product) and p.has_text and p.has_image]
    products = products[: args.products]
    enc = backend.encode(products)
    pred = predicted_classes(backend, enc)
    rows = {kind: [] for kind in PLAYERS}  # (n players, evals, stderr, error vs yardstick, met, seconds)
    yard = {kind: [] for kind in PLAYERS}
    for i in range(len(products)):
        for kind in PLAYERS:
            value_fn, is_text = product_game(backend, enc, i, args.mode, pred, kind)
            truth = estimate_mm_shap(value_fn, is_text, args.truth, seed=10_000 + i)
            yard[kind].append(np.nan if truth.t_shap is None else truth.t_shap)
            for s in range(args.seeds):
                t0 = time.perf_counter()
                e = estimate_mm_shap(value_fn, is_text, args.cap, seed=s, target_stderr=args.target)
                seconds = time.perf_counter() - t0
                err = np.nan if e.t_shap is None or truth.t_shap is None else e.t_shap - truth.t_shap
                rows[kind].append((len(is_text), e.n_evaluations, np.nan if e.stderr is None else e.stderr, err,
                                   float(bool(e.met_target)), seconds))
        print(f"  product {i}: players token {rows['token'][-1][0]}, word {rows['word'][-1][0]}; yardstick T-SHAP "
              f"token {yard['token'][-1]:.3f}, word {yard['word'][-1]:.3f}", flush=True)

    print(f"\n{len(products)} products, {args.mode} image players, target stderr {args.target}, cap {args.cap}, "
          f"{args.seeds} seeds, yardstick {args.truth} coalitions\n")
    print("| text players | players (mean) | coalitions / product | stated stderr (median) | T-SHAP RMSE vs its "
          "yardstick | met target | wall s / product |\n|---|---:|---:|---:|---:|---:|---:|")
    for kind in PLAYERS:
        n, evals, se, err, met, sec = np.array(rows[kind], float).T
        rmse = math.sqrt(np.nanmean(err ** 2)) if np.isfinite(err).any() else float("nan")
        print(f"| {kind} | {n.mean():.1f} | {evals.mean():.0f} | {np.nanmedian(se):.4f} | {rmse:.4f} | "
              f"{met.mean():.2f} | {sec.mean():.2f} |")
    gap = np.array(yard["word"]) - np.array(yard["token"])
    print(f"\nword - token yardstick T-SHAP: mean {np.nanmean(gap):+.4f}, mean |.| {np.nanmean(np.abs(gap)):.4f}, "
          f"max |.| {np.nanmax(np.abs(gap)):.4f}")


if __name__ == "__main__":
    main()
