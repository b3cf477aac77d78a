"""Ingest throughput (rows/s) and peak memory (RSS) of `jobs.ingest.ingest_feed`, as `shapstack ingest`
runs it: a 1,000,000-row CSV without images, and a 10,000-row CSV whose every row has its own
JPEG (read, fully decoded, hashed and snapshotted into the image store).

Each case runs in a fresh child process, so that its peak RSS (VmHWM) is its own; the feeds are
generated in a temporary folder first (not timed).

    .venv/bin/python benchmarks/bench_ingest.py                       # SQLite in the temp folder
    .venv/bin/python benchmarks/bench_ingest.py --db postgresql://postgres@127.0.0.1:5432/bench

--db must name an empty database (or a SQLite file that does not exist yet).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_plain(path: Path, n: int) -> None:
    with open(path, "w") as fh:
        fh.write("product_id,title,description,category,group_id,brand\n")
        for i in range(n):
            fh.write(f"P{i:08d},Product {i} title,A description of product {i} with a few words,"
                     f"cat{i % 31},g{i % 5000},brand{i % 97}\n")


def write_images(folder: Path, n: int) -> Path:
    from PIL import Image

    (folder / "img").mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (96, 96), ((i * 7) % 256, (i * 13) % 256, (i * 29) % 256)).save(
            folder / "img" / f"{i}.jpg", quality=90)
    path = folder / "feed.csv"
    with open(path, "w") as fh:
        fh.write("product_id,title,description,image,category\n")
        for i in range(n):
            fh.write(f"P{i:08d},Product {i},Description {i},img/{i}.jpg,cat{i % 31}\n")
    return path


def one(feed: str, db: str, store: str) -> dict:
    """Run in the child: ingest feed, report wall time, rows and peak RSS."""
    from db.engine import connect
    from db.progress import run_progress
    from jobs.ingest import ingest_feed
    from pipeline.records import Limits

    factory = connect(db)
    t0 = time.perf_counter()
    run = ingest_feed(factory, feed, Limits(image_store=store), batch_size=256)
    wall = time.perf_counter() - t0
    with factory() as s:
        p = run_progress(s, run)
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    return {"rows": p["products"] + p["rejects"], "products": p["products"], "wall_s": round(wall, 1),
            "rows_per_s": round((p["products"] + p["rejects"]) / wall), "peak_rss_mb": hwm // 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", help="database URL (default: a SQLite file in the temp folder)")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--image-rows", type=int, default=10_000)
    ap.add_argument("--one", nargs=3, metavar=("FEED", "DB", "STORE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        db = args.db or f"sqlite:///{tmp / 'bench.db'}"
        plain = tmp / "plain.csv"
        write_plain(plain, args.rows)
        images = write_images(tmp / "images", args.image_rows)
        results = {}
        for name, feed in ((f"{args.rows:,} rows, no images", plain), (f"{args.image_rows:,} rows with images", images)):
            r = subprocess.run([sys.executable, __file__, "--one", str(feed), db, str(tmp / "store")],
                               capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if r.returncode:
                sys.exit(r.stderr)
            results[name] = json.loads(r.stdout.strip().splitlines()[-1])
            print(name, results[name], flush=True)
        print("| feed | database | rows | wall (s) | rows/s | peak RSS (MB) |")
        print("|---|---|---|---|---|---|")
        kind = db.split(":", 1)[0]
        for name, r in results.items():
            print(f"| {name} | {kind} | {r['rows']:,} | {r['wall_s']} | {r['rows_per_s']:,} | {r['peak_rss_mb']} |")


if __name__ == "__main__":
    main()
