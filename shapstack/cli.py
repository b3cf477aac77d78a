"""The admin CLI. Commands are thin: parse flags, build settings, call a stage, print a summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from shapstack.settings import Settings, load_settings

# `shapstack demo`: sized to finish in minutes on 2 CPU cores
DEMO = dict(products=900, classes=8, image_size=64, misleading_text=0.05, drop=0.03, folds=1, epochs=None,
            test_fraction=0.25, mmshap_budget=64)

# Exceptions that are the user's to fix: printed as one line, exit status 2, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError, PermissionError)


def _user_errors() -> tuple[type[BaseException], ...]:
    from db.engine import DatabaseError

    return USER_ERRORS + (DatabaseError,)


class Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _user_errors() as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            click.echo("error: " + " ".join(str(msg).split()), err=True)
            ctx.exit(2)


def settings_of(ctx: click.Context, **overrides: Any) -> Settings:
    return ctx.obj.replace(**overrides)


def session_factory(settings: Settings):
    from db.engine import connect

    return connect(settings.database_url)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="shapstack")
@click.option("--config", type=click.Path(dir_okay=False), help="TOML config file (default ./shapstack.toml).")
@click.option("--db", "database_url", help="Database URL (SHAPSTACK_DATABASE_URL); default sqlite:///shapstack.db.")
@click.pass_context
def cli(ctx: click.Context, config: str | None, database_url: str | None) -> None:
    """shapstack: classify product feeds with text, image and multimodal models and MM-SHAP."""
    try:
        ctx.obj = load_settings(config, database_url=database_url)
    except ValueError as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(2)


@cli.group()
def db() -> None:
    """Database administration."""


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Apply pending migrations."""
    from db.engine import make_engine, upgrade

    settings = ctx.obj
    upgrade(make_engine(settings.database_url))
    click.echo(f"database at head: {settings.database_url}")


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
    from pipeline.synthetic import make_catalogue

    feed = make_catalogue(out, products, classes, seed=seed, misleading_text=misleading_text,
                          drop_image=drop_image, drop_text=drop_text, image_size=image_size,
                          kinds=kinds.split(",") if kinds else None, class_seed=class_seed)
    click.echo(f"wrote {products} products in {classes} classes to {feed}")


def print_ingest_summary(factory, run_id: int) -> None:
    from db.store import reject_reasons, run_progress

    with factory() as session:
        p = run_progress(session, run_id)
        reasons = reject_reasons(session, run_id)
    click.echo(f"run {run_id}: {p['products']} products accepted, {p['rejects']} rejected")
    for reason, n in reasons.most_common():
        click.echo(f"  {n:>7}  {reason}")


@cli.command()
@click.argument("feed", type=click.Path())
@click.option("--allow-urls/--no-allow-urls", default=None, help="Allow http(s) image URLs.")
@click.option("--distributed", is_flag=True,
              help="Send the feed to the Celery workers, which ingest and classify it (needs a bundle).")
@click.option("--wait", is_flag=True, help="With --distributed: follow the run to the end and print its summary.")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False),
              help="With --distributed: model bundle (default: settings.bundle).")
@click.pass_context
def ingest(ctx: click.Context, feed: str, allow_urls: bool | None, distributed: bool, wait: bool,
           bundle: str | None) -> None:
    """Validate a feed and store its products; unusable rows are stored as rejects."""
    from db.store import ingest_feed

    settings = settings_of(ctx, allow_image_urls=allow_urls, bundle=bundle)
    _check_feed(feed)  # before a run exists
    if (wait or bundle) and not distributed:
        raise ValueError("--wait and --bundle go with --distributed")
    if distributed:
        if allow_urls is not None:
            raise ValueError("--allow-urls is the ingest workers' setting (allow_image_urls), not the sender's")
        from shapstack.cli_ops import submit_feed

        submit_feed(settings, feed, wait=wait)
        return
    factory = session_factory(settings)
    with _progress("ingest") as bar:
        run_id = ingest_feed(factory, feed, settings.limits(), batch_size=settings.ingest_batch_size,
                             progress=bar.update)
    print_ingest_summary(factory, run_id)


def _progress(desc: str, unit: str = " rows"):
    from tqdm import tqdm

    return tqdm(desc=desc, unit=unit, file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)


