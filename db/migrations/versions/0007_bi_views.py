"""BI views worth a dashboard: runs, one row per product, per-category accuracy, rejects by code,
collapse flags pivoted; the run's classify options; COMMENT ON every view and column (PostgreSQL)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-22

The views are written here, frozen, like any migration: a later change to a view is a new
migration. docs/bi.md describes every view and column (tests/test_bi.py checks it against the
database).
"""
import sqlalchemy as sa
from alembic import op

from db.reject_codes import code_sql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def _pg() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _std(column: str) -> str:
    if _pg():
        return f"stddev_pop({column})"
    return f"sqrt(max(avg({column} * {column}) - avg({column}) * avg({column}), 0))"


def _seconds(later: str, earlier: str) -> str:
    if _pg():
        return f"EXTRACT(EPOCH FROM ({later} - {earlier}))"
    return f"(julianday({later}) - julianday({earlier})) * 86400.0"


RUN_COLUMNS = "r.feed AS feed, r.bundle_id AS bundle_id, r.created_at AS run_created_at"

# name -> (comment of the view, {column: comment}); the columns in the views' order
COMMENTS: dict[str, tuple[str, dict[str, str]]] = {
    "run_overview": ("One row per run: feed, bundle, times, how many products ended in each state.", {
        "run_id": "The run (runs.id); `shapstack status RUN` shows the same run.",
        "feed": "Absolute path of the feed file the run ingested.",
        "mode": "embedded (one process) or distributed (Celery workers).",
        "status": "ingesting, ingested, classifying, done or failed.",
        "bundle_id": "Model bundle that classified the run (model_versions.id); NULL when only ingested.",
        "preset": "Model preset of the bundle (tiny, small, pretrained, paper).",
        "stacker": "Meta-model that made the predictions (mmshap, lightgbm, ...).",
        "run_created_at": "When the run was created (UTC).",
        "run_finished_at": "When the last product was classified (UTC); NULL while running.",
        "wall_s": "Seconds from creation to finish; NULL while running.",
        "n_rows": "Data rows read from the feed.",
        "n_products": "Products accepted (rows that were not rejected).",
        "n_rejects": "Rows rejected at ingest (see reject_details).",
        "n_predicted": "Products with a prediction.",
        "n_pending": "Products not classified yet.",
        "n_failed": "Products that failed after retries (`shapstack requeue RUN`).",
        "n_dead": "Products parked in dead_letters (`shapstack dead-letters RUN`).",
        "mean_confidence": "Mean stacker probability of the predicted category.",
    }),
    "product_predictions": ("One row per classified product: prediction, base models, reliance on text vs image.", {
        "run_id": "The run.",
        "feed": "Feed file of the run.",
        "bundle_id": "Model bundle that classified the product.",
        "run_created_at": "When the run was created (UTC).",
        "product_pk": "Primary key of the product row (products.id).",
        "product_id": "The product's id in the feed.",
        "title": "Product title (as ingested, possibly truncated).",
        "group_id": "Group of the product in the feed (e.g. a parent article); NULL when absent.",
        "label": "True category from the feed's category column; NULL when unlabelled.",
        "category": "Predicted category (the stacker's).",
        "confidence": "Stacker probability of the predicted category, 0..1.",
        "correct": "Whether category equals label; NULL when unlabelled.",
        "stacker": "Meta-model that made the prediction.",
        "text_category": "Category of the text model alone.",
        "image_category": "Category of the image model alone.",
        "multimodal_category": "Category of the multimodal model alone.",
        "base_models_agree": "Whether the text, image and multimodal models predict the same category.",
        "missing_modality": "image or text when the product had none; NULL when it had both.",
        "t_shap": "MM-SHAP text share of the multimodal model, 0 (image only) .. 1 (text only).",
        "v_shap": "MM-SHAP image share, 1 - t_shap.",
        "t_shap_stderr": "Standard error of t_shap from the sampled Shapley estimate (its error bar).",
        "mmshap_evaluations": "Model evaluations spent on the product's MM-SHAP (the budget actually used).",
        "mmshap_mode": "How image players were formed: token (image embeddings) or pixel (patch grid).",
        "predicted_at": "When the prediction was stored (UTC).",
    }),
    "category_accuracy": ("Per run, stacker and category where labels exist: support, precision, recall, F1.", {
        "run_id": "The run.",
        "feed": "Feed file of the run.",
        "bundle_id": "Model bundle of the run.",
        "run_created_at": "When the run was created (UTC).",
        "stacker": "Meta-model that made the predictions.",
        "category": "A category that is a label or a prediction of some labelled product.",
        "support": "Labelled products whose label is this category.",
        "n_predicted": "Labelled products predicted as this category.",
        "n_correct": "Labelled products of this category predicted correctly.",
        "precision": "n_correct / n_predicted; NULL when nothing was predicted as it.",
        "recall": "n_correct / support; NULL when no product has this label.",
        "f1": "Harmonic mean of precision and recall: 2 n_correct / (support + n_predicted).",
    }),
    "reject_details": ("One row per rejected feed row: a stable reason code plus the full reason.", {
        "run_id": "The run.",
        "feed": "Feed file of the run.",
        "bundle_id": "Model bundle of the run (NULL when only ingested).",
        "run_created_at": "When the run was created (UTC).",
        "row": "Data row number in the feed (1 = first row after the header).",
        "raw_id": "The row's product_id as read, when there was one.",
        "code": "Reason code (missing_id, duplicate_id, image_missing, image_corrupt, ...; other).",
        "reason": "The full reason, with its detail (sizes, limits, column names).",
    }),
    "rejects_by_code": ("Per run and reason code: how many rows were rejected and their share of the feed.", {
        "run_id": "The run.",
        "feed": "Feed file of the run.",
        "bundle_id": "Model bundle of the run (NULL when only ingested).",
        "run_created_at": "When the run was created (UTC).",
        "code": "Reason code.",
        "n_rejects": "Rows rejected with this code.",
        "share_of_rows": "n_rejects / rows read from the feed.",
        "example_reason": "One full reason of this code (the alphabetically first).",
    }),
    "collapse_flags": ("Collapse metrics pivoted: one row per run (category NULL) and per large predicted category.", {
        "run_id": "The run.",
        "feed": "Feed file of the run.",
        "bundle_id": "Model bundle of the run.",
        "run_created_at": "When the run was created (UTC).",
        "category": "Predicted category; NULL for the whole run.",
        "n_products": "Products the metrics are computed over.",
        "mean_t_shap": "Mean T-SHAP (evidence for the flags).",
        "std_t_shap": "Standard deviation of T-SHAP.",
        "text_dominated_share": "Share of products with T-SHAP > 0.9 (evidence for text_collapse).",
        "image_dominated_share": "Share of products with T-SHAP < 0.1 (evidence for image_collapse).",
        "agree_text": "Share where the multimodal model agrees with the text model.",
        "agree_image": "Share where the multimodal model agrees with the image model.",
        "drift_t_shap": "mean_t_shap minus the training-time mean (evidence for drift); NULL without a reference.",
        "text_collapse": "Flag: text_dominated_share above the threshold (collapse.text_share).",
        "image_collapse": "Flag: image_dominated_share above the threshold (collapse.image_share).",
        "drift": "Flag: |drift_t_shap| above the threshold (collapse.drift); NULL without a reference.",
    }),
    "category_summary": ("Per run, stacker and predicted category: count, mean confidence, share.", {
        "run_id": "The run.", "category": "Predicted category.", "n_products": "Products predicted as it.",
        "mean_confidence": "Mean stacker probability.", "share": "n_products / products predicted in the run.",
        "stacker": "Meta-model.", "feed": "Feed file of the run.", "bundle_id": "Model bundle of the run.",
        "run_created_at": "When the run was created (UTC).",
    }),
    "modality_by_category": ("Per run, stacker and predicted category: the distribution of T-SHAP.", {
        "run_id": "The run.", "stacker": "Meta-model.", "category": "Predicted category.",
        "n_products": "Products predicted as it.",
        "n_t_shap": "Products with a T-SHAP (NULL T-SHAP: a modality missing, or not estimated).",
        "mean_t_shap": "Mean T-SHAP (NULLs left out).", "std_t_shap": "Std of T-SHAP.",
        "text_dominated_share": "Share with T-SHAP > 0.9.", "image_dominated_share": "Share with T-SHAP < 0.1.",
        "mean_game_text_share": "Mean text share of the exact two-player modality game.",
        "feed": "Feed file of the run.", "bundle_id": "Model bundle of the run.",
        "run_created_at": "When the run was created (UTC).",
    }),
}


