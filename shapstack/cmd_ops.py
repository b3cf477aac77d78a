"""Commands of the distributed mode: worker, requeue, retrain, and what `classify --distributed` runs.

Sending needs a broker and a database every worker reaches; nothing here imports torch.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import click

from db import models as m
from db.engine import check_schema
from db.products import count_labelled
from db.products import requeue as requeue_products
from db.progress import run_progress
from db.retrains import abandon_dead
from db.retrains import list_retrains as recent_retrains
from db.runs import create_run, register_model, set_run
from jobs.export import export
from pipeline.errors import UserError
from pipeline.manifest import bundle_id, read_manifest, require_bundle
from pipeline.presets import preset_names
from pipeline.split import split_selector
from shapstack.checkpoint_options import checkpoint_options, checkpoints_of, tfidf_option
from shapstack.group import cli, echo_for, json_option, progress_bar, session_factory, settings_of
from shapstack.settings import Settings
from shapstack.summaries import print_ingest_summary, print_json, print_run_summary, run_summary
from workers import heartbeat, metrics
from workers.app import check_deployment, create_app
from workers.dispatch import send_batches, send_ingest, send_train
from workers.queues import DEFAULT as DEFAULT_QUEUES
from workers.queues import parse_queues, with_beat
from workers.retries import describe, is_transient

log = logging.getLogger(__name__)

# --status of requeue -> product statuses it sends back
REQUEUE = {"failed": ("failed", "dead"), "dead": ("dead",), "pending": ("pending",), "all": ("pending", "failed", "dead")}


def _sender(settings: Settings):
    """The Celery app configured from these settings, after the deployment check."""
    check_deployment(settings, allow_sqlite=os.environ.get("SHAPSTACK_ALLOW_SQLITE") == "1")
    app = create_app(settings)
    # a person waits: a broker that is down is said in seconds, not after a worker's patience
    app.conf.task_publish_retry_policy = {"max_retries": 3, "interval_start": 0, "interval_step": 1, "interval_max": 1}
    return app


@contextmanager
def _sending(what: str) -> Iterator[None]:
    """A broker error while sending, as one line for the user."""
    try:
        yield
    except Exception as exc:
        if is_transient(exc):
            raise UserError(f"cannot reach the broker to send {what}: {describe(exc)}") from None
        raise


def submit(settings: Settings, *, feed: str | None = None, run: int | None = None, split: str = "all",
           wait: bool = False, timeout_s: float | None = None, out: str | None = None, echo=click.echo) -> dict:
    """`shapstack classify FEED|--run RUN --distributed`: the run gets its bundle, stacker and
    options here (its id is known at once), then the workers get its ingest (a feed) or its
    pending products (an ingested run); with wait, follow it to the end and return the summary
    the embedded mode prints."""
    from jobs.models import mmshap_run_options  # torch: only for the command that needs it
    from pipeline.stackers import stacker_names

    _sender(settings)
    bundle = str(Path(require_bundle(settings.bundle)).resolve())
    manifest = read_manifest(bundle)
    if settings.stacker not in stacker_names(bundle):
        raise UserError(f"bundle {bundle} has no stacker {settings.stacker!r}")
    split_selector(manifest, split)  # a split the bundle does not have is said here, not on a worker
    options = {"split": split, **mmshap_run_options(settings)}
    factory = session_factory(settings)
    with factory() as s, s.begin():
        version = register_model(s, bundle_id(manifest), manifest, bundle)
        if run is None:
            run = create_run(s, str(Path(feed).resolve()), "distributed", bundle_id=version, stacker=settings.stacker)
            set_run(s, run, options=options)
            pks = None
        else:
            pks = claim_ingested(s, run, version, settings.stacker, options)
    with _sending(f"run {run} (the sweeper sends it once the broker is back)"):
        if pks is None:
            send_ingest(run)
            echo(f"run {run}: {feed} queued for the ingest workers")
        else:
            n = send_batches(run, pks)
            echo(f"run {run}: {len(pks)} products queued for the infer workers in {n} batches")
    if not wait:
        echo(f"follow it with: shapstack status {run}")
        return {"run": run, "status": "queued", "options": options}
    progress = follow(factory, run, timeout_s=timeout_s)
    summary = summarise(factory, progress, manifest["labels"], echo)
    if out:
        export(factory, run, out)
        echo(f"wrote {out}")
    return {**summary, "out": out}


def claim_ingested(s, run_id: int, version: str, stacker: str, options: dict) -> list[int]:
    """An ingested run handed to the workers: its bundle, stacker and options set, status
    classifying; returns its products to send (pending and failed ones)."""
    row = s.get(m.Run, run_id)
    if row is None:
        raise UserError(f"no run {run_id}")
    if row.status in ("ingesting", "classifying"):
        raise UserError(f"run {run_id} is {row.status}: follow it with `shapstack status {run_id}`")
    pks = requeue_products(s, run_id, ("pending", "failed"))
    if not pks:
        raise UserError(f"run {run_id} has no product left to classify (status {row.status})")
    set_run(s, run_id, bundle_id=version, stacker=stacker, options=options, status="classifying", finished_at=None)
    return pks


def follow(factory, run_id: int, poll_s: float = 1.0, timeout_s: float | None = None) -> dict:
    """Poll the run's progress (from the database) until it is over (done, with failures, or failed)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with progress_bar("classify", unit=" products") as bar:
        while True:
            with factory() as s:
                p = run_progress(s, run_id)
            bar.total = p["products"]
            bar.n = p["predicted"] + p["dead"] + p["failed"]
            bar.refresh()
            if p["status"] in ("done", "done_with_failures", "failed"):
                return p
            if deadline is not None and time.monotonic() > deadline:
                raise UserError(f"run {run_id} not finished after {timeout_s:g} s ({p['status']}, "
                                f"{bar.n} of {bar.total} products): `shapstack status {run_id}` follows it")
            time.sleep(poll_s)