@cli.command()
@click.argument("run", required=False, type=int)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, run: int | None, as_json: bool) -> None:
    """Show recent runs, or one run's per-stage progress."""
    from db.store import latest_runs, reject_reasons, run_progress

    factory = session_factory(ctx.obj)
    with factory() as session:
        if run is None:
            runs = latest_runs(session)
            if as_json:
                click.echo(json.dumps([run_progress(session, r.id) for r in runs], default=str))
                return
            if not runs:
                click.echo("no runs yet")
            for r in runs:
                click.echo(f"{r.id:>5}  {r.status:<11} {r.n_products:>8} products {r.n_rejects:>6} rejects  {r.feed}")
            return
        try:
            p = run_progress(session, run)
        except KeyError:
            raise ValueError(f"no run {run}") from None
        reasons = reject_reasons(session, run)
    if as_json:
        click.echo(json.dumps({**p, "reject_reasons": dict(reasons)}, default=str))
        return
    click.echo(f"run {p['run']} ({p['mode']}): {p['status']}  feed {p['feed']}")
    n = max(p["products"], 1)
    for stage in ("inferred", "explained", "predicted", "dead"):
        click.echo(f"  {stage:<10} {p[stage]:>8} / {p['products']}  ({100 * p[stage] / n:.1f}%)")
    click.echo(f"  rejects    {p['rejects']:>8}")
    for reason, k in reasons.most_common(10):
        click.echo(f"    {k:>7}  {reason}")


@cli.command()
@click.argument("feed", type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Bundle directory to write.")
@click.option("--preset", default="small", show_default=True, type=click.Choice(["tiny", "small", "paper"]))
@click.option("--label-column", default="category", show_default=True)
@click.option("--group-column", default="group_id", show_default=True)
@click.option("--min-class-size", default=20, show_default=True, type=click.IntRange(1))
@click.option("--folds", default=5, show_default=True, type=click.IntRange(1),
              help="K-fold cross-fitting for the stackers' inputs; 1 = a 20% held-out split.")
@click.option("--seed", default=0, show_default=True)
@click.option("--epochs", type=click.IntRange(1), help="Override the preset's epochs for every model.")
@click.option("--test-fraction", default=0.0, show_default=True, type=click.FloatRange(0, 0.9),
              help="Hold out this share of groups (by hash) for `evaluate/classify --split test`.")
@click.option("--mmshap-budget", type=click.IntRange(0), help="Coalitions per product for out-of-fold MM-SHAP.")
@click.option("--tokenizer", type=click.Path(exists=True), help="A local pretrained tokenizer (default: train WordPiece).")
@click.option("--device", help="auto | cpu | cuda")
@click.pass_context
def train(ctx: click.Context, feed: str, out: str, preset: str, label_column: str, group_column: str,
          min_class_size: int, folds: int, seed: int, epochs: int | None, test_fraction: float,
          mmshap_budget: int | None, tokenizer: str | None, device: str | None) -> None:
    """Train the three base models and every stacker into a model bundle (resumable)."""
    from pipeline.explain import DEFAULT_BUDGET, DEFAULT_MODE
    from train.crossfit import TrainConfig, train_bundle

    settings = settings_of(ctx, device=device)
    cfg = TrainConfig(preset=preset, label_column=label_column, group_column=group_column,
                      min_class_size=min_class_size, folds=folds, seed=seed, epochs=epochs, device=settings.device,
                      test_fraction=test_fraction,
                      mmshap_budget=DEFAULT_BUDGET if mmshap_budget is None else mmshap_budget,
                      mmshap_mode=settings.mmshap_image_mode or DEFAULT_MODE, tokenizer=tokenizer)
    _check_feed(feed)
    train_bundle(feed, out, cfg, settings.limits(), log=click.echo)


@cli.command()
@click.argument("feed", type=click.Path())
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), help="Model bundle (default: settings.bundle).")
@click.option("--split", type=click.Choice(["test", "train", "all"]), default="all", show_default=True,
              help="Which side of the bundle's --test-fraction split to evaluate on.")
@click.option("--report", type=click.Path(file_okay=False), help="Write per-class CSV, confusion PNGs and metrics here.")
@click.option("--mmshap-budget", type=click.IntRange(0))
@click.option("--tfidf", is_flag=True, help="Add a TF-IDF + logistic regression baseline trained on the train side.")
@click.option("--device", help="auto | cpu | cuda")
@click.pass_context
def evaluate(ctx: click.Context, feed: str, bundle: str | None, split: str, report: str | None,
             mmshap_budget: int | None, tfidf: bool, device: str | None) -> None:
    """Macro/weighted P, R, F1 and accuracy of every base model and stacker (the paper's Table II)."""
    from train.evaluate import evaluate_bundle

    settings = settings_of(ctx, device=device, bundle=bundle)
    _check_feed(feed)
    evaluate_bundle(feed, _bundle_path(settings), split=split, report=report, limits=settings.limits(),
                    budget=mmshap_budget, device=settings.device, batch_size=settings.batch_size, tfidf=tfidf,
                    log=click.echo)


