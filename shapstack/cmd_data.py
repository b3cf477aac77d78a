"""Commands over feeds and runs: make-catalogue, ingest, classify, status, dead-letters, export, report, demo."""

from __future__ import annotations

import time
from pathlib import Path

import click

from db.progress import dead_letters, reject_reasons, run_progress
from db.results import audit_error
from db.runs import latest_runs
from jobs.export import check_output_path, export
from pipeline.errors import UserError
from pipeline.feed import check_feed
from pipeline.manifest import read_manifest
from pipeline.synthetic import make_catalogue
from shapstack.group import (EXIT_RUN_FAILURES, cli, echo_for, json_option, progress_bar, readonly_factory,
                             session_factory, settings_of)
from shapstack.settings import Settings
from shapstack.summaries import audit_line, print_ingest_summary, print_json, print_run_summary, run_summary

# `shapstack demo`: sized to finish in minutes on 2 CPU cores
DEMO = dict(products=900, classes=8, image_size=64, misleading_text=0.05, drop=0.03, folds=1, epochs=None,
            test_fraction=0.25, mmshap_budget=None)  # None: the default MM-SHAP policy (target stderr, cap)


@cli.command("make-catalogue")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--products", default=600, show_default=True, type=click.IntRange(1))
@click.option("--classes", default=6, show_default=True, type=click.IntRange(2))
@click.option("--seed", default=0, show_default=True)
@click.option("--misleading-text", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Fraction of products whose text is planted from another class.")
@click.option("--drop-image", default=0.0, show_default=True, type=click.FloatRange(0, 1))
@click.option("--drop-text", default=0.0, show_default=True, type=click.FloatRange(0, 1))
@click.option("--image-size", default=96, show_default=True, type=click.IntRange(16, 1024))
@click.option("--kinds", help="Comma-separated modality per class (image, text, both); default cycles them.")
@click.option("--class-seed", type=int, help="Seed of the class definitions (default --seed): same classes, new products.")
def make_catalogue_cmd(out: str, products: int, classes: int, seed: int, misleading_text: float,
                       drop_image: float, drop_text: float, image_size: int, kinds: str | None,
                       class_seed: int | None) -> None:
    """Write a synthetic catalogue (CSV + JPEG images) with known modality reliance per class."""
    feed = make_catalogue(out, products, classes, seed=seed, misleading_text=misleading_text,
                          drop_image=drop_image, drop_text=drop_text, image_size=image_size,
                          kinds=kinds.split(",") if kinds else None, class_seed=class_seed)
    click.echo(f"wrote {products} products in {classes} classes to {feed}")


@cli.command()
@click.argument("feed", type=click.Path())
@click.option("--allow-urls/--no-allow-urls", default=None, help="Allow http(s) image URLs.")
@json_option
@click.pass_context
def ingest(ctx: click.Context, feed: str, allow_urls: bool | None, as_json: bool) -> None:
    """Validate a feed and store its products as a run; unusable rows are stored as rejects.

    `shapstack classify --run RUN` classifies the run afterwards (here or on the workers).
    """
    from jobs.ingest import ingest_feed

    settings = settings_of(ctx, allow_image_urls=allow_urls)
    check_feed(feed)  # before a run exists
    factory = session_factory(settings)
    with progress_bar("ingest") as bar:
        run_id = ingest_feed(factory, feed, settings.limits, batch_size=settings.ingest_batch_size,
                             progress=bar.update)
    summary = print_ingest_summary(factory, run_id, echo_for(as_json))
    echo_for(as_json)(f"classify it with: shapstack classify --run {run_id}")
    if as_json:
        print_json(summary)


def _ago(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


@cli.command()
@click.argument("run", required=False, type=int)
@json_option
@click.pass_context
def status(ctx: click.Context, run: int | None, as_json: bool) -> None:
    """Show recent runs, or one run's per-stage progress, times, failed and dead-lettered products."""
    factory = readonly_factory(ctx.obj)
    with factory() as session:
        if run is None:
            runs = [run_progress(session, r.id) for r in latest_runs(session)]
            if as_json:
                print_json(runs)
                return
            if not runs:
                click.echo("no runs yet")
            else:
                click.echo(f"{'run':>5}  {'status':<11} {'created':<19}  {'wall s':>8} {'products':>8} "
                           f"{'predicted':>9} {'failed':>6} {'dead':>5} {'rejects':>7}  feed")
            for p in runs:
                click.echo(f"{p['run']:>5}  {p['status']:<11} {_ago(p['created']):<19}  {_wall(p):>8} "
                           f"{p['products']:>8} {p['predicted']:>9} {p['failed']:>6} {p['dead']:>5} "
                           f"{p['rejects']:>7}  {p['feed']}")
            return
        p = run_progress(session, run)
        reasons = reject_reasons(session, run)
        audit = audit_error(session, run)
    if as_json:
        print_json({**p, "reject_reasons": dict(reasons), "mmshap_audit": audit})
        return
    click.echo(f"run {p['run']} ({p['mode']}): {p['status']}  feed {p['feed']}")
    click.echo(f"  bundle {p['bundle'] or '-'}  stacker {p['stacker'] or '-'}  "
               f"created {_ago(p['created'])}  finished {_ago(p['finished'])}  wall {_wall(p)} s")
    if p["timings"]:
        click.echo("  timings: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in p["timings"].items()))
    n = max(p["products"], 1)
    for stage in ("inferred", "explained", "predicted", "failed", "dead"):
        click.echo(f"  {stage:<10} {p[stage]:>8} / {p['products']}  ({100 * p[stage] / n:.1f}%)")
    click.echo(f"  rejects    {p['rejects']:>8}")
    for reason, k in reasons.most_common(10):
        click.echo(f"    {k:>7}  {reason}")
    if audit:
        click.echo("  amortized MM-SHAP " + audit_line(audit))
    if p["error"]:
        click.echo(f"  last error: {p['error']}")
    if p["failed"] or p["dead"]:
        click.echo(f"  `shapstack dead-letters {run}` lists the dead-lettered products; "
                   f"`shapstack requeue {run} --status failed` sends failed and dead ones again")


def _wall(p: dict) -> str:
    if p["timings"].get("wall_s") is not None:
        return f"{p['timings']['wall_s']:.1f}"
    if p["created"] and p["finished"]:
        return f"{(p['finished'] - p['created']).total_seconds():.1f}"
    return "-"


@cli.command("dead-letters")
@click.argument("run", type=int)
@json_option
@click.pass_context
def dead_letters_cmd(ctx: click.Context, run: int, as_json: bool) -> None:
    """List the products of RUN parked after repeated failures, with their stage and last error."""
    with readonly_factory(ctx.obj)() as session:
        rows = dead_letters(session, run)
    if as_json:
        print_json(rows)
        return
    if not rows:
        click.echo(f"run {run}: no dead-lettered products")
        return
    click.echo(f"run {run}: {len(rows)} dead-lettered products (`shapstack requeue {run} --status dead` sends them again)")
    for r in rows:
        click.echo(f"  {r['product_id']}  row {r['row']}  {r['stage']}  {r['attempts']} attempts  "
                   f"{_ago(r['at'])}  {' '.join(r['error'].split())[:300]}")


@cli.command("export")
@click.argument("run", type=int)
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="File to write: .csv, .jsonl or .parquet (the suffix picks the format).")
@click.pass_context
def export_cmd(ctx: click.Context, run: int, out: str) -> None:
    """Write RUN's predictions to a file, one row per product (streamed: any run size)."""
    check_output_path(out)
    factory = readonly_factory(ctx.obj)
    with factory() as s:
        run_progress(s, run)  # a run that does not exist is an error, not an empty file
    n = export(factory, run, out)
    click.echo(f"wrote {n} rows to {out}")


def run_classify(settings: Settings, feed: str | None, *, run: int | None = None, split: str = "all",
                 out: str | None = None, echo=click.echo) -> dict:
    """Embedded classify of a feed or an ingested run, with progress bars and the summaries."""
    from jobs.classify import classify_feed, classify_ingested

    factory = session_factory(settings)
    with progress_bar("ingest") as ingest_bar, progress_bar("classify", unit=" products") as bar:
        if run is None:
            run, timings = classify_feed(factory, settings, feed, split=split, ingest_progress=ingest_bar.update,
                                         on_ingested=lambda r: print_ingest_summary(factory, r, echo),
                                         progress=bar.update)
        else:
            timings = classify_ingested(factory, settings, run, progress=bar.update)
    summary = run_summary(factory, run, read_manifest(settings.bundle)["labels"])
    echo(f"classified {summary['predicted']} products with stacker {settings.stacker} "
         f"(infer {timings['infer_s']:.1f} s, stack {timings['stack_s']:.1f} s)")
    print_run_summary(summary, echo)
    if out:
        export(factory, run, out)
        echo(f"wrote {out}")
    return {**summary, "out": out}


@cli.command()
@click.argument("feed", type=click.Path(), required=False)
@click.option("--run", "run", type=int, help="Classify this ingested run (`shapstack ingest`) instead of a feed.")
@click.option("--distributed", is_flag=True, help="Send the work to the Celery workers (broker_url, PostgreSQL).")
@click.option("--wait", is_flag=True, help="With --distributed: follow the run to the end and print its summary.")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), help="Model bundle (default: settings.bundle).")
@click.option("--out", type=click.Path(dir_okay=False),
              help="Write predictions to this .csv, .jsonl or .parquet file (with --distributed: needs --wait).")