def summarise(factory, p: dict, labels, echo=click.echo) -> dict:
    """Print a finished run's summary; returns it (failed and dead: how many products did not make it)."""
    run_id = p["run"]
    print_ingest_summary(factory, run_id, echo)
    if p["status"] == "failed":
        raise UserError(f"run {run_id} failed: {p['error']}")
    summary = run_summary(factory, run_id, labels)
    echo(f"classified {summary['predicted']} products with stacker {p['stacker']} on the workers "
         f"({p['timings'].get('wall_s', float('nan')):.1f} s)")
    print_run_summary(summary, echo)
    if summary["failed"] or summary["dead"]:
        echo(f"{summary['failed']} products failed, {summary['dead']} dead-lettered: `shapstack dead-letters {run_id}` "
             f"lists them, `shapstack requeue {run_id} --status failed` sends them again")
    return summary


@cli.command()
@click.option("--queues", "-Q", default=DEFAULT_QUEUES, show_default=True,
              help="Comma-separated queues to serve: ingest, infer, stack, aggregate, train (--beat adds aggregate).")
@click.option("--concurrency", "-c", default=1, show_default=True, type=click.IntRange(1),
              help="Worker processes (infer: one per GPU, or per core on a CPU).")
@click.option("--loglevel", "-l", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
@click.option("--beat", is_flag=True, help="Also schedule the sweeper and the collapse aggregation (one per deployment); serves aggregate.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1), help="torch threads per worker process.")
@click.option("--pool", default="prefork", show_default=True, type=click.Choice(["prefork", "solo", "threads"]))
@click.option("--hostname", "-n", help="Node name (default: <queues>.<pid>@<host>).")
@click.option("--allow-sqlite", is_flag=True, help="Accept a SQLite database (workers on this one machine only).")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False),
              help="Model bundle folder on this machine (default: settings.bundle); runs name theirs by id.")
@click.option("--metrics-port", type=click.IntRange(1, 65535),
              help="Serve Prometheus metrics (shapstack_*) on this port, at the metrics_host setting (127.0.0.1).")
@click.pass_context
def worker(ctx: click.Context, queues: str, concurrency: int, loglevel: str, beat: bool, threads: int, pool: str,
           hostname: str | None, allow_sqlite: bool, bundle: str | None, metrics_port: int | None) -> None:
    """Run a Celery worker (SIGTERM or Ctrl-C: stop after the current batch).

    The database must be at this shapstack's schema revision (`shapstack db current`); an empty
    database is created, any other is refused until `shapstack db upgrade`.
    """
    settings: Settings = settings_of(ctx, bundle=str(Path(bundle).resolve()) if bundle else None)
    names = parse_queues(queues)
    if beat:
        names = with_beat(names)
    check_deployment(settings, allow_sqlite=allow_sqlite)
    revision = check_schema(settings.database_url)
    app = create_app(settings, torch_threads=threads, allow_sqlite=allow_sqlite)
    argv = ["worker", f"--queues={','.join(names)}", f"--concurrency={concurrency}", f"--loglevel={loglevel.upper()}",
            f"--pool={pool}", f"--hostname={hostname or '.'.join(names) + f'.{os.getpid()}@%h'}"]
    if settings.log_format == "json":
        argv.insert(0, "--quiet")  # no banner: every line of the output is JSON
    path = None
    if metrics_port:
        try:
            path = metrics.serve(metrics_port, settings.metrics_host)
        except OSError as exc:
            raise UserError(f"cannot serve metrics on {settings.metrics_host}:{metrics_port}: {exc.strerror or exc}") from None
        where = f"metrics: http://{settings.metrics_host}:{metrics_port}/metrics; database schema {revision}"
        if settings.log_format == "json":
            log.info(where)
        else:
            click.echo(where, err=True)
    try:
        app.worker_main(argv + (["--beat"] if beat else []))
    finally:
        if path:
            metrics.cleanup(path)
    if heartbeat.stopped_fatally():  # not a clean stop: a supervisor restarting "on-failure" must see it
        ctx.exit(heartbeat.EXIT_WORKER_FATAL)


