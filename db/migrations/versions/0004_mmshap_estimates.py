"""MM-SHAP estimates: nullable T-SHAP with its reason, players, method, target, modality game

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""
from alembic import op
import sqlalchemy as sa

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

NEW_COLUMNS = [
    sa.Column("n_players", sa.Integer(), nullable=True),
    sa.Column("method", sa.String(length=16), nullable=True),
    sa.Column("met_target", sa.Boolean(), nullable=True),
    sa.Column("reason", sa.Text(), nullable=True),
    sa.Column("phi_text", sa.Float(), nullable=True),
    sa.Column("phi_image", sa.Float(), nullable=True),
    sa.Column("game_text_share", sa.Float(), nullable=True),
]


def _std(column: str) -> str:
    if op.get_bind().dialect.name == "postgresql":
        return f"stddev_pop({column})"
    return f"sqrt(max(avg({column} * {column}) - avg({column}) * avg({column}), 0))"


def _view(null_aware: bool) -> str:
    # NULL T-SHAP (no estimate) is left out of every T-SHAP aggregate; n_t_shap counts the rest
    share = ("avg(CASE WHEN c.t_shap IS NULL THEN NULL WHEN c.t_shap {op} THEN 1.0 ELSE 0.0 END)" if null_aware
             else "avg(CASE WHEN c.t_shap {op} THEN 1.0 ELSE 0.0 END)")
    extra = ("count(c.t_shap) AS n_t_shap,\n               avg(c.game_text_share) AS mean_game_text_share,"
             if null_aware else "")
    return f"""
        CREATE VIEW modality_by_category AS
        SELECT c.run_id AS run_id,
               p.stacker AS stacker,
               p.category AS category,
               count(*) AS n_products,
               {extra}
               avg(c.t_shap) AS mean_t_shap,
               {_std("c.t_shap")} AS std_t_shap,
               {share.format(op="> 0.9")} AS text_dominated_share,
               {share.format(op="< 0.1")} AS image_dominated_share
        FROM modality_contributions c
        JOIN predictions p ON p.product_pk = c.product_pk
        GROUP BY c.run_id, p.stacker, p.category
        """


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS modality_by_category")
    with op.batch_alter_table("modality_contributions") as batch:
        for name in ("t_shap", "v_shap", "stderr"):
            batch.alter_column(name, existing_type=sa.Float(), nullable=True)
        for column in NEW_COLUMNS:
            batch.add_column(column)
    op.execute(_view(null_aware=True))


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS modality_by_category")
    op.execute("DELETE FROM modality_contributions WHERE t_shap IS NULL OR stderr IS NULL")
    with op.batch_alter_table("modality_contributions") as batch:
        for column in NEW_COLUMNS:
            batch.drop_column(column.name)
        for name in ("t_shap", "v_shap", "stderr"):
            batch.alter_column(name, existing_type=sa.Float(), nullable=False)
    op.execute(_view(null_aware=False))
