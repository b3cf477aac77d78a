"""PostgreSQL / SQLite persistence: tables, migrations, BI views and idempotent writes."""
