"""MM-SHAP cost and accuracy per product: our batched estimator against the reference procedure.

Reference (Parcalabescu & Frank's MM-SHAP code): 10 antithetic permutations, one forward pass per
coalition (batch size 1), so 2 * 10 * (n + 1) passes per product. Ours: estimate_shapley at a
fixed budget, coalitions of all products in shared batches. Both are scored by the absolute error
of T-SHAP against a 20,000-evaluation estimate of the same product (our estimator; its stderr is
printed so the yardstick's own noise is visible).

    .venv/bin/python benchmarks/bench_mmshap.py --bundle BUNDLE --feed FEED [--products 8]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pipeline.backend import InProcessBackend
from pipeline.bundle import load_bundle
from pipeline.explain import explain, predicted_classes, product_game
from pipeline.feed import read_feed
from pipeline.mmshap import mm_shap, reference_permutation_shapley
from pipeline.records import Product


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--feed", required=True)
    ap.add_argument("--products", type=int, default=8)
    ap.add_argument("--budgets", default="64,128,256,512")
    ap.add_argument("--truth", type=int, default=20_000)
    ap.add_argument("--modes", default="token,pixel")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    backend = InProcessBackend(load_bundle(args.bundle, device="cpu"), device="cpu", batch_size=256)
    products = [p for p in read_feed(args.feed) if isinstance(p, Product) and p.has_text and p.has_image]
    products = products[:: max(1, len(products) // args.products)][: args.products]
    enc = backend.encode(products)
    pred = predicted_classes(backend, enc)
    print(f"{len(products)} products, bundle {args.bundle}, {args.threads} threads")
    print(f"{'mode':<6} {'method':<22} {'evals/product':>14} {'s/product':>10} {'|T err| mean':>13} {'max':>7}")
    for mode in args.modes.split(","):
        truth = explain(backend, enc, budget=args.truth, mode=mode, predicted=pred)
        print(f"{mode:<6} {'truth (20k evals)':<22} {int(truth.n_evaluations.mean()):>14} {'':>10} "
              f"{'stderr':>13} {truth.stderr.mean():7.4f}")
        # the reference: one forward pass per coalition
        errs, evals, started = [], [], time.perf_counter()
        one = InProcessBackend(backend.bundle, device="cpu", batch_size=1)
        for i in range(len(products)):
            value, text = product_game(one, enc, i, mode, pred)
            phi, n_eval = reference_permutation_shapley(value, len(text), n_permutations=10, seed=i)
            errs.append(abs(mm_shap(phi, text)[0] - truth.t_shap[i]))
            evals.append(n_eval)
        wall = (time.perf_counter() - started) / len(products)
        print(f"{mode:<6} {'reference 10 perm':<22} {int(np.mean(evals)):>14} {wall:10.3f} {np.mean(errs):13.4f} {np.max(errs):7.4f}")
        for budget in map(int, args.budgets.split(",")):
            started = time.perf_counter()
            res = explain(backend, enc, budget=budget, mode=mode, predicted=pred, seed=1)
            wall = (time.perf_counter() - started) / len(products)
            err = np.abs(res.t_shap - truth.t_shap)
            print(f"{mode:<6} {f'ours, budget {budget}':<22} {int(res.n_evaluations.mean()):>14} {wall:10.3f} "
                  f"{err.mean():13.4f} {err.max():7.4f}")


if __name__ == "__main__":
    main()