def _metric(name: str) -> str:
    return f"max(CASE WHEN m.metric = '{name}' THEN m.value END)"


def _flag(name: str) -> str:
    if _pg():
        return f"bool_or(m.value > 0.5) FILTER (WHERE m.metric = '{name}')"
    return f"max(CASE WHEN m.metric = '{name}' THEN m.value > 0.5 END)"


def _views() -> dict[str, str]:
    return {
        "run_overview": f"""
        SELECT r.id AS run_id, r.feed AS feed, r.mode AS mode, r.status AS status, r.bundle_id AS bundle_id,
               v.preset AS preset, r.stacker AS stacker, r.created_at AS run_created_at,
               r.finished_at AS run_finished_at, {_seconds("r.finished_at", "r.created_at")} AS wall_s,
               r.n_rows AS n_rows,
               (SELECT count(*) FROM products p WHERE p.run_id = r.id) AS n_products,
               (SELECT count(*) FROM rejects j WHERE j.run_id = r.id) AS n_rejects,
               (SELECT count(*) FROM predictions q WHERE q.run_id = r.id) AS n_predicted,
               (SELECT count(*) FROM products p WHERE p.run_id = r.id AND p.status = 'pending') AS n_pending,
               (SELECT count(*) FROM products p WHERE p.run_id = r.id AND p.status = 'failed') AS n_failed,
               (SELECT count(*) FROM dead_letters d WHERE d.run_id = r.id) AS n_dead,
               (SELECT avg(q.confidence) FROM predictions q WHERE q.run_id = r.id) AS mean_confidence
        FROM runs r LEFT JOIN model_versions v ON v.id = r.bundle_id""",
        # issue 11 adds columns to modality_contributions (method, n_players, met_target, reason):
        # they belong after mmshap_mode here, in that migration's re-creation of this view
        "product_predictions": f"""
        SELECT q.run_id AS run_id, {RUN_COLUMNS}, p.id AS product_pk, p.product_id AS product_id,
               p.title AS title, p.group_id AS group_id, p.label AS label, q.category AS category,
               q.confidence AS confidence,
               CASE WHEN p.label IS NULL THEN NULL ELSE p.label = q.category END AS correct,
               q.stacker AS stacker, q.text_category AS text_category, q.image_category AS image_category,
               q.multimodal_category AS multimodal_category,
               (q.text_category = q.image_category AND q.image_category = q.multimodal_category) AS base_models_agree,
               q.missing AS missing_modality, c.t_shap AS t_shap, c.v_shap AS v_shap, c.stderr AS t_shap_stderr,
               c.n_evaluations AS mmshap_evaluations, c.mode AS mmshap_mode, q.created_at AS predicted_at
        FROM predictions q
        JOIN products p ON p.id = q.product_pk
        JOIN runs r ON r.id = q.run_id
        LEFT JOIN modality_contributions c ON c.product_pk = q.product_pk""",
        "category_accuracy": f"""
        WITH labelled AS (
            SELECT q.run_id AS run_id, q.stacker AS stacker, q.category AS category, p.label AS label
            FROM predictions q JOIN products p ON p.id = q.product_pk WHERE p.label IS NOT NULL),
        classes AS (
            SELECT run_id, stacker, label AS category FROM labelled
            UNION SELECT run_id, stacker, category FROM labelled),
        counts AS (
            SELECT c.run_id AS run_id, c.stacker AS stacker, c.category AS category,
                   sum(CASE WHEN l.label = c.category THEN 1 ELSE 0 END) AS support,
                   sum(CASE WHEN l.category = c.category THEN 1 ELSE 0 END) AS n_predicted,
                   sum(CASE WHEN l.label = c.category AND l.category = c.category THEN 1 ELSE 0 END) AS n_correct
            FROM classes c JOIN labelled l ON l.run_id = c.run_id AND l.stacker = c.stacker
                 AND (l.label = c.category OR l.category = c.category)
            GROUP BY c.run_id, c.stacker, c.category)
        SELECT k.run_id AS run_id, {RUN_COLUMNS}, k.stacker AS stacker, k.category AS category,
               k.support AS support, k.n_predicted AS n_predicted, k.n_correct AS n_correct,
               k.n_correct * 1.0 / NULLIF(k.n_predicted, 0) AS precision,
               k.n_correct * 1.0 / NULLIF(k.support, 0) AS recall,
               2.0 * k.n_correct / NULLIF(k.support + k.n_predicted, 0) AS f1
        FROM counts k JOIN runs r ON r.id = k.run_id""",
        "reject_details": f"""
        SELECT j.run_id AS run_id, {RUN_COLUMNS}, j.row AS row, j.raw_id AS raw_id,
               {code_sql("j.reason")} AS code, j.reason AS reason
        FROM rejects j JOIN runs r ON r.id = j.run_id""",
        "rejects_by_code": """
        SELECT d.run_id AS run_id, d.feed AS feed, d.bundle_id AS bundle_id, d.run_created_at AS run_created_at,
               d.code AS code, count(*) AS n_rejects,
               count(*) * 1.0 / NULLIF(max(r.n_rows), 0) AS share_of_rows, min(d.reason) AS example_reason
        FROM reject_details d JOIN runs r ON r.id = d.run_id
        GROUP BY d.run_id, d.feed, d.bundle_id, d.run_created_at, d.code""",
        "collapse_flags": f"""
        SELECT m.run_id AS run_id, {RUN_COLUMNS},
               CASE WHEN m.scope = 'all' THEN NULL ELSE m.scope END AS category,
               {_metric("n")} AS n_products, {_metric("mean_t_shap")} AS mean_t_shap,
               {_metric("std_t_shap")} AS std_t_shap, {_metric("text_dominated_share")} AS text_dominated_share,
               {_metric("image_dominated_share")} AS image_dominated_share, {_metric("agree_text")} AS agree_text,
               {_metric("agree_image")} AS agree_image, {_metric("drift_t_shap")} AS drift_t_shap,
               {_flag("flag_text_collapse")} AS text_collapse, {_flag("flag_image_collapse")} AS image_collapse,
               {_flag("flag_drift")} AS drift
        FROM collapse_metrics m JOIN runs r ON r.id = m.run_id
        GROUP BY m.run_id, r.feed, r.bundle_id, r.created_at, m.scope""",
        "category_summary": f"""
        SELECT p.run_id AS run_id, p.category AS category, count(*) AS n_products,
               avg(p.confidence) AS mean_confidence,
               count(*) * 1.0 / (SELECT count(*) FROM predictions q
                                 WHERE q.run_id = p.run_id AND q.stacker = p.stacker) AS share,
               p.stacker AS stacker, {RUN_COLUMNS}
        FROM predictions p JOIN runs r ON r.id = p.run_id
        GROUP BY p.run_id, p.stacker, p.category, r.feed, r.bundle_id, r.created_at""",
        "modality_by_category": f"""
        SELECT c.run_id AS run_id, p.stacker AS stacker, p.category AS category, count(*) AS n_products,
               count(c.t_shap) AS n_t_shap, avg(c.t_shap) AS mean_t_shap, {_std("c.t_shap")} AS std_t_shap,
               avg(CASE WHEN c.t_shap IS NULL THEN NULL WHEN c.t_shap > 0.9 THEN 1.0 ELSE 0.0 END)
                   AS text_dominated_share,
               avg(CASE WHEN c.t_shap IS NULL THEN NULL WHEN c.t_shap < 0.1 THEN 1.0 ELSE 0.0 END)
                   AS image_dominated_share,
               avg(c.game_text_share) AS mean_game_text_share, {RUN_COLUMNS}
        FROM modality_contributions c
        JOIN predictions p ON p.product_pk = c.product_pk
        JOIN runs r ON r.id = c.run_id
        GROUP BY c.run_id, p.stacker, p.category, r.feed, r.bundle_id, r.created_at""",
    }


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def upgrade() -> None:
    # the options classify was given (MM-SHAP budget and mode, split), read by the workers of a distributed run
    op.add_column("runs", sa.Column("options", sa.JSON(), nullable=True))
    op.execute("DROP VIEW IF EXISTS modality_by_category")
    op.execute("DROP VIEW IF EXISTS category_summary")
    for name, sql in _views().items():
        op.execute(f"CREATE VIEW {name} AS {sql}")
    if _pg():
        for name, (comment, columns) in COMMENTS.items():
            op.execute(f"COMMENT ON VIEW {name} IS {_quote(comment)}")
            for column, text in columns.items():
                op.execute(f"COMMENT ON COLUMN {name}.{column} IS {_quote(text)}")