def make_backend(settings: Settings, bundle):
    """Triton when SHAPSTACK_TRITON_URL is set, else the bundle's models in this process."""
    if settings.triton_url:
        from serving.client import TritonBackend

        return TritonBackend(settings.triton_url, bundle, batch_size=settings.batch_size, limits=settings.limits())
    from pipeline.backend import InProcessBackend

    return InProcessBackend(bundle, device=settings.device, batch_size=settings.batch_size, limits=settings.limits())


def load_stacker(bundle, name: str):
    from pipeline.stacking import KINDS, load_stackers, make_stacker

    if name in KINDS or name == "mean":
        return make_stacker(name)
    stackers = load_stackers(bundle.path, [name])
    if name not in stackers:
        raise ValueError(f"bundle {bundle.path} has no stacker {name!r}")
    return stackers[name]


def classify_feed(settings: Settings, feed: str, *, stacker_name: str, split: str, out: str | None,
                  echo=click.echo) -> int:
    """Embedded mode end to end: ingest -> infer (base models + MM-SHAP) -> stack -> persist."""
    from db.runs import classify_run, export, output_rows
    from db.store import ingest_feed, register_model
    from pipeline.bundle import load_bundle
    from pipeline.explain import mmshap_config
    from pipeline.split import keep

    _check_feed(feed)
    if out and Path(out).suffix.lower() not in (".csv", ".jsonl"):
        raise ValueError(f"--out must end in .csv or .jsonl: {out}")
    bundle = load_bundle(_bundle_path(settings), device=settings.device)
    extra = bundle.manifest.get("extra", {})
    if split != "all" and not extra.get("test_fraction"):
        raise ValueError("the bundle was trained without --test-fraction: it has no held-out split")
    stacker = load_stacker(bundle, stacker_name)
    backend = make_backend(settings, bundle)
    factory = session_factory(settings)
    with factory() as s, s.begin():
        version = register_model(s, {**bundle.manifest, "bundle_id": bundle.bundle_id}, str(bundle.path))
    select = None
    if split != "all":
        select = lambda p: keep(p, split, extra["test_fraction"], extra.get("seed", 0))  # noqa: E731
    with _progress("ingest") as bar:
        run_id = ingest_feed(factory, feed, settings.limits(), batch_size=settings.ingest_batch_size,
                             progress=bar.update, select_product=select)
    print_ingest_summary(factory, run_id)
    budget, mode = mmshap_config(bundle.manifest, settings.mmshap_budget, settings.mmshap_image_mode)
    with _progress("classify", unit=" products") as bar:
        timings = classify_run(factory, backend, stacker, bundle.labels, version, run_id,
                               batch_size=settings.batch_size, budget=budget,
                               mode=mode, thresholds=settings.thresholds(),
                               reference=extra.get("t_shap_reference"), progress=bar.update)
    with factory() as s:
        rows = output_rows(s, run_id)
    echo(f"classified {len(rows)} products with stacker {stacker.name} "
         f"(infer {timings['infer_s']:.1f} s, stack {timings['stack_s']:.1f} s)")
    print_run_summary(factory, run_id, rows, bundle.labels, echo)
    if out:
        export(factory, run_id, out)
        echo(f"wrote {out}")
    return run_id


def print_run_summary(factory, run_id: int, rows: list[dict], labels, echo=click.echo) -> None:
    """The evaluation table when the feed has labels, and the run's collapse metrics."""
    import numpy as np

    from db.models import CollapseMetric
    from train.evaluate import format_table, scores

    index = {c: i for i, c in enumerate(labels)}
    labelled = [r for r in rows if r["label"] in index]
    if labelled:
        y = np.array([index[r["label"]] for r in labelled])
        present = sorted(set(y.tolist()))
        table = {name: scores(y, np.array([index[r[col]] for r in labelled]), present)
                 for name, col in (("stacked", "category"), ("text", "text_category"),
                                   ("image", "image_category"), ("multimodal", "multimodal_category"))}
        echo(f"evaluation on {len(labelled)} labelled products ({len(rows) - len(labelled)} without a known label):")
        echo(format_table(table))
    with factory() as s:
        from sqlalchemy import select

        metrics = {(c.scope, c.metric): c.value for c in s.scalars(
            select(CollapseMetric).where(CollapseMetric.run_id == run_id))}
    if metrics:
        get = lambda k: metrics.get(("all", k), float("nan"))  # noqa: E731
        echo(f"collapse: mean T-SHAP {get('mean_t_shap'):.3f} (std {get('std_t_shap'):.3f}), "
             f"text-dominated {get('text_dominated_share'):.1%}, image-dominated {get('image_dominated_share'):.1%}, "
             f"MM agrees with text {get('agree_text'):.1%} / image {get('agree_image'):.1%}")
        raised = sorted({f"{k[1].removeprefix('flag_')} ({k[0]})" for k, v in metrics.items()
                         if k[1].startswith("flag_") and v})
        echo("collapse flags: " + (", ".join(raised) if raised else "none"))


