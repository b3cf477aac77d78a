"""Shared fixtures: generated catalogues and real databases (SQLite file and PostgreSQL)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get("SHAPSTACK_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("SHAPSTACK_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_SERVICES = os.environ.get("SHAPSTACK_REQUIRE_SERVICES") == "1"


def service_missing(what: str, exc: Exception) -> None:
    """In CI a missing service is a failure; on a laptop without it the test is skipped."""
    if REQUIRE_SERVICES:
        pytest.fail(f"{what} not reachable: {exc}")
    pytest.skip(f"{what} not reachable: {exc}")


@pytest.fixture(scope="session")
def catalogue(tmp_path_factory) -> Path:
    """A small synthetic catalogue with every class kind; read-only for tests."""
    from pipeline.synthetic import make_catalogue

    return make_catalogue(tmp_path_factory.mktemp("catalogue"), 120, 6, seed=1, image_size=48)


def _fresh_pg_database() -> str:
    import psycopg

    name = f"shapstack_test_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        service_missing("PostgreSQL", exc)
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def _drop_pg_database(url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    from db.engine import connect

    connect.cache_clear()
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url():
    url = _fresh_pg_database()
    yield url
    _drop_pg_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """Every database test runs on the embedded default and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shapstack.db'}"
        return
    url = _fresh_pg_database()
    yield url
    _drop_pg_database(url)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """(feed, bundle): a tiny-preset bundle trained once per session on a generated catalogue,
    with a quarter of the groups held out (`--split test`) and a few products missing a modality."""
    from pipeline.synthetic import make_catalogue
    from train.data import TrainConfig
    from train.train_bundle import train_bundle

    root = tmp_path_factory.mktemp("tiny")
    feed = make_catalogue(root / "cat", 320, 6, seed=1, image_size=32, drop_image=0.04, drop_text=0.04)
    cfg = TrainConfig(preset="tiny", folds=2, min_class_size=5, mmshap_budget=160, test_fraction=0.25, seed=0,
                      paper_epochs=300)
    train_bundle(feed, root / "bundle", cfg, log=lambda *a: None)
    return feed, root / "bundle"


@pytest.fixture(scope="session")
def quick_bundle(tmp_path_factory):
    """(feed, bundle): like tiny_bundle but trained in seconds (one epoch, one held-out fold, the
    mmshap stacker only), for tests of what surrounds the models: CLI, exports, BI, the report."""
    from pipeline.synthetic import make_catalogue
    from train.data import TrainConfig
    from train.train_bundle import train_bundle

    root = tmp_path_factory.mktemp("quick")
    feed = make_catalogue(root / "cat", 160, 4, seed=3, image_size=32, drop_image=0.06, drop_text=0.06)
    cfg = TrainConfig(preset="tiny", folds=1, min_class_size=5, mmshap_budget=160, epochs=1, test_fraction=0.25,
                      seed=0, stackers=("mmshap",))
    train_bundle(feed, root / "bundle", cfg, log=lambda *a: None)
    return feed, root / "bundle"


def classify_with_rejects(feed, bundle, database_url: str, cwd) -> None:
    """Classify the test side of feed plus two bad rows (an image that is not there, a row with
    nothing usable) into database_url, as a user does (a `shapstack` subprocess)."""
    import subprocess
    import sys

    mine = feed.parent / f"copy-{uuid.uuid4().hex[:8]}.csv"  # images are relative to the feed's folder
    mine.write_text(feed.read_text() + "P900001,G,no image,,missing.jpg,text_01,text,0\nP900002,G,,,,text_01,text,0\n")
    try:
        r = subprocess.run([sys.executable, "-m", "shapstack", "--db", database_url, "classify", str(mine),
                            "--bundle", str(bundle), "--split", "test", "--mmshap-budget", "160"],
                           cwd=cwd, capture_output=True, text=True, timeout=600)
    finally:
        mine.unlink()
    assert r.returncode == 0, r.stderr
