"""Commands of the distributed mode: worker, requeue, retrain, and what `ingest --distributed` runs.

They register on shapstack.cli's group when shapstack.cli.main loads this module. Sending needs a
broker and a database every worker reaches; nothing here imports torch.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import click

from shapstack.cli import _bundle_path, _progress, cli, print_ingest_summary, print_run_summary, session_factory
from shapstack.settings import Settings

# --status of requeue -> product statuses it sends back
REQUEUE = {"failed": ("failed", "dead"), "dead": ("dead",), "pending": ("pending",), "all": ("pending", "failed", "dead")}


def _sender(settings: Settings):
    """The Celery app configured from these settings, after the deployment check."""
    from workers.app import check_deployment, configure

    check_deployment(settings, allow_sqlite=os.environ.get("SHAPSTACK_ALLOW_SQLITE") == "1")
    app = configure(settings)
    # a person waits: a broker that is down is said in seconds, not after a worker's patience
    app.conf.task_publish_retry_policy = {"max_retries": 3, "interval_start": 0, "interval_step": 1, "interval_max": 1}
    return app


@contextmanager
def _sending(what: str) -> Iterator[None]:
    """A broker error while sending, as one line for the user."""
    from workers.errors import describe, is_transient

    try:
        yield
    except Exception as exc:
        if is_transient(exc):
            raise ValueError(f"cannot reach the broker to send {what}: {describe(exc)}") from None
        raise


def submit_feed(settings: Settings, feed: str, *, wait: bool) -> int:
    """`shapstack ingest FEED --distributed`: create the run here (its id is known at once) and send
    its ingest to the workers; with wait, follow it to the end and print the embedded mode's summary."""
    from db.store import create_run, register_model
    from pipeline.bundle import read_manifest
    from workers.context import stacker_names
    from workers.dispatch import send_ingest

    _sender(settings)
    bundle = str(Path(_bundle_path(settings)).resolve())
    manifest = read_manifest(bundle)
    if settings.stacker not in stacker_names(bundle):
        raise ValueError(f"bundle {bundle} has no stacker {settings.stacker!r}")
    factory = session_factory(settings)
    with factory() as s, s.begin():
        version = register_model(s, {**manifest, "bundle_id": manifest["content_hash"][:16]}, bundle)
        run_id = create_run(s, str(Path(feed).resolve()), "distributed", bundle_id=version, stacker=settings.stacker)
    with _sending(f"run {run_id} (the sweeper sends it once the broker is back)"):
        send_ingest(run_id)
    click.echo(f"run {run_id}: {feed} queued for the ingest workers")
    if not wait:
        click.echo(f"follow it with: shapstack status {run_id}")
        return run_id
    progress = follow(factory, run_id)
    summarise(factory, progress, manifest["labels"])
    return run_id


def follow(factory, run_id: int, poll_s: float = 1.0) -> dict:
    """Poll the run's progress (from the database) until it is done or failed."""
    from db.store import run_progress

    with _progress("classify", unit=" products") as bar:
        while True:
            with factory() as s:
                p = run_progress(s, run_id)
            bar.total = p["products"]
            bar.n = p["predicted"] + p["dead"] + p["by_status"].get("failed", 0)
            bar.refresh()
            if p["status"] in ("done", "failed"):
                return p
            time.sleep(poll_s)


def summarise(factory, p: dict, labels) -> None:
    from db.runs import output_rows

    run_id = p["run"]
    print_ingest_summary(factory, run_id)
    if p["status"] == "failed":
        raise ValueError(f"run {run_id} failed: {p['error']}")
    with factory() as s:
        rows = output_rows(s, run_id)
    click.echo(f"classified {len(rows)} products with stacker {p['stacker']} on the workers "
               f"({p['timings'].get('wall_s', float('nan')):.1f} s)")
    print_run_summary(factory, run_id, rows, labels)
    failed = p["by_status"].get("failed", 0)
    if failed or p["dead"]:
        click.echo(f"{failed} products failed, {p['dead']} dead-lettered: `shapstack status {run_id} --json` "
                   f"lists them, `shapstack requeue {run_id} --status failed` sends them again")


@cli.command()
@click.option("--queues", "-Q", default="ingest,infer,stack", show_default=True,
              help="Comma-separated queues to serve: ingest, infer, stack, train.")
@click.option("--concurrency", "-c", default=1, show_default=True, type=click.IntRange(1),
              help="Worker processes (infer: one per GPU, or per core on a CPU).")