@click.option("--stacker", help="mmshap (default) | mmshap-paper | lightgbm | ffn | mean | text | image | multimodal")
@click.option("--mmshap-budget", type=click.IntRange(0),
              help="Fixed coalitions per product instead of a target error (0 = skip MM-SHAP).")
@click.option("--mmshap-target", type=float, help="Target stderr of each product's T-SHAP (default 0.03).")
@click.option("--mmshap-cap", type=click.IntRange(4), help="Coalitions per product at most, with a target (default 4000).")
@click.option("--mmshap-mode", type=click.Choice(["token", "pixel"]), help="Image players (default: the bundle's).")
@click.option("--mmshap-players", type=click.Choice(["token", "word"]), help="Text players: WordPieces or whole words.")
@click.option("--mmshap-method", type=click.Choice(["sampled", "amortized"]),
              help="sampled (default): Shapley sampling per product; amortized: the bundle's explainer predicts T-SHAP.")
@click.option("--mmshap-audit", type=click.FloatRange(0, 1),
              help="With amortized: share of products also sampled, to measure its error (default 0.05).")
@click.option("--split", type=click.Choice(["test", "train", "all"]), default="all", show_default=True,
              help="Classify only one side of the bundle's --test-fraction split (with FEED).")
@click.option("--allow-urls/--no-allow-urls", default=None, help="Allow http(s) image URLs (embedded mode).")
@click.option("--device", help="auto | cpu | cuda (embedded mode; workers have their own).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
              help="With --wait: give up waiting after this many seconds (exit 2; the run goes on).")