@cli.command()
@click.argument("run", type=int)
@click.option("--status", "which", type=click.Choice(list(REQUEUE)), default="failed", show_default=True,
              help="failed: failed and dead-lettered products; dead: dead-lettered only; "
                   "pending: not finished yet; all: every product not done.")
@json_option
@click.pass_context
def requeue(ctx: click.Context, run: int, which: str, as_json: bool) -> None:
    """Send products of RUN back to the workers (a run whose ingest died resumes its ingest)."""
    settings: Settings = ctx.obj
    _sender(settings)
    factory = session_factory(settings)
    with factory() as s, s.begin():
        row = s.get(m.Run, run)
        if row is None:
            raise UserError(f"no run {run}")
        if not row.bundle_id:
            raise UserError(f"run {run} has no model bundle: it was only ingested "
                            f"(classify it with `shapstack classify --run {run} [--distributed]`)")
        status = row.status
        pks = requeue_products(s, run, REQUEUE[which])
    with _sending(f"run {run} (its products are pending: the sweeper sends them once the broker is back)"):
        if status in ("ingesting", "ingested", "failed"):
            send_ingest(run)  # a resumed ingest sends every pending product of the feed
            echo_for(as_json)(f"run {run}: ingest sent again (it was {status})")
            if as_json:
                print_json({"run": run, "ingest_resent": True, "was": status, "requeued": len(pks), "batches": 0})
            return
        n = send_batches(run, pks)
    echo_for(as_json)(f"run {run}: requeued {len(pks)} products ({which}) in {n} batches")
    if as_json:
        print_json({"run": run, "ingest_resent": False, "was": status, "requeued": len(pks), "batches": n,
                    "which": which})


@cli.command()
@click.option("--out", type=click.Path(file_okay=False),
              help="Bundle directory to write (a path the train workers see); required unless --list.")
@click.option("--list", "list_only", is_flag=True,
              help="List recent retrains and their state instead (one whose worker died is marked failed first).")
@click.option("--preset", default="small", show_default=True, type=click.Choice(preset_names()))
@click.option("--run", "runs", multiple=True, type=int, help="Train on this run's labelled products (repeatable; default: all runs).")
@click.option("--folds", default=5, show_default=True, type=click.IntRange(1))
@click.option("--min-class-size", default=20, show_default=True, type=click.IntRange(1))
@click.option("--epochs", type=click.IntRange(1), help="Override the preset's epochs for every model.")
@click.option("--mmshap-budget", type=click.IntRange(0), help="Coalitions per product for out-of-fold MM-SHAP.")
@click.option("--seed", default=0, show_default=True)
@tfidf_option
@checkpoint_options
@json_option
@click.pass_context
def retrain(ctx: click.Context, out: str | None, list_only: bool, preset: str, runs: tuple[int, ...], folds: int,
            min_class_size: int, epochs: int | None, mmshap_budget: int | None, seed: int, tfidf: bool | None,
            as_json: bool, **checkpoints: str | None) -> None:
    """Queue training of a new bundle on the labelled products in the database (queue: train)."""
    settings: Settings = ctx.obj
    if list_only:
        return list_retrains(settings, as_json)
    if not out:
        raise click.UsageError("--out is required (or --list)")
    _sender(settings)
    n = count_labelled(session_factory(settings), runs)
    if not n:
        raise UserError(f"no labelled products in {'runs ' + ', '.join(map(str, runs)) if runs else 'the database'}")
    config = {"preset": preset, "folds": folds, "min_class_size": min_class_size, "seed": seed,
              "mmshap_mode": settings.mmshap_image_mode, "epochs": epochs, "mmshap_budget": mmshap_budget, "tfidf": tfidf,
              "checkpoints": checkpoints_of(**checkpoints) or None}
    config = {k: v for k, v in config.items() if v is not None}
    out = str(Path(out).resolve())
    with _sending("the training task"):
        task_id = send_train(out, runs, config)
    echo_for(as_json)(f"queued training of {out} on {n} labelled product rows (task {task_id}, queue train)")
    if as_json:
        print_json({"task": task_id, "out": out, "labelled": n, "runs": list(runs), "config": config})


def list_retrains(settings: Settings, as_json: bool) -> None:
    """Recent retrains from the database; those whose worker died are marked failed first."""
    with session_factory(settings)() as s, s.begin():
        abandon_dead(s, heartbeat.dead_after_s(settings))
        rows = [{"id": r.id, "state": r.state, "started": r.started_at, "finished": r.finished_at, "out": r.out,
                 "runs": r.runs, "bundle": r.bundle_id, "worker": r.claimed_by, "error": r.error}
                for r in recent_retrains(s)]
    if as_json:
        return print_json(rows)
    if not rows:
        click.echo("no retrains yet")
    for r in rows:
        runs = ",".join(map(str, r["runs"])) or "all"
        click.echo(f"retrain {r['id']}: {r['state']}  started {r['started']:%Y-%m-%d %H:%M:%S}  out {r['out']}  "
                   f"runs {runs}  bundle {r['bundle'] or '-'}  worker {r['worker'] or '-'}")
        if r["error"]:
            click.echo(f"  error: {r['error']}")
