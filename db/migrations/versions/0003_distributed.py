"""distributed mode: row activity times for the sweeper, one reject per feed row

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""
from alembic import op
import sqlalchemy as sa

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("products", sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_products_run_updated", "products", ["run_id", "updated_at"])
    op.create_index("uq_rejects_run_row", "rejects", ["run_id", "row"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_rejects_run_row", table_name="rejects")
    op.drop_index("ix_products_run_updated", table_name="products")
    op.drop_column("products", "updated_at")
    op.drop_column("runs", "updated_at")
