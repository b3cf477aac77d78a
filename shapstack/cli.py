"""The admin CLI. Commands are thin: parse flags, build settings, call a stage, print a summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from shapstack.settings import Settings, load_settings

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
def make_catalogue_cmd(out: str, products: int, classes: int, seed: int, misleading_text: float,
                       drop_image: float, drop_text: float, image_size: int) -> None:
    """Write a synthetic catalogue (CSV + JPEG images) with known modality reliance per class."""
    from pipeline.synthetic import make_catalogue

    feed = make_catalogue(out, products, classes, seed=seed, misleading_text=misleading_text,
                          drop_image=drop_image, drop_text=drop_text, image_size=image_size)
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
@click.pass_context
def ingest(ctx: click.Context, feed: str, allow_urls: bool | None) -> None:
    """Validate a feed and store its products; unusable rows are stored as rejects."""
    from db.store import ingest_feed
    from pipeline.feed import FeedError, raw_rows

    settings = settings_of(ctx, allow_image_urls=allow_urls)
    try:
        next(raw_rows(Path(feed)), None)  # fail fast, before a run exists, if the feed is unreadable
    except FeedError as exc:
        raise ValueError(str(exc)) from None
    factory = session_factory(settings)
    with _progress("ingest") as bar:
        run_id = ingest_feed(factory, feed, settings.limits(), batch_size=settings.ingest_batch_size,
                             progress=bar.update)
    print_ingest_summary(factory, run_id)


def _progress(desc: str):
    from tqdm import tqdm

    return tqdm(desc=desc, unit=" rows", file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)


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


def main() -> None:
    cli(prog_name="shapstack")