@cli.command()
@click.argument("feed", type=click.Path())
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), help="Model bundle (default: settings.bundle).")
@click.option("--out", type=click.Path(dir_okay=False), help="Write predictions to FILE.csv or FILE.jsonl.")
@click.option("--stacker", help="mmshap (default) | mmshap-paper | lightgbm | ffn | mean | text | image | multimodal")
@click.option("--mmshap-budget", type=click.IntRange(0), help="Coalitions per product (0 = skip MM-SHAP).")
@click.option("--mmshap-mode", type=click.Choice(["token", "pixel"]))
@click.option("--split", type=click.Choice(["test", "train", "all"]), default="all", show_default=True,
              help="Classify only one side of the bundle's --test-fraction split.")
@click.option("--allow-urls/--no-allow-urls", default=None)
@click.option("--device", help="auto | cpu | cuda")
@click.pass_context
def classify(ctx: click.Context, feed: str, bundle: str | None, out: str | None, stacker: str | None,
             mmshap_budget: int | None, mmshap_mode: str | None, split: str, allow_urls: bool | None,
             device: str | None) -> None:
    """Classify a feed in this process and store predictions, MM-SHAP and collapse metrics."""
    settings = settings_of(ctx, bundle=bundle, stacker=stacker, mmshap_budget=mmshap_budget,
                           mmshap_image_mode=mmshap_mode, allow_image_urls=allow_urls, device=device)
    classify_feed(settings, feed, stacker_name=settings.stacker, split=split, out=out)


@cli.command()
@click.argument("run", type=int)
@click.option("--out", type=click.Path(file_okay=False), help="Directory (default report-RUN).")
@click.pass_context
def report(ctx: click.Context, run: int, out: str | None) -> None:
    """Write an HTML report with plots for a classified run."""
    from db.report import write_report

    path = write_report(session_factory(ctx.obj), run, out or f"report-{run}")
    click.echo(f"wrote {path}")


@cli.command()
@click.option("--out", default="shapstack-demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--products", default=DEMO["products"], show_default=True, type=click.IntRange(100))
@click.option("--preset", default="small", show_default=True, type=click.Choice(["tiny", "small"]))
@click.option("--seed", default=0, show_default=True)
@click.pass_context
def demo(ctx: click.Context, out: str, products: int, preset: str, seed: int) -> None:
    """Generate a catalogue, train, classify its held-out part into SQLite, report. No downloads."""
    import time

    from pipeline.synthetic import make_catalogue
    from train.crossfit import TrainConfig, train_bundle

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
    if ctx.obj.database_url == load_settings(env={}).database_url:  # the default: keep the demo in its folder
        settings = settings.replace(database_url=f"sqlite:///{(root / 'shapstack.db').resolve()}")
    run_id = classify_feed(settings, str(feed), stacker_name=settings.stacker, split="test",
                           out=str(root / "predictions.csv"))
    click.echo("[4/4] report")
    from db.report import write_report

    path = write_report(session_factory(settings), run_id, root / "report")
    click.echo(f"wrote {path}\ndemo finished in {time.perf_counter() - started:.0f} s")


def _check_feed(feed: str) -> None:
    """Fail fast, with one line, when the feed as a whole cannot be read."""
    from pipeline.feed import FeedError, raw_rows

    try:
        next(raw_rows(Path(feed)), None)
    except FeedError as exc:
        raise ValueError(str(exc)) from None


def _bundle_path(settings: Settings) -> str:
    from pipeline.bundle import read_manifest

    if not settings.bundle:
        raise ValueError("no model bundle: pass --bundle or set SHAPSTACK_BUNDLE")
    read_manifest(settings.bundle)  # raises BundleError (a ValueError) with a clear message
    return settings.bundle


# Command groups that live beside this file, each adding its commands to `cli` on import.
EXTENSIONS = ("shapstack.cli_ops", "shapstack.cli_serve")


def load_extensions() -> click.Group:
    import importlib

    for name in EXTENSIONS:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    return cli


def main() -> None:
    load_extensions()(prog_name="shapstack")