@click.option("--loglevel", "-l", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
@click.option("--beat", is_flag=True, help="Also schedule the sweeper and the collapse aggregation (one per deployment).")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1), help="torch threads per worker process.")
@click.option("--pool", default="prefork", show_default=True, type=click.Choice(["prefork", "solo", "threads"]))
@click.option("--hostname", "-n", help="Node name (default: <queues>.<pid>@<host>).")
@click.option("--allow-sqlite", is_flag=True, help="Accept a SQLite database (workers on this one machine only).")
@click.pass_context
def worker(ctx: click.Context, queues: str, concurrency: int, loglevel: str, beat: bool, threads: int, pool: str,
           hostname: str | None, allow_sqlite: bool) -> None:
    """Run a Celery worker (SIGTERM or Ctrl-C: stop after the current batch)."""
    from workers.app import check_deployment, configure
    from workers.queues import parse_queues

    settings: Settings = ctx.obj
    names = parse_queues(queues)
    check_deployment(settings, allow_sqlite=allow_sqlite)
    app = configure(settings, torch_threads=threads, allow_sqlite=allow_sqlite)
    argv = ["worker", f"--queues={','.join(names)}", f"--concurrency={concurrency}", f"--loglevel={loglevel.upper()}",
            f"--pool={pool}", f"--hostname={hostname or '.'.join(names) + f'.{os.getpid()}@%h'}"]
    app.worker_main(argv + (["--beat"] if beat else []))


@cli.command()
@click.argument("run", type=int)
@click.option("--status", "which", type=click.Choice(list(REQUEUE)), default="failed", show_default=True,
              help="failed: failed and dead-lettered products; dead: dead-lettered only; "
                   "pending: not finished yet; all: every product not done.")
@click.pass_context
def requeue(ctx: click.Context, run: int, which: str) -> None:
    """Send products of RUN back to the workers (a run whose ingest died resumes its ingest)."""
    from db import models as m
    from db.store import requeue as requeue_products
    from workers.dispatch import send_batches, send_ingest

    settings: Settings = ctx.obj
    _sender(settings)
    factory = session_factory(settings)
    with factory() as s, s.begin():
        row = s.get(m.Run, run)
        if row is None:
            raise ValueError(f"no run {run}")
        if not row.bundle_id:
            raise ValueError(f"run {run} has no model bundle: it was only ingested (classify it, "
                             "or ingest the feed again with --distributed)")
        status = row.status
        pks = requeue_products(s, run, REQUEUE[which])
    with _sending(f"run {run} (its products are pending: the sweeper sends them once the broker is back)"):
        if status in ("ingesting", "ingested", "failed"):
            send_ingest(run)  # a resumed ingest sends every pending product of the feed
            click.echo(f"run {run}: ingest sent again (it was {status})")
            return
        n = send_batches(run, pks)
    click.echo(f"run {run}: requeued {len(pks)} products ({which}) in {n} batches")


@cli.command()
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Bundle directory to write (a path the train workers see).")
@click.option("--preset", default="small", show_default=True, type=click.Choice(["tiny", "small", "paper"]))
@click.option("--run", "runs", multiple=True, type=int, help="Train on this run's labelled products (repeatable; default: all runs).")
@click.option("--folds", default=5, show_default=True, type=click.IntRange(1))
@click.option("--min-class-size", default=20, show_default=True, type=click.IntRange(1))
@click.option("--epochs", type=click.IntRange(1), help="Override the preset's epochs for every model.")
@click.option("--mmshap-budget", type=click.IntRange(0), help="Coalitions per product for out-of-fold MM-SHAP.")
@click.option("--seed", default=0, show_default=True)
@click.pass_context
def retrain(ctx: click.Context, out: str, preset: str, runs: tuple[int, ...], folds: int, min_class_size: int,
            epochs: int | None, mmshap_budget: int | None, seed: int) -> None:
    """Queue training of a new bundle on the labelled products in the database (queue: train)."""
    from workers.dispatch import send_train
    from workers.retrain import count_labelled

    settings: Settings = ctx.obj
    _sender(settings)
    n = count_labelled(session_factory(settings), runs)
    if not n:
        raise ValueError(f"no labelled products in {'runs ' + ', '.join(map(str, runs)) if runs else 'the database'}")
    config = {"preset": preset, "folds": folds, "min_class_size": min_class_size, "seed": seed,
              "mmshap_mode": settings.mmshap_image_mode, "epochs": epochs, "mmshap_budget": mmshap_budget}
    config = {k: v for k, v in config.items() if v is not None}
    out = str(Path(out).resolve())
    with _sending("the training task"):
        task_id = send_train(out, runs, config)
    click.echo(f"queued training of {out} on {n} labelled product rows (task {task_id}, queue train)")
