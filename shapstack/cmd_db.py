"""`shapstack db ...`: the database's schema revision, and the only commands that change it.

A shared database (PostgreSQL) is migrated explicitly: every other command and every worker
refuses a database whose revision is not the one it was written for (db.engine.open_schema).
No command prints a password: URLs are shown with it hidden.
"""

from __future__ import annotations

import os

import click

from db.bi import grant_readonly
from db.engine import (current_revision, downgrade, head_revision, history, make_engine, mismatch, open_existing,
                       upgrade, where)
from pipeline.errors import UserError
from shapstack.group import cli


@cli.group()
def db() -> None:
    """Database schema: current revision, history, upgrade, downgrade."""


@db.command("upgrade")
@click.argument("revision", default="head")
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str) -> None:
    """Apply pending migrations up to REVISION (default: head). Back up a production database first."""
    engine = make_engine(ctx.obj.database_url)
    before = current_revision(engine)
    upgrade(engine, revision)
    after = current_revision(engine)
    click.echo(f"database {where(engine)}: {before or 'empty'} -> {after}" if before != after
               else f"database {where(engine)}: already at {after}")


@db.command("downgrade")
@click.argument("revision")
@click.pass_context
def db_downgrade(ctx: click.Context, revision: str) -> None:
    """Revert migrations down to REVISION (e.g. 0002; `base` drops every table)."""
    engine = make_engine(ctx.obj.database_url)
    before = current_revision(engine)
    downgrade(engine, revision)
    click.echo(f"database {where(engine)}: {before or 'empty'} -> {current_revision(engine) or 'empty'}")


@db.command("current")
@click.pass_context
def db_current(ctx: click.Context) -> None:
    """The database's schema revision and whether this shapstack can use it (exit 1 when not)."""
    engine = make_engine(ctx.obj.database_url)
    current = current_revision(engine)
    problem = mismatch(engine, current) if current is not None else None
    state = "at head" if current == head_revision() else ("no shapstack schema" if current is None else "not at head")
    click.echo(f"database {where(engine)}: {current or '-'} ({state}; this shapstack's head is {head_revision()})")
    if problem:
        click.echo(problem, err=True)
        ctx.exit(1)


@db.command("history")
def db_history() -> None:
    """Every migration this shapstack knows, oldest first."""
    for revision, down, message in history():
        click.echo(f"{down or 'base'} -> {revision}  {message}")


@db.command("grant-readonly")
@click.argument("role")
@click.option("--password-env", metavar="VAR", help="Set the role's password from this environment variable.")
@click.pass_context
def db_grant_readonly(ctx: click.Context, role: str, password_env: str | None) -> None:
    """Create or update ROLE, a PostgreSQL login that can only read the tables and BI views (docs/bi.md)."""
    password = None
    if password_env:
        password = os.environ.get(password_env)
        if not password:
            raise UserError(f"--password-env {password_env}: that environment variable is not set")
    factory = open_existing(ctx.obj.database_url)  # the views must be there: run `shapstack db upgrade` first
    engine = factory.kw["bind"]
    grant_readonly(engine, role, password)
    click.echo(f"role {role} can read {where(engine)} (read-only sessions)")
