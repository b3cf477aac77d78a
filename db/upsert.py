"""INSERT ... ON CONFLICT for PostgreSQL and SQLite alike: how every result is written.

Every write of a result is keyed by a unique constraint, so a redelivered task or a re-run of a
batch replaces (or, first-writer-wins, keeps) its row instead of adding a second one.
"""

from __future__ import annotations

from typing import Any, Sequence

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql import ClauseElement
from sqlalchemy.orm import Session


def upsert(session: Session, table, rows: Sequence[dict[str, Any]], keys: Sequence[str], *,
           update: bool = True) -> None:
    """INSERT ... ON CONFLICT (keys) DO UPDATE (or, update=False, DO NOTHING)."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    # executemany form: one cached statement, batched by SQLAlchemy's insertmanyvalues (compiling a
    # multi-VALUES statement per batch cost more than the database's own work); values that are SQL
    # expressions (the database's now()) need the VALUES form
    expressions = any(isinstance(v, ClauseElement) for r in rows for v in r.values())
    stmt = insert(table.__table__).values(list(rows)) if expressions else insert(table.__table__)
    columns = [c for c in rows[0] if c not in keys]
    if columns and update:
        stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_={c: stmt.excluded[c] for c in columns})
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=list(keys))
    session.execute(stmt) if expressions else session.execute(stmt, list(rows))
