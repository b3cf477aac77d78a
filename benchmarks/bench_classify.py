"""Embedded `shapstack classify` throughput: products/s with and without MM-SHAP, peak memory.

Each configuration runs in its own process (so ru_maxrss is that run's peak) against a fresh
SQLite file, through the same code path as the CLI.

    .venv/bin/python benchmarks/bench_classify.py --bundle BUNDLE --feed FEED [--configs 0:pixel,target:pixel]

A configuration is BUDGET:MODE: a fixed number of coalitions per product (0: MM-SHAP off), or
"target" for the default policy (target stderr 0.03, cap 4000), in pixel or token mode.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(bundle: str, feed: str, budget: int | None, mode: str, split: str) -> dict:
    from db.engine import connect
    from db.models import Run
    from jobs.classify import classify_feed
    from shapstack.settings import load_settings

    db = Path(tempfile.mkdtemp()) / "bench.db"
    settings = load_settings(env={}, database_url=f"sqlite:///{db}", bundle=bundle, mmshap_budget=budget,
                             mmshap_image_mode=mode)
    started = time.perf_counter()
    run_id, _ = classify_feed(connect(settings.database_url), settings, feed, split=split)
    wall = time.perf_counter() - started

    with connect(settings.database_url)() as s:
        run = s.get(Run, run_id)
        return {"budget": budget, "mode": mode, "products": run.n_products, "wall_s": wall, **run.timings,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--feed", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--configs", default="0:pixel,target:pixel,target:token")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        budget, mode = args.one.split(":")
        print(json.dumps(one(args.bundle, args.feed, None if budget == "target" else int(budget), mode, args.split)))
        return
    print(f"{'MM-SHAP':<14} {'products':>8} {'wall s':>8} {'prod/s':>8} {'infer s':>8} {'stack s':>8} {'peak MB':>8}")
    base = None
    for config in args.configs.split(","):
        out = subprocess.run([sys.executable, __file__, "--bundle", args.bundle, "--feed", args.feed,
                              "--split", args.split, "--one", config], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        label = "off" if r["budget"] == 0 else f"{r['mode']} {r['budget'] or 'target'}"
        base = r["infer_s"] if r["budget"] == 0 else base
        share = f"  MM-SHAP {100 * (r['infer_s'] - base) / r['wall_s']:.0f}% of wall" if base is not None and r["budget"] != 0 else ""
        print(f"{label:<14} {r['products']:>8} {r['wall_s']:8.1f} {r['products'] / r['wall_s']:8.2f} "
              f"{r['infer_s']:8.1f} {r['stack_s']:8.1f} {r['peak_rss_mb']:8.0f}{share}")


if __name__ == "__main__":
    main()
