"""The BI side of the database: a read-only login for dashboards (PostgreSQL).

The views themselves are created by migration 0007 (db/migrations/versions/0007_bi_views.py) and
described in docs/bi.md.
"""

from __future__ import annotations

import re

from sqlalchemy import Engine, text

from pipeline.errors import UserError

ROLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def grant_readonly(engine: Engine, role: str, password: str | None = None) -> None:
    """Create (or update) a login role that can read every table and view of the public schema,
    also ones created later, in sessions that are read-only; idempotent."""
    if engine.dialect.name != "postgresql":
        raise UserError("a read-only role is a PostgreSQL feature: a SQLite file is read-only for whoever "
                        "may only read the file")
    if not ROLE_NAME.match(role):
        raise UserError(f"role name {role!r}: use lower-case letters, digits and _ (at most 63)")
    with engine.begin() as conn:
        database = conn.execute(text("SELECT current_database()")).scalar_one()
        exists = conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}).first()
        conn.execute(text(f'{"ALTER" if exists else "CREATE"} ROLE "{role}" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE'))
        if password is not None:
            quoted = conn.execute(text("SELECT quote_literal(:p)"), {"p": password}).scalar_one()
            conn.execute(text(f'ALTER ROLE "{role}" PASSWORD {quoted}'))
        for statement in (f'GRANT CONNECT ON DATABASE "{database}" TO "{role}"',
                          f'GRANT USAGE ON SCHEMA public TO "{role}"',
                          f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{role}"',
                          f'ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO "{role}"',
                          f'ALTER ROLE "{role}" SET default_transaction_read_only = on'):
            conn.execute(text(statement))
