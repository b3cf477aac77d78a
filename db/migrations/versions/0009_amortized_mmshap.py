"""Amortized MM-SHAP: the sampled T-SHAP of audited products beside the amortized one

Revision ID: 0009
Revises: 0007
Create Date: 2026-11-23
"""
import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

COLUMNS = ("audit_t_shap", "audit_stderr")


def upgrade() -> None:
    for name in COLUMNS:
        op.add_column("modality_contributions", sa.Column(name, sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("modality_contributions") as batch:
        for name in COLUMNS:
            batch.drop_column(name)
