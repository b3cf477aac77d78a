"""Engines, sessions and the schema revision.

Every entry point calls `connect(url)`, which checks that the database's schema is the one this
code was written for (`open_schema`):
- an empty database (no tables at all) is created at the head revision: a fresh SQLite file, or a
  new PostgreSQL database, needs no set-up step (under an advisory lock on PostgreSQL, so N
  workers starting together do not race);
- a SQLite file (the embedded mode: one user, one program) at an older revision is upgraded;
- any other database at another revision is refused with a SchemaMismatch that says what to run:
  only `shapstack db upgrade` / `db downgrade` change a shared database's schema, so a newer CLI
  pointed at production never migrates it behind the operators' backs.

Commands that only read (status, report, export, dead-letters) call `open_existing(url)`, which
never creates a file nor changes a schema.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from sqlalchemy import URL, Engine, create_engine, event, inspect, make_url, text
from sqlalchemy.orm import Session, sessionmaker

from pipeline.errors import ShapstackError, UserError

HERE = Path(__file__).parent


class DatabaseError(ShapstackError):
    """The database cannot be reached or migrated; the message is for the user."""


class SchemaMismatch(DatabaseError):
    """The database's schema revision is not the one this code needs; the message says what to run."""


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_reader_pragmas(dbapi_conn, _record) -> None:
    """A reader's: journal_mode=WAL would write to the file (a writer has set it already)."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


SCHEMES = {"sqlite": "sqlite", "sqlite+pysqlite": "sqlite", "postgresql": "postgresql+psycopg",
           "postgresql+psycopg": "postgresql+psycopg", "postgres": "postgresql+psycopg"}


def parse_url(url: str) -> URL:
    """A database URL of a supported kind, or a UserError that shows no part of it but its scheme."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in SCHEMES:
        shown = f"{scheme!r}" if scheme.replace("+", "").isalnum() else "none"
        raise UserError(f"unsupported database URL scheme {shown} (use sqlite:///FILE or "
                        "postgresql://HOST:PORT/NAME with user and password)")
    try:
        parsed = make_url(url)
        parsed.port  # noqa: B018 - parses the port
    except (ValueError, TypeError):
        raise UserError(f"database URL is not valid ({scheme}://...: check the host, port and name)") from None
    return parsed.set(drivername=SCHEMES[scheme])


def make_engine(url: str, *, writer: bool = True, pool_size: int = 5) -> Engine:
    """An engine for url; pool_size connections kept (and as many more when busy) on PostgreSQL."""
    url = parse_url(url)
    if url.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas if writer else _sqlite_reader_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size)
    return engine


def alembic_config(engine: Engine):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(HERE / "migrations"))
    cfg.attributes["engine"] = engine
    return cfg


def where(engine: Engine) -> str:
    """The engine's URL with its password hidden: the only form of a URL any message shows."""
    return engine.url.render_as_string(hide_password=True)


def _script():
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(HERE / "migrations"))


def head_revision() -> str:
    return _script().get_current_head()


def history() -> list[tuple[str, str | None, str]]:
    """(revision, down revision, first line of its message) from the oldest to the head."""
    revs = reversed(list(_script().walk_revisions()))
    return [(r.revision, r.down_revision, (r.doc or "").strip().splitlines()[0] if r.doc else "") for r in revs]


def _current(conn) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def _failure(engine: Engine, exc: Exception) -> DatabaseError:
    if isinstance(exc, DatabaseError):
        return exc
    detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    return DatabaseError(f"cannot open database {where(engine)}: {detail}")


def current_revision(engine: Engine) -> str | None:
    """The database's schema revision; None for a database shapstack has not created."""
    try:
        with engine.connect() as conn:
            return _current(conn)
    except Exception as exc:
        raise _failure(engine, exc) from exc


def _migrate(engine: Engine, action) -> None:
    """action(config, connection) in one transaction, under the migration lock on PostgreSQL."""
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(727001)"))
            cfg = alembic_config(engine)
            cfg.attributes["connection"] = conn
            action(cfg, conn)
    except Exception as exc:
        raise _failure(engine, exc) from exc


def upgrade(engine: Engine, revision: str = "head") -> None:
    from alembic import command

    _migrate(engine, lambda cfg, conn: command.upgrade(cfg, revision))


def downgrade(engine: Engine, revision: str) -> None:
    from alembic import command

    _migrate(engine, lambda cfg, conn: command.downgrade(cfg, revision))


def mismatch(engine: Engine, current: str | None) -> str | None:
    """Why a database at revision current cannot be used by this code, or None when it can."""
    head = head_revision()
    if current == head:
        return None
    known = {rev for rev, _, _ in history()}
    if current is None:
        return (f"database {where(engine)} has tables but no shapstack schema revision: "
                "point SHAPSTACK_DATABASE_URL at a shapstack database, or an empty one")
    if current not in known:
        return (f"database {where(engine)} is at schema revision {current}, newer than this shapstack "
                f"(head {head}): run the shapstack version that migrated it, or `shapstack db downgrade {head}` with it")
    return (f"database {where(engine)} is at schema revision {current}, this shapstack needs {head}: "
            "back it up and run `shapstack db upgrade`")


def open_schema(engine: Engine) -> str:
    """Create an empty database at head, upgrade a SQLite file, refuse anything else not at head.

    Returns the revision the database is at; raises SchemaMismatch.
    """
    def check(cfg, conn) -> None:
        from alembic import command

        current = _current(conn)
        if current == head_revision():
            return
        empty = current is None and not inspect(conn).get_table_names()
        upgradable = conn.dialect.name == "sqlite" and current in {rev for rev, _, _ in history()}
        if empty or upgradable:
            command.upgrade(cfg, "head")
            return
        raise SchemaMismatch(mismatch(engine, current))

    _migrate(engine, check)
    return head_revision()


def check_schema(url: str) -> str:
    """open_schema on a throw-away engine (a worker's parent process must not pool connections its
    forked children would share); returns the revision."""
    engine = make_engine(url)
    try:
        return open_schema(engine)
    finally:
        engine.dispose()


@lru_cache(maxsize=8)
def connect(url: str, pool_size: int = 5) -> sessionmaker[Session]:
    """Engine + schema check (open_schema) + session factory, once per URL per process (a worker
    process keeps 2 connections: its task and its heartbeat; a hundred workers stay within
    max_connections)."""
    engine = make_engine(url, pool_size=pool_size)
    open_schema(engine)
    return sessionmaker(engine, expire_on_commit=False)


@lru_cache(maxsize=8)
def open_existing(url: str) -> sessionmaker[Session]:
    """A session factory on a database that exists and is at the head revision; never creates a
    SQLite file nor migrates a schema (UserError when there is none, SchemaMismatch when it is at
    another revision)."""
    engine = make_engine(url, writer=False)
    if engine.url.get_backend_name() == "sqlite":
        path = engine.url.database
        if not path or path == ":memory:" or not Path(path).is_file():
            raise UserError(f"no database at {where(engine)}: classify or ingest a feed first, or pass --db")
    current = current_revision(engine)
    if current is None:
        raise UserError(f"database {where(engine)} has no shapstack schema: run `shapstack db upgrade` first")
    problem = mismatch(engine, current)
    if problem:  # the database's state, not the command line: exit 1 like a worker refusing it
        raise SchemaMismatch(problem)
    return sessionmaker(engine, expire_on_commit=False)