@json_option
@click.pass_context
def classify(ctx: click.Context, feed: str | None, run: int | None, distributed: bool, wait: bool, bundle: str | None,
             out: str | None, stacker: str | None, mmshap_budget: int | None, mmshap_target: float | None, mmshap_cap: int | None,
             mmshap_mode: str | None, mmshap_players: str | None, mmshap_method: str | None,
             mmshap_audit: float | None, split: str,
             allow_urls: bool | None, device: str | None, timeout: float | None, as_json: bool) -> None:
    """Classify FEED (ingest it, then infer and stack), or an ingested run with --run, and store
    predictions, MM-SHAP and collapse metrics: in this process, or on the workers with --distributed."""
    if (feed is None) == (run is None):
        raise UserError("give a FEED or --run RUN (one of them)")
    if run is not None and split != "all":
        raise UserError("--split chooses products while a feed is ingested: it goes with FEED, not --run")
    if wait and not distributed:
        raise UserError("--wait goes with --distributed (the embedded mode always waits)")
    if timeout and not wait:
        raise UserError("--timeout goes with --wait")
    if distributed and out and not wait:
        raise UserError("--out with --distributed needs --wait (the file is written once the run is done)")
    if distributed and (allow_urls is not None or device):
        raise UserError("--allow-urls and --device are the workers' settings (allow_image_urls, device), "
                        "not the sender's")
    if out:
        check_output_path(out)
    if feed is not None:
        check_feed(feed)  # before a run exists
    settings = settings_of(ctx, bundle=bundle, stacker=stacker, mmshap_budget=mmshap_budget,
                           mmshap_target_stderr=mmshap_target, mmshap_cap=mmshap_cap, mmshap_players=mmshap_players,
                           mmshap_image_mode=mmshap_mode, mmshap_method=mmshap_method,
                           mmshap_audit_fraction=mmshap_audit, allow_image_urls=allow_urls, device=device)
    echo = echo_for(as_json)
    if distributed:
        from shapstack.cmd_ops import submit

        result = submit(settings, feed=feed, run=run, split=split, wait=wait, timeout_s=timeout, out=out, echo=echo)
    else:
        result = run_classify(settings, feed, run=run, split=split, out=out, echo=echo)
    if as_json:
        print_json(result)
    if result.get("failed") or result.get("dead"):
        ctx.exit(EXIT_RUN_FAILURES)


