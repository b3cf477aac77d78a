"""fault tolerance: claims with leases on products and runs, worker heartbeats, named locks

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""
from alembic import op
import sqlalchemy as sa

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("products") as batch:
        batch.add_column(sa.Column("claimed_by", sa.String(160), nullable=True))
        batch.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("failed_on", sa.Text(), nullable=True))
        batch.create_index("ix_products_claimed_by", ["claimed_by"])
    with op.batch_alter_table("runs") as batch:
        # "done_with_failures"
        batch.alter_column("status", type_=sa.String(32), existing_type=sa.String(16))
        batch.add_column(sa.Column("claimed_by", sa.String(160), nullable=True))
        batch.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("deliveries", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("setup_failures", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("setup_error", sa.Text(), nullable=True))
    op.create_table(
        "workers",
        sa.Column("id", sa.String(160), primary_key=True),
        sa.Column("queues", sa.String(64), nullable=False, server_default=""),
        sa.Column("status", sa.String(16), nullable=False, server_default="alive"),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
        sa.Column("last_seen", sa.DateTime(timezone=True), server_default=sa.func.now()),
    )
    op.create_table(
        "locks",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(160), nullable=False),
        sa.Column("until", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("locks")
    op.drop_table("workers")
    with op.batch_alter_table("runs") as batch:
        for column in ("setup_error", "setup_failures", "deliveries", "lease_until", "claimed_by"):
            batch.drop_column(column)
        batch.alter_column("status", type_=sa.String(16), existing_type=sa.String(32))
    with op.batch_alter_table("products") as batch:
        batch.drop_index("ix_products_claimed_by")
        for column in ("failed_on", "lease_until", "claimed_by"):
            batch.drop_column(column)
