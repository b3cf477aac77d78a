"""The root `shapstack` click group: settings for every command, and what an error looks like.

Exit codes: 0 ok; 1 a runtime failure (a file, the network or the database is unavailable: one
line); 2 a usage or user error (one line); 3 a run that finished with failed or dead-lettered
products; 4 a worker that stopped on a worker-fatal error (workers.heartbeat.EXIT_WORKER_FATAL). Any other exception is a bug and keeps its traceback; `--debug` shows the traceback of
every error.
"""

from __future__ import annotations

import sys
from typing import Any

import click
import sqlalchemy.exc

from db.engine import DatabaseError, connect, open_existing
from pipeline.errors import UserError, hide_credentials
from shapstack.settings import Settings, load_settings
from workers.logs import configure_cli

EXIT_RUNTIME, EXIT_USER, EXIT_RUN_FAILURES = 1, 2, 3


def one_line(exc: BaseException) -> str:
    """The message of exc on one line, with any URL's credentials removed."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    if isinstance(exc, sqlalchemy.exc.StatementError):  # its text holds the SQL and its parameters
        text = str(exc.orig) if exc.orig is not None else type(exc).__name__
    text = " ".join(text.split())
    return hide_credentials(text)


class Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:
            code = error_code(exc)
            if code is None or ctx.meta.get("debug"):
                raise
            click.echo("error: " + one_line(exc), err=True)
            ctx.exit(code)


def error_code(exc: BaseException) -> int | None:
    """The exit code of an error printed as one line, or None for a bug (keeps its traceback)."""
    if isinstance(exc, UserError):
        return EXIT_USER
    if isinstance(exc, (OSError, DatabaseError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                        sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError)):
        return EXIT_RUNTIME
    return None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="shapstack")
@click.option("--config", type=click.Path(dir_okay=False), help="TOML config file (default ./shapstack.toml).")
@click.option("--db", "database_url", help="Database URL (SHAPSTACK_DATABASE_URL); default sqlite:///shapstack.db.")
@click.option("--debug", is_flag=True, help="Show the traceback of every error.")
@click.pass_context
def cli(ctx: click.Context, config: str | None, database_url: str | None, debug: bool) -> None:
    """shapstack: classify product feeds with text, image and multimodal models and MM-SHAP."""
    ctx.meta["debug"] = debug
    ctx.obj = load_settings(config, database_url=database_url)
    configure_cli(ctx.obj.log_format)


def settings_of(ctx: click.Context, **overrides: Any) -> Settings:
    return ctx.obj.replace(**overrides)


def session_factory(settings: Settings):
    """Sessions on the database, created and migrated if needed (commands that write)."""
    return connect(settings.database_url)


def readonly_factory(settings: Settings):
    """Sessions on a database that must exist at the latest schema (commands that only read)."""
    return open_existing(settings.database_url)


json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print one JSON document on stdout (progress and messages go to stderr).")


def echo_for(as_json: bool):
    """Where a command's sentences go: stdout, or stderr when stdout carries the JSON document."""
    return (lambda text="": click.echo(text, err=True)) if as_json else click.echo


def progress_bar(desc: str, unit: str = " rows"):
    """A progress bar on stderr when it is a terminal (never in logs or pipes)."""
    from tqdm import tqdm

    return tqdm(desc=desc, unit=unit, file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)