@cli.command()
@click.argument("run", type=int)
@click.option("--out", type=click.Path(file_okay=False), help="Report folder (default report-RUN).")
@click.pass_context
def report(ctx: click.Context, run: int, out: str | None) -> None:
    """Write an HTML report (index.html, plots, thumbnails) for a classified run."""
    from jobs.report import write_report

    path = write_report(readonly_factory(ctx.obj), run, out or f"report-{run}")
    click.echo(f"wrote {path}")


@cli.command()
@click.option("--out", default="shapstack-demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--products", default=DEMO["products"], show_default=True, type=click.IntRange(100))
@click.option("--preset", default="small", show_default=True, type=click.Choice(["tiny", "small"]))
@click.option("--seed", default=0, show_default=True)
@click.pass_context
def demo(ctx: click.Context, out: str, products: int, preset: str, seed: int) -> None:
    """Generate a catalogue, train, classify its held-out part into SQLite, report. No downloads."""
    from jobs.report import write_report
    from train.data import TrainConfig
    from train.train_bundle import train_bundle

    started = time.perf_counter()
    root = Path(out)
    click.echo(f"[1/4] synthetic catalogue: {products} products, {DEMO['classes']} classes -> {root / 'catalogue'}")
    feed = make_catalogue(root / "catalogue", products, DEMO["classes"], seed=seed, image_size=DEMO["image_size"],
                          misleading_text=DEMO["misleading_text"], drop_image=DEMO["drop"], drop_text=DEMO["drop"])
    click.echo(f"[2/4] training the {preset} preset (text, image, multimodal; stackers on held-out outputs)")
    cfg = TrainConfig(preset=preset, folds=DEMO["folds"], min_class_size=10, seed=seed, epochs=DEMO["epochs"],
                      test_fraction=DEMO["test_fraction"], mmshap_budget=DEMO["mmshap_budget"])
    train_bundle(feed, root / "bundle", cfg, log=lambda line: click.echo("      " + line))
    click.echo("[3/4] classifying the held-out products into SQLite")
    settings = ctx.obj.replace(bundle=str(root / "bundle"))
    if ctx.obj.database_url == Settings().database_url:  # the default: keep the demo in its folder
        settings = settings.replace(database_url=f"sqlite:///{(root / 'shapstack.db').resolve()}")
    result = run_classify(settings, str(feed), split="test", out=str(root / "predictions.csv"))
    click.echo("[4/4] report")
    path = write_report(session_factory(settings), result["run"], root / "report")
    click.echo(f"wrote {path}\ndemo finished in {time.perf_counter() - started:.0f} s")
