"""A run's collapse counts (pipeline.collapse.counts, per predicted category) by one GROUP BY query.

The aggregation runs every two minutes while a run classifies: reading the counts from the
database costs one row per category, where loading the rows cost one per product. The counts are
the same as pipeline.collapse.counts() on the same rows (tests/test_collapse_sql.py), on
PostgreSQL and SQLite; pipeline.collapse still decides the metrics and flags from them.
"""

from __future__ import annotations

from sqlalchemy import and_, case, func, or_, select

from db import models as m
from pipeline.collapse import IMAGE_DOMINATED, TEXT_DOMINATED

FINITE = 1e300  # BETWEEN -FINITE AND FINITE leaves out NaN and infinities, as numpy's isfinite


def _count(condition):
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


def _sum(condition, value):
    return func.coalesce(func.sum(case((condition, value), else_=None)), 0.0)


def run_stacker(session, run_id: int) -> str | None:
    """The stacker whose predictions the run's collapse metrics describe: the run's, else any stored."""
    stacker = session.scalar(select(m.Run.stacker).where(m.Run.id == run_id))
    return stacker or session.scalar(select(m.Prediction.stacker).where(m.Prediction.run_id == run_id).limit(1))


def collapse_counts(session, run_id: int, stacker: str | None) -> dict[str, dict]:
    """{predicted category: counts} of the run's explained and predicted products (by stacker)."""
    p, c, pr = m.Prediction, m.ModalityContribution, m.Product
    t = c.t_shap
    both = or_(p.missing.is_(None), p.missing.notin_(("text", "image")))
    valid = and_(both, t.between(-FINITE, FINITE))
    disagree = and_(both, p.text_category.is_distinct_from(p.image_category))
    known = and_(disagree, pr.label.is_not(None), pr.label != "")
    columns = {
        "n": func.count(),
        "n_reliance": _count(valid),
        "sum_t": _sum(valid, t),
        "sumsq_t": _sum(valid, t * t),
        "n_disagree": _count(disagree),
        "follow_text": _count(and_(disagree, p.multimodal_category.is_not_distinct_from(p.text_category))),
        "follow_image": _count(and_(disagree, p.multimodal_category.is_not_distinct_from(p.image_category))),
        "n_both": _count(both),
        "n_text_dominated": _count(and_(valid, t > TEXT_DOMINATED)),
        "n_image_dominated": _count(and_(valid, t < IMAGE_DOMINATED)),
        "agree_text": _count(and_(both, p.multimodal_category.is_not_distinct_from(p.text_category))),
        "agree_image": _count(and_(both, p.multimodal_category.is_not_distinct_from(p.image_category))),
        "n_labelled_disagree": _count(known),
        "text_right": _count(and_(known, p.text_category == pr.label)),
        "image_right": _count(and_(known, p.image_category == pr.label)),
    }
    q = (select(p.category, *(col.label(name) for name, col in columns.items()))
         .select_from(c)
         .join(p, p.product_pk == c.product_pk)
         .join(pr, pr.id == c.product_pk)
         .where(c.run_id == run_id)
         .group_by(p.category))
    if stacker is not None:
        q = q.where(p.stacker == stacker)
    out = {}
    for row in session.execute(q):
        values = row._mapping
        out[row[0]] = {name: (float(values[name]) if name.startswith("sum") else int(values[name])) for name in columns}
    return out
