"""Retrains recorded in the database with their state, on SQLite and PostgreSQL: running while their
worker beats, done or failed when they end, failed (abandoned) once their worker is dead, for a
record written by hand and for a real `shapstack worker` SIGKILLed mid-training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from sqlalchemy import select

from db import models as m
from db.claims import heartbeat, mark_worker
from db.engine import connect
from db.retrains import abandon_dead, end_retrain, list_retrains, start_retrain
from test_distributed import broker_url, wait_until  # noqa: F401 - broker_url is a fixture


def test_a_retrain_runs_ends_and_is_abandoned_when_its_worker_dies(db_url):
    factory = connect(db_url)
    with factory() as s, s.begin():
        ok = start_retrain(s, "task-ok", "w1/1", 60, "/b/ok", [1, 2], {"preset": "tiny"})
        bad = start_retrain(s, "task-bad", "w1/1", 60, "/b/bad", [], {})
        killed = start_retrain(s, "task-killed", "w2/7", 60, "/b/killed", [3], {})
        expired = start_retrain(s, None, "w3/9", -1, "/b/expired", [], {})  # its lease already ran out
        heartbeat(s, "w1/1", "train", 60)
        heartbeat(s, "w2/7", "train", 60)
        heartbeat(s, "w3/9", "train", -1)  # a beat renews its lease, to a time already past
    with factory() as s, s.begin():
        assert start_retrain(s, "task-ok", "w1/1", 60, "/b/ok", [1, 2], {"preset": "tiny"}) == ok  # a retry: same row
        end_retrain(s, ok, bundle_id="bundle-9")
        end_retrain(s, bad, error="UserError: no labelled products")
        assert abandon_dead(s, 30) == [expired]
        mark_worker(s, "w2/7", "fatal", "CUDA error")
        assert abandon_dead(s, 30) == [killed]
        assert abandon_dead(s, 30) == []
    with factory() as s:
        rows = {r.id: r for r in list_retrains(s)}
    assert (rows[ok].state, rows[ok].bundle_id, rows[ok].runs, rows[ok].config) == ("done", "bundle-9", [1, 2],
                                                                                   {"preset": "tiny"})
    assert rows[ok].finished_at is not None and rows[ok].started_at is not None and rows[ok].error is None
    assert (rows[bad].state, rows[bad].error) == ("failed", "UserError: no labelled products")
    assert rows[killed].state == "failed" and "w2/7 died or stopped" in rows[killed].error
    assert rows[expired].state == "failed" and rows[killed].finished_at is not None
    assert list(rows) == sorted(rows, reverse=True)


def test_a_live_worker_keeps_its_retrain_running(db_url):
    factory = connect(db_url)
    with factory() as s, s.begin():
        rid = start_retrain(s, "t", "w/1", 60, "/b", [], {})
        heartbeat(s, "w/1", "train", 60)
    with factory() as s, s.begin():
        assert abandon_dead(s, 30) == []
        assert s.get(m.Retrain, rid).state == "running"


@pytest.mark.slow
@pytest.mark.redis
def test_a_killed_retrain_shows_as_failed(db_url, broker_url, tmp_path):  # noqa: F811
    """A train worker SIGKILLed mid-training: `shapstack retrain --list` says failed, and why."""
    from pipeline.synthetic import make_catalogue

    feed = make_catalogue(tmp_path / "feed", 120, 6, seed=2, image_size=32)
    env = {**os.environ, "SHAPSTACK_DATABASE_URL": db_url, "SHAPSTACK_BROKER_URL": broker_url,
           "SHAPSTACK_ALLOW_SQLITE": "1", "SHAPSTACK_HEARTBEAT_S": "1", "SHAPSTACK_DEVICE": "cpu"}
    env.pop("SHAPSTACK_CONFIG", None)

    def shapstack(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "shapstack", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=240)

    r = shapstack("ingest", str(feed))
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "train.log", "w") as log:
        worker = subprocess.Popen([sys.executable, "-m", "shapstack", "worker", "--queues", "train", "--allow-sqlite",
                                   "--hostname", "train@%h"], cwd=tmp_path, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        r = shapstack("retrain", "--out", str(tmp_path / "new"), "--preset", "tiny", "--folds", "2",
                      "--min-class-size", "5", "--epochs", "1")
        assert r.returncode == 0, r.stderr
        factory = connect(db_url)

        def running() -> bool:
            with factory() as s:
                return list(s.scalars(select(m.Retrain.state))) == ["running"]

        wait_until(running, 120, "the retrain to start", every=0.2,
                   detail=lambda: (tmp_path / "train.log").read_text())
        os.killpg(worker.pid, signal.SIGKILL)  # the worker and its pool, mid-training
        worker.wait(10)

        def listed():
            r = shapstack("retrain", "--list", "--json")
            assert r.returncode == 0, r.stderr
            rows = json.loads(r.stdout)
            return rows if rows[0]["state"] == "failed" else None

        [row] = wait_until(listed, 60, "the killed retrain to be marked failed")
        assert row["out"] == str(tmp_path / "new") and row["runs"] == [] and row["bundle"] is None
        assert row["worker"].startswith("train@") and "died or stopped before it finished" in row["error"]
        text = shapstack("retrain", "--list")
        assert f"retrain {row['id']}: failed" in text.stdout and "abandoned" in text.stdout
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(10)
