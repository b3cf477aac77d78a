"""Throughput (products/s) of the distributed mode with 1 and 2 infer workers against the embedded mode.

Same bundle, same feed, same MM-SHAP budget and batch size, all on this machine. Each timing runs
one feed from ingest to the run marked done, after a warm-up run (models loaded, caches hot), and
is the best of --repeat runs (the machine is shared: other jobs come and go).

- embedded: jobs.ingest.ingest_feed + jobs.classify.classify_run in this process on SQLite, as
  `shapstack classify` runs them; with torch's default thread count (one per core), and with one.
- distributed: N `shapstack worker --queues infer` processes (one torch thread each) and one
  `--queues ingest,stack` worker over Redis and PostgreSQL; the feed is sent with
  `shapstack classify --distributed` and timed from the run's created_at to its finished_at (the
  sending command's own start-up is not the workers' throughput).

    .venv/bin/python benchmarks/bench_distributed.py --preset small --products 1000

Needs PostgreSQL and Redis (the test services); writes nothing outside --work.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("SHAPSTACK_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("SHAPSTACK_TEST_REDIS_URL", "redis://127.0.0.1:6379/0").rsplit("/", 1)[0] + "/14"


def prepare(work: Path, preset: str, products: int) -> tuple[Path, Path, Path]:
    """(bundle, warm-up feed, measured feed); the bundle is trained once and kept in work."""
    from pipeline.synthetic import make_catalogue
    from train.data import TrainConfig
    from train.train_bundle import train_bundle

    bundle = work / f"bundle-{preset}"
    if not (bundle / "manifest.json").exists():
        feed = make_catalogue(work / "train", 600, 6, seed=1, image_size=96)
        cfg = TrainConfig(preset=preset, folds=1, min_class_size=5, mmshap_budget=16, epochs=1, stackers=("mmshap",))
        train_bundle(feed, bundle, cfg, log=print)
    warm = make_catalogue(work / "warm", 64, 6, seed=2, image_size=96)
    feed = make_catalogue(work / f"feed-{products}", products, 6, seed=3, image_size=96)
    return bundle, warm, feed


def embedded(url: str, bundle: Path, feeds: list[Path], budget: int, mode: str, batch: int,
             threads: int | None) -> float:
    """Best seconds over feeds[1:] (feeds[0] warms up), ingest included."""
    import torch

    from db.engine import connect
    from db.runs import register_model
    from jobs.classify import classify_run
    from jobs.ingest import ingest_feed
    from pipeline.backend import InProcessBackend
    from pipeline.bundle import load_bundle
    from pipeline.collapse import Thresholds
    from pipeline.mmshap import MMShapConfig
    from pipeline.records import Limits
    from pipeline.stackers import load_stackers

    if threads:
        torch.set_num_threads(threads)
    factory = connect(url)
    b = load_bundle(bundle, device="cpu")
    with factory() as s, s.begin():
        version = register_model(s, b.bundle_id, b.manifest, str(bundle))
    backend = InProcessBackend(b, device="cpu", batch_size=batch)
    stacker = load_stackers(bundle, ["mmshap"])["mmshap"]
    times = []
    for feed in feeds:
        t0 = time.perf_counter()
        run = ingest_feed(factory, feed, Limits())
        classify_run(factory, backend, stacker, b.manifest, version, run, batch_size=batch,
                     mmshap=MMShapConfig(mode=mode, budget=budget), thresholds=Thresholds())
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def distributed(work: Path, url: str, bundle: Path, feeds: list[Path], budget: int, mode: str, batch: int,
                infer_workers: int) -> float:
    """Best seconds over feeds[1:] (feeds[0] warms up), ingest included."""
    import redis

    redis.Redis.from_url(REDIS).flushdb()
    env = {**os.environ, "SHAPSTACK_DATABASE_URL": url, "SHAPSTACK_BROKER_URL": REDIS, "SHAPSTACK_BUNDLE": str(bundle),
           "SHAPSTACK_DEVICE": "cpu", "SHAPSTACK_MMSHAP_BUDGET": str(budget),
           "SHAPSTACK_MMSHAP_IMAGE_MODE": mode, "SHAPSTACK_INFER_BATCH_SIZE": str(batch),
           "SHAPSTACK_BATCH_SIZE": str(batch)}
    shapstack = [sys.executable, "-m", "shapstack"]
    specs = [(f"infer{i}", ["-Q", "infer"]) for i in range(infer_workers)] + [("rest", ["-Q", "ingest,stack", "--beat"])]
    procs = []
    try:
        for name, args in specs:
            with open(work / f"{name}.log", "w") as log:
                procs.append(subprocess.Popen([*shapstack, "worker", *args, "-n", f"{name}@%h", "-l", "warning"],
                                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        from sqlalchemy import create_engine, text

        engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
        times = []
        for feed in feeds:
            r = subprocess.run([*shapstack, "classify", str(feed), "--distributed", "--json"], env=env,
                               capture_output=True, text=True, check=True)
            run = json.loads(r.stdout)["run"]
            while True:
                with engine.connect() as conn:
                    status, seconds = conn.execute(text(
                        "SELECT status, extract(epoch FROM finished_at - created_at) FROM runs WHERE id = :r"),
                        {"r": run}).one()
                if status == "done":
                    break
                time.sleep(0.2)
            with engine.connect() as conn:
                predicted = conn.execute(text("SELECT count(*) FROM predictions WHERE run_id = :r"), {"r": run}).scalar()
            if predicted != sum(1 for _ in open(feed)) - 1:
                raise RuntimeError(f"run {run}: {predicted} predictions; see the worker logs in {work}")
            times.append(float(seconds))
        engine.dispose()
        return min(times[1:])
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            p.wait(60)


def fresh_database() -> str:
    import psycopg

    name = f"shapstack_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + name


def drop_database(url: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", choices=["tiny", "small"])
    ap.add_argument("--products", type=int, default=1000)
    ap.add_argument("--budget", type=int, default=16, help="MM-SHAP coalitions per product")
    ap.add_argument("--mode", default="pixel", choices=["pixel", "token"], help="MM-SHAP image players")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--work", default="/tmp/shapstack-bench-distributed")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the workers on the way out
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bundle, warm, feed = prepare(work, args.preset, args.products)
    feeds = [warm] + [feed] * args.repeat
    results = {}
    sqlite = work / "embedded.db"
    for threads in (None, 1):
        for f in work.glob("embedded.db*"):
            f.unlink()
        name = f"embedded, {'default' if threads is None else threads} torch thread{'s' * (threads != 1)}"
        results[name] = embedded(f"sqlite:///{sqlite}", bundle, feeds, args.budget, args.mode, args.batch, threads)
    for workers in (1, 2):
        url = fresh_database()
        try:
            results[f"distributed, {workers} infer worker{'s' * (workers > 1)}"] = distributed(
                work, url, bundle, feeds, args.budget, args.mode, args.batch, workers)
        finally:
            drop_database(url)
    print(f"preset {args.preset}, {args.products} products, MM-SHAP {args.mode} budget {args.budget}, batch {args.batch}, "
          f"best of {args.repeat}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end")
    for name, seconds in results.items():
        print(f"{name:<45} {seconds:7.1f} s  {args.products / seconds:7.1f} products/s")
    (work / "results.json").write_text(json.dumps({**vars(args), "seconds": results}, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
