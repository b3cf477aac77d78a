"""The BI views on a classified run: docs/bi.md's queries run as written on PostgreSQL, every view and
column is documented and commented, the numbers agree with the rows, and the read-only role can
read and nothing else."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine, inspect, text

from conftest import classify_with_rejects
from db.engine import connect
from db.reject_codes import reject_code

pytestmark = [pytest.mark.postgres]

DOC = Path(__file__).parent.parent / "docs" / "bi.md"
VIEWS = ("run_overview", "product_predictions", "category_accuracy", "reject_details", "rejects_by_code",
         "collapse_flags", "category_summary", "modality_by_category")


def shapstack(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shapstack", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


def doc_queries() -> list[str]:
    return re.findall(r"```sql\n(.*?)```", DOC.read_text(), re.S)


@pytest.fixture
def classified(pg_url, quick_bundle, tmp_path):
    """A PostgreSQL database with one classified run (labels, missing modalities, two rejects)."""
    feed, bundle = quick_bundle
    classify_with_rejects(feed, bundle, pg_url, tmp_path)
    return pg_url


def test_doc_queries_run_on_postgresql(classified):
    queries = doc_queries()
    assert len(queries) >= 6
    engine = create_engine(classified.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        results = [conn.execute(text(q)).all() for q in queries]
    engine.dispose()
    assert sum(1 for rows in results if rows) >= len(queries) - 1, [len(r) for r in results]


def test_every_view_and_column_documented_and_commented(classified):
    engine = create_engine(classified.replace("postgresql://", "postgresql+psycopg://"))
    doc = DOC.read_text()
    names = set(inspect(engine).get_view_names())
    assert set(VIEWS) <= names
    with engine.connect() as conn:
        for view in VIEWS:
            assert f"### {view}" in doc, view
            section = doc.split(f"### {view}", 1)[1].split("\n### ", 1)[0]
            assert conn.execute(text("SELECT obj_description(CAST(:v AS regclass))"), {"v": view}).scalar(), view
            columns = conn.execute(text("""SELECT a.attname, col_description(a.attrelid, a.attnum)
                                           FROM pg_attribute a WHERE a.attrelid = CAST(:v AS regclass)
                                           AND a.attnum > 0 ORDER BY a.attnum"""), {"v": view}).all()
            for column, comment in columns:
                assert f"| `{column}` |" in section, (view, column)
                assert comment, (view, column)
    engine.dispose()


def test_views_agree_with_the_rows(classified):
    from sklearn.metrics import precision_recall_fscore_support

    factory = connect(classified)
    with factory() as s:
        rows = s.execute(text("SELECT label, category, correct, t_shap, missing_modality FROM product_predictions")).all()
        accuracy = {r.category: r for r in s.execute(text("SELECT * FROM category_accuracy")).all()}
        rejects = s.execute(text("SELECT code, reason FROM reject_details")).all()
        by_code = dict(s.execute(text("SELECT code, n_rejects FROM rejects_by_code")).all())
        run = s.execute(text("SELECT * FROM run_overview")).one()
        flags = s.execute(text("SELECT * FROM collapse_flags WHERE category IS NULL")).one()
        metrics = dict(s.execute(text("SELECT metric, value FROM collapse_metrics WHERE scope = 'all'")).all())
    labelled = [r for r in rows if r.label is not None]
    assert len(labelled) == len(rows) == run.n_predicted == run.n_products > 0
    assert all(r.correct == (r.label == r.category) for r in rows)
    assert {r.missing_modality for r in rows} >= {None, "image", "text"}
    classes = sorted(accuracy)
    p, rc, f, support = precision_recall_fscore_support([r.label for r in labelled], [r.category for r in labelled],
                                                        labels=classes, zero_division=0)
    for i, c in enumerate(classes):
        a = accuracy[c]
        assert a.support == support[i]
        assert abs(float(a.recall or 0) - rc[i]) < 1e-9 and abs(float(a.f1 or 0) - f[i]) < 1e-9
        assert a.precision is None or abs(float(a.precision) - p[i]) < 1e-9
    assert sorted(code for code, _ in rejects) == ["image_missing", "no_content"]
    assert all(code == reject_code(reason) for code, reason in rejects)
    assert by_code == Counter(code for code, _ in rejects) and run.n_rejects == 2
    assert run.status == "done" and run.wall_s > 0 and run.bundle_id and run.feed.endswith(".csv")
    if "mean_t_shap" in metrics:  # absent (NULL in the view) when no product of the run has a T-SHAP
        assert abs(flags.mean_t_shap - metrics["mean_t_shap"]) < 1e-12
    else:
        assert flags.mean_t_shap is None
    assert flags.n_products == run.n_predicted
    assert bool(flags.text_collapse) == bool(metrics.get("flag_text_collapse", 0))


def test_read_only_role(classified, tmp_path):
    role = f"bi_{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "BI_TEST_PASSWORD": "pw-" + role}
    r = shapstack("--db", classified, "db", "grant-readonly", role, "--password-env", "BI_TEST_PASSWORD",
                  cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    admin = psycopg.connect(classified, autocommit=True)
    try:
        host, name = classified.split("@", 1)[1].split("/", 1)
        with psycopg.connect(f"postgresql://{role}:pw-{role}@{host}/{name}") as conn:
            assert conn.execute("SELECT count(*) FROM product_predictions").fetchone()[0] > 0
            assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 1
            for statement in ("DELETE FROM predictions", "CREATE TABLE mine (x int)"):
                with pytest.raises(psycopg.Error):
                    conn.execute(statement)
                conn.rollback()
        r = shapstack("--db", classified, "db", "grant-readonly", role, cwd=tmp_path)  # again: idempotent
        assert r.returncode == 0, r.stderr
    finally:
        admin.execute(f'DROP OWNED BY "{role}"')
        admin.execute(f'DROP ROLE "{role}"')
        admin.close()


def test_views_on_sqlite_and_grant_refused(tmp_path):
    """The embedded database has the same views; a read-only role is PostgreSQL's."""
    from pipeline.synthetic import make_catalogue

    feed = make_catalogue(tmp_path / "cat", 12, 2, image_size=16)
    with open(feed, "a") as fh:
        fh.write("P000001,G,dup,,,text_01,text,0\n,G,no id,,,text_01,text,0\n")
    assert shapstack("ingest", str(feed), cwd=tmp_path).returncode == 0
    factory = connect(f"sqlite:///{tmp_path / 'shapstack.db'}")
    with factory() as s:
        assert sorted(s.execute(text("SELECT code FROM reject_details")).scalars()) == ["duplicate_id", "missing_id"]
        run = s.execute(text("SELECT n_products, n_rejects, n_pending, status FROM run_overview")).one()
    assert tuple(run) == (12, 2, 12, "ingested")
    r = shapstack("db", "grant-readonly", "bi", cwd=tmp_path)
    assert r.returncode == 2 and "PostgreSQL" in r.stderr
