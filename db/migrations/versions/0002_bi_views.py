"""BI views: category summary per run and modality contribution per category

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-20
"""
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _std(column: str) -> str:
    if op.get_bind().dialect.name == "postgresql":
        return f"stddev_pop({column})"
    return f"sqrt(max(avg({column} * {column}) - avg({column}) * avg({column}), 0))"


def upgrade() -> None:
    op.execute(
        """
        CREATE VIEW category_summary AS
        SELECT p.run_id AS run_id,
               p.category AS category,
               count(*) AS n_products,
               avg(p.confidence) AS mean_confidence,
               count(*) * 1.0 / (SELECT count(*) FROM predictions q
                                 WHERE q.run_id = p.run_id AND q.stacker = p.stacker) AS share,
               p.stacker AS stacker
        FROM predictions p
        GROUP BY p.run_id, p.stacker, p.category
        """
    )
    op.execute(
        f"""
        CREATE VIEW modality_by_category AS
        SELECT c.run_id AS run_id,
               p.stacker AS stacker,
               p.category AS category,
               count(*) AS n_products,
               avg(c.t_shap) AS mean_t_shap,
               {_std("c.t_shap")} AS std_t_shap,
               avg(CASE WHEN c.t_shap > 0.9 THEN 1.0 ELSE 0.0 END) AS text_dominated_share,
               avg(CASE WHEN c.t_shap < 0.1 THEN 1.0 ELSE 0.0 END) AS image_dominated_share
        FROM modality_contributions c
        JOIN predictions p ON p.product_pk = c.product_pk
        GROUP BY c.run_id, p.stacker, p.category
        """
    )


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS modality_by_category")
    op.execute("DROP VIEW IF EXISTS category_summary")