def downgrade() -> None:
    for name in reversed(list(_views())):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    # the views of 0002, as they were
    op.execute("""
        CREATE VIEW category_summary AS
        SELECT p.run_id AS run_id, p.category AS category, count(*) AS n_products,
               avg(p.confidence) AS mean_confidence,
               count(*) * 1.0 / (SELECT count(*) FROM predictions q
                                 WHERE q.run_id = p.run_id AND q.stacker = p.stacker) AS share,
               p.stacker AS stacker
        FROM predictions p
        GROUP BY p.run_id, p.stacker, p.category""")
    op.execute(f"""
        CREATE VIEW modality_by_category AS
        SELECT c.run_id AS run_id, p.stacker AS stacker, p.category AS category, count(*) AS n_products,
               avg(c.t_shap) AS mean_t_shap, {_std("c.t_shap")} AS std_t_shap,
               avg(CASE WHEN c.t_shap > 0.9 THEN 1.0 ELSE 0.0 END) AS text_dominated_share,
               avg(CASE WHEN c.t_shap < 0.1 THEN 1.0 ELSE 0.0 END) AS image_dominated_share
        FROM modality_contributions c
        JOIN predictions p ON p.product_pk = c.product_pk
        GROUP BY c.run_id, p.stacker, p.category""")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("options")
