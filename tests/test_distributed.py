"""The distributed mode for real: Redis, PostgreSQL and `shapstack worker` processes, killed and restarted.

Each test has a fresh PostgreSQL database and a Redis database number of its own (flushed before
and after), and stops every process it started. The task time limit is LIMIT_S. Faults at the
default settings, with private Redis and PostgreSQL servers, are in test_faults.py.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

import pytest
from sqlalchemy import create_engine, text

from conftest import REDIS_URL, service_missing
from pipeline.manifest import base_kinds, read_manifest

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

LIMIT_S = 15
REDIS_RESTART = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379", "--save", "",
                 "--appendonly", "no", "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log"]


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    """A tiny bundle with the sparse text model as a fourth base model, trained once (on other
    products than the feeds classified below)."""
    from pipeline.synthetic import make_catalogue
    from train.data import TrainConfig
    from train.train_bundle import train_bundle

    root = tmp_path_factory.mktemp("dist-bundle")
    feed = make_catalogue(root / "train", 120, 6, seed=1, image_size=32)
    cfg = TrainConfig(preset="tiny", folds=2, min_class_size=5, mmshap_budget=160, epochs=1, stackers=("mmshap",),
                      test_fraction=0.25, tfidf=True)
    train_bundle(feed, root / "bundle", cfg, log=lambda *a: None)
    return root / "bundle"


@pytest.fixture(scope="session")
def feed500(tmp_path_factory) -> Path:
    from pipeline.synthetic import make_catalogue

    return make_catalogue(tmp_path_factory.mktemp("dist-feed"), 500, 6, seed=2, image_size=32)


@pytest.fixture
def broker_url():
    """A Redis database number nobody uses, flushed before and after the test."""
    import redis

    base, number = REDIS_URL.rsplit("/", 1)
    try:
        redis.Redis.from_url(base + "/0", socket_timeout=5).ping()
    except redis.exceptions.RedisError as exc:
        service_missing("Redis", exc)
    if number not in ("", "0"):  # SHAPSTACK_TEST_REDIS_URL names the database this checkout may use
        n = int(number)
        redis.Redis.from_url(f"{base}/{n}").flushdb()
    else:
        for n in range(15, 0, -1):
            client = redis.Redis.from_url(f"{base}/{n}")
            if client.dbsize() == 0:
                break
    url = f"{base}/{n}"
    yield url
    _ensure_redis()
    redis.Redis.from_url(url).flushdb()


def _redis_up() -> bool:
    return subprocess.run(["redis-cli", "-p", "6379", "ping"], capture_output=True, text=True).stdout.strip() == "PONG"


def _ensure_redis() -> None:
    """Whatever happened in the test, Redis runs afterwards."""
    if not _redis_up():
        for folder in ("/var/lib/redis", "/var/log/redis"):
            os.makedirs(folder, exist_ok=True)
        subprocess.run(REDIS_RESTART, check=True)
        wait_until(_redis_up, 30, "Redis to restart")


def wait_until(predicate: Callable[[], object], timeout: float, what: str, every: float = 0.25, detail=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{detail()}")


class Cluster:
    """The worker processes of one test, their shared environment, and the database they write."""

    def __init__(self, root: Path, database_url: str, broker_url: str, bundle: Path, **env: str):
        self.root, self.database_url = root, database_url
        self.kinds = base_kinds(read_manifest(bundle))
        self.env = {**os.environ, "SHAPSTACK_DATABASE_URL": database_url, "SHAPSTACK_BROKER_URL": broker_url,
                    "SHAPSTACK_BUNDLE": str(bundle), "SHAPSTACK_DEVICE": "cpu",
                    "SHAPSTACK_INFER_BATCH_SIZE": "25", "SHAPSTACK_TASK_TIME_LIMIT_S": str(LIMIT_S), **env}
        self.env.pop("SHAPSTACK_CONFIG", None)
        self.procs: dict[str, subprocess.Popen] = {}
        self.engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg://"))

    def start(self, name: str, queues: str, *args: str, **env: str) -> subprocess.Popen:
        """Start a worker; messages sent before it is up wait in Redis (see ready)."""
        with open(self.root / f"{name}.log", "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "shapstack", "worker", "--queues", queues, "--hostname",
                                     f"{name}@%h", *args], cwd=self.root, env={**self.env, **env}, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def ready(self, name: str) -> None:
        proc = self.procs[name]
        wait_until(lambda: " ready." in self.log(name) or proc.poll() is not None, 90, f"worker {name}")
        assert proc.poll() is None, self.log(name)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- {n} ---\n{self.log(n)[-3000:]}" for n in self.procs)

    def kill(self, name: str) -> None:
        """SIGKILL the worker and its pool processes, as a machine dying would."""
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        self.procs.clear()
        self.engine.dispose()

    def shapstack(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "shapstack", *args], cwd=self.root, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def submit(self, feed: Path, *args: str) -> int:
        r = self.shapstack("classify", str(feed), "--distributed", "--json", *args)
        assert r.returncode == 0, r.stderr + self.logs()
        return json.loads(r.stdout)["run"]

    def query(self, sql: str, **params):
        with self.engine.connect() as conn:
            return conn.execute(text(sql), params).all()

    def predicted(self, run_id: int) -> int:
        return self.query("SELECT count(*) FROM predictions WHERE run_id = :r", r=run_id)[0][0]

    def run_status(self, run_id: int) -> str:
        return self.query("SELECT status FROM runs WHERE id = :r", r=run_id)[0][0]

    def wait_done(self, run_id: int, timeout: float = 150) -> None:
        wait_until(lambda: self.run_status(run_id) in ("done", "done_with_failures"), timeout,
                   f"run {run_id} to finish", every=0.5,
                   detail=lambda: f"{self.progress(run_id)}\n{self.logs()}")

    def progress(self, run_id: int) -> dict:
        r = self.shapstack("status", str(run_id), "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def assert_exactly_once(self, run_id: int, n: int, dead: int = 0) -> None:
        """n accepted products; each one not dead-lettered has one prediction, one contribution, and
        the logits of every base model (four: text, image, multimodal, tfidf)."""
        [(products, predictions, predicted, contributions, logits, dead_letters, done)] = self.query("""
            SELECT (SELECT count(*) FROM products WHERE run_id = :r),
                   (SELECT count(*) FROM predictions WHERE run_id = :r),
                   (SELECT count(DISTINCT product_pk) FROM predictions WHERE run_id = :r),
                   (SELECT count(*) FROM modality_contributions WHERE run_id = :r),
                   (SELECT count(*) FROM base_logits b JOIN products p ON p.id = b.product_pk WHERE p.run_id = :r),
                   (SELECT count(*) FROM dead_letters WHERE run_id = :r),
                   (SELECT count(*) FROM products WHERE run_id = :r AND status = 'done')""", r=run_id)
        assert products == n
        assert predictions == predicted == done == n - dead
        assert self.kinds == ["text", "image", "multimodal", "tfidf"]
        assert contributions == n - dead and logits == len(self.kinds) * (n - dead)
        assert dead_letters == dead
        assert self.query("""SELECT count(*) FROM products p WHERE p.run_id = :r AND p.status = 'done'
                             AND NOT EXISTS (SELECT 1 FROM predictions q WHERE q.product_pk = p.id)""",
                          r=run_id)[0][0] == 0
        assert self.run_status(run_id) == ("done_with_failures" if dead else "done")
        assert self.query("SELECT count(*) FROM collapse_metrics WHERE run_id = :r", r=run_id)[0][0] > 0


@pytest.fixture
def cluster(tmp_path, pg_url, broker_url, bundle):
    c = Cluster(tmp_path, pg_url, broker_url, bundle)
    yield c
    c.stop()


def claimed_in_infer(c: Cluster, run_id: int, started_before: frozenset[int] = frozenset()) -> list[int]:
    """Products an infer worker is working on and has not finished: a batch in flight.

    Working on, not only claimed: between its claim and its work a worker loads the run's models,
    and a kill then charges nothing (workers/poison.py). begin_work counts an attempt, so a product
    is being worked on when its attempts exceed those of earlier starts (one per started_before).
    """
    rows = c.query("""
        SELECT id, attempts FROM products p WHERE run_id = :r AND status = 'pending' AND claimed_by IS NOT NULL
        AND NOT EXISTS (SELECT 1 FROM modality_contributions c WHERE c.product_pk = p.id)""", r=run_id)
    return [pk for pk, attempts in rows if attempts > (pk in started_before)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_500_products_exactly_one_prediction_each_and_monitoring(cluster, feed500):
    cluster.start("infer", "infer")
    cluster.start("rest", "ingest,stack", "--beat")
    t0 = time.monotonic()
    r = cluster.shapstack("classify", str(feed500), "--distributed", "--wait", "--json")
    assert r.returncode == 0, r.stderr + cluster.logs()
    print(f"500 products through 1 infer worker in {time.monotonic() - t0:.1f} s")
    out = json.loads(r.stdout)
    assert (out["run"], out["products"], out["rejects"], out["predicted"], out["failed"], out["dead"]) == (1, 500, 0, 500, 0, 0)
    assert out["stacker"] == "mmshap" and out["status"] == "done" and out["evaluation"]["stacked"]["accuracy"] > 0
    assert out["collapse"]["metrics"]["mean_t_shap"] is not None
    assert "classified 500 products with stacker mmshap" in r.stderr  # the sentences go to stderr with --json
    cluster.assert_exactly_once(1, 500)
    p = cluster.progress(1)
    assert (p["predicted"], p["explained"], p["inferred"], p["dead"], p["by_status"]) == (500, 500, 500, 0, {"done": 500})

    cluster.ready("infer")
    cluster.ready("rest")
    ping = subprocess.run([sys.executable, "-m", "celery", "-A", "shapstack.celery_app", "inspect", "ping", "--timeout", "5"],
                          cwd=cluster.root, env=cluster.env, capture_output=True, text=True, timeout=60)
    assert ping.returncode == 0 and "2 nodes online" in ping.stdout, ping.stdout + ping.stderr

    port = free_port()
    flower = subprocess.Popen([sys.executable, "-m", "celery", "-A", "shapstack.celery_app", "flower", f"--port={port}",
                               "--address=127.0.0.1"], cwd=cluster.root, env=cluster.env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def page(path: str) -> str:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).read().decode()
            except OSError:
                return ""

        wait_until(lambda: page("/healthcheck") == "OK", 60, "Flower")
        wait_until(lambda: "infer@" in page("/workers") and "rest@" in page("/workers"), 30, "Flower to list workers")
    finally:
        os.killpg(flower.pid, signal.SIGKILL)
        flower.wait(10)


def test_infer_worker_killed_mid_batch_and_restarted(cluster, feed500):
    cluster.start("infer", "infer")
    cluster.start("rest", "ingest,stack", "--beat")
    run_id = cluster.submit(feed500)

    # the whole worker, as a machine dying: its message waits in Redis, the sweeper sends it again
    in_flight = wait_until(lambda: claimed_in_infer(cluster, run_id), 90, "a batch in flight", every=0.02)
    cluster.kill("infer")
    again = cluster.start("infer-again", "infer")
    cluster.ready("infer-again")
    # then the pool process alone (an out-of-memory kill): the worker gives its batch back at once
    first = frozenset(in_flight)
    in_flight += wait_until(lambda: claimed_in_infer(cluster, run_id, first), 90, "another batch in flight", every=0.02)
    child = int(subprocess.run(["pgrep", "-P", str(again.pid)], capture_output=True, text=True).stdout.split()[0])
    os.kill(child, signal.SIGKILL)
    assert cluster.predicted(run_id) < 500
    cluster.wait_done(run_id)
    cluster.assert_exactly_once(run_id, 500)
    got = {pk for (pk,) in cluster.query("SELECT product_pk FROM predictions WHERE run_id = :r", r=run_id)}
    assert set(in_flight) <= got
    log = cluster.log("infer-again")
    assert "WorkerLostError" in log and "whose last run died with its worker: splitting" in log


def test_failed_products_are_requeued(cluster, bundle, tmp_path):
    """Infer workers started without the run's bundle: after retries the products fail; once a
    worker has it, `shapstack requeue --status failed` finishes the run."""
    from pipeline.synthetic import make_catalogue

    feed = make_catalogue(tmp_path / "feed", 100, 6, seed=4, image_size=32)
    submitted, moved = tmp_path / "submitted", tmp_path / "moved"
    shutil.copytree(bundle, submitted)
    run_id = cluster.submit(feed, "--bundle", str(submitted))
    submitted.rename(moved)  # the bundle moved after the run was submitted
    cluster.start("rest", "ingest,stack", "--beat", SHAPSTACK_BUNDLE=str(moved))
    cluster.start("infer", "infer", SHAPSTACK_BUNDLE="", SHAPSTACK_MAX_RETRIES="1")
    cluster.wait_done(run_id, timeout=90)
    p = cluster.progress(run_id)
    assert p["by_status"] == {"failed": 100} and p["predicted"] == 0
    assert "is not on this worker" in p["error"]

    cluster.kill("infer")
    cluster.start("infer-fixed", "infer", SHAPSTACK_BUNDLE=str(moved))
    r = cluster.shapstack("requeue", str(run_id), "--status", "failed", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"run": run_id, "ingest_resent": False, "was": "done_with_failures", "requeued": 100,
                                    "batches": 4, "which": "failed"}
    cluster.wait_done(run_id)
    cluster.assert_exactly_once(run_id, 100)


def test_poison_product_is_dead_lettered_without_blocking_the_run(cluster, tmp_path):
    """A URL feed ingested without fetching its images (verify_images off) has one malformed URL
    (an unencoded space): loading it raises inside the infer stage, in every batch it is in."""
    from pipeline.synthetic import make_catalogue

    feed = make_catalogue(tmp_path / "feed", 100, 6, seed=5, image_size=32)
    rows = list(csv.DictReader(open(feed)))
    poison = rows[37]["product_id"]
    rows[37]["image"] = "http://cdn.example.invalid/images/red shoe.jpg"
    with open(feed, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    env = {"SHAPSTACK_ALLOW_IMAGE_URLS": "1", "SHAPSTACK_VERIFY_IMAGES": "0"}
    cluster.start("infer", "infer", **env)
    cluster.start("rest", "ingest,stack", "--beat", **env)
    r = cluster.shapstack("classify", str(feed), "--distributed", "--wait", "--json")
    assert r.returncode == 3, r.stderr + cluster.logs()  # finished, with a dead-lettered product
    out = json.loads(r.stdout)
    assert (out["failed"], out["dead"], out["predicted"]) == (0, 1, 99)
    run_id = out["run"]
    cluster.assert_exactly_once(run_id, 100, dead=1)
    r = cluster.shapstack("dead-letters", str(run_id), "--json")
    [letter] = json.loads(r.stdout)
    assert (letter["product_id"], letter["stage"]) == (poison, "infer") and "image unreadable at inference" in letter["error"]
    [(product_id, stage, error, attempts)] = cluster.query("""
        SELECT p.product_id, d.stage, d.error, d.attempts FROM dead_letters d JOIN products p ON p.id = d.product_pk
        WHERE d.run_id = :r""", r=run_id)
    assert (product_id, stage) == (poison, "infer") and "image unreadable at inference" in error and attempts >= 1

    # requeued, it fails again (alone this time) and is parked again; nothing else is redone
    r = cluster.shapstack("requeue", str(run_id), "--status", "dead", "--json")
    assert r.returncode == 0, r.stderr
    assert (json.loads(r.stdout)["requeued"], json.loads(r.stdout)["batches"]) == (1, 1)
    wait_until(lambda: cluster.query("SELECT count(*) FROM dead_letters WHERE run_id = :r", r=run_id)[0][0] == 1
               and cluster.run_status(run_id) == "done_with_failures", 60, "the poison to be parked again")
    cluster.assert_exactly_once(run_id, 100, dead=1)


def test_retrain_exports_labelled_products_as_a_feed(pg_url, tmp_path):
    """What the train task feeds train_bundle: every labelled product once, images inside the feed's folder."""
    from db.engine import connect
    from jobs.ingest import ingest_feed
    from pipeline.feed import read_feed
    from pipeline.records import Limits, Product
    from pipeline.synthetic import make_catalogue
    from db.products import count_labelled
    from workers.retrain import export_feed

    feed = make_catalogue(tmp_path / "cat", 30, 3, seed=6, image_size=32)
    factory = connect(pg_url)
    first = ingest_feed(factory, feed, Limits())
    ingest_feed(factory, feed, Limits())  # the same products in a second run: exported once
    assert count_labelled(factory, [first]) == 30 and count_labelled(factory, []) == 60
    exported, n = export_feed(factory, [], tmp_path / "export")
    items = list(read_feed(exported))
    assert n == 30 and all(isinstance(i, Product) for i in items), items
    original = {p.product_id: p for p in read_feed(feed)}
    for p in items:
        o = original[p.product_id]
        assert (p.label, p.group_id, p.title, p.content_hash) == (o.label, o.group_id, o.title, o.content_hash)
        assert Path(p.image).parent == tmp_path / "export" / "images"


def test_user_errors_are_one_line(tmp_path, bundle):
    env = {**os.environ, "SHAPSTACK_BROKER_URL": "redis://127.0.0.1:6379/15", "SHAPSTACK_BUNDLE": str(bundle)}
    env.pop("SHAPSTACK_DATABASE_URL", None)
    for args, message in ((["worker"], "not sqlite:///shapstack.db"), (["worker", "--queues", "gpu"], "unknown queue"),
                          (["requeue", "1"], "not sqlite:///shapstack.db"),
                          (["classify", "missing.csv", "--distributed"], "feed not found"),
                          (["classify", "--run", "1", "--distributed", "--out", "x.csv"], "needs --wait"),
                          (["classify", "--run", "1", "--split", "test"], "goes with FEED")):
        r = subprocess.run([sys.executable, "-m", "shapstack", *args], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=180)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, (args, r.stderr)


def test_classify_options_reach_the_workers(cluster, bundle, tmp_path):
    """The same options as the embedded mode: --split, --mmshap-budget, --mmshap-mode and --out on a
    feed; an embedded `ingest` then `classify --run RUN --distributed --mmshap-method amortized`;
    workers given --bundle."""
    from pipeline.feed import read_feed
    from pipeline.manifest import read_manifest
    from pipeline.split import split_selector
    from pipeline.synthetic import make_catalogue

    feed = make_catalogue(tmp_path / "feed", 80, 6, seed=7, image_size=32)
    test_side = [p for p in read_feed(feed) if split_selector(read_manifest(bundle), "test")(p)]
    cluster.start("all", "ingest,infer,stack", "--beat", "--bundle", str(bundle), SHAPSTACK_BUNDLE="")
    out = tmp_path / "test-side.parquet"
    r = cluster.shapstack("classify", str(feed), "--distributed", "--wait", "--json", "--split", "test",
                          "--mmshap-budget", "4", "--mmshap-mode", "token", "--out", str(out))
    assert r.returncode == 0, r.stderr + cluster.logs()
    result = json.loads(r.stdout)
    assert result["products"] == result["predicted"] == len(test_side) > 0
    assert result["options"] == {"split": "test", "mmshap_budget": 4, "mmshap_mode": "token"}
    [(modes, most)] = cluster.query("SELECT string_agg(DISTINCT mode, ','), max(n_evaluations) "
                                    "FROM modality_contributions WHERE run_id = :r", r=result["run"])
    assert modes == "token" and most <= 4
    import pyarrow.parquet as pq

    table = pq.read_table(out)
    assert sorted(table.column("product_id").to_pylist()) == sorted(p.product_id for p in test_side)

    r = cluster.shapstack("ingest", str(feed), "--json")
    ingested = json.loads(r.stdout)
    assert ingested["products"] == 80
    r = cluster.shapstack("classify", "--run", str(ingested["run"]), "--distributed", "--wait", "--json",
                          "--mmshap-method", "amortized", "--mmshap-audit", "0.5")
    assert r.returncode == 0, r.stderr + cluster.logs()
    assert json.loads(r.stdout)["predicted"] == 80
    cluster.assert_exactly_once(ingested["run"], 80)
    status = cluster.progress(ingested["run"])
    assert status["mode"] == "distributed"
    assert status["options"] == {"split": "all", "mmshap_method": "amortized", "mmshap_audit_fraction": 0.5}
    [(methods, n, audited)] = cluster.query(
        "SELECT string_agg(DISTINCT method, ','), count(t_shap), count(audit_t_shap) "
        "FROM modality_contributions WHERE run_id = :r", r=ingested["run"])
    assert methods == "amortized" and 0 < audited < n


@pytest.fixture
def mmshap_broker():
    """The Redis database of the MM-SHAP test (SHAPSTACK_TEST_REDIS_URL), flushed before and after."""
    import redis

    try:
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
        client.flushdb()
    except redis.exceptions.RedisError as exc:
        service_missing("Redis", exc)
    yield REDIS_URL
    client.flushdb()


def _contributions(engine_or_url, run_id: int) -> dict[str, tuple]:
    engine = create_engine(engine_or_url) if isinstance(engine_or_url, str) else engine_or_url
    with engine.connect() as conn:
        rows = conn.execute(text("""
            SELECT p.product_id, c.t_shap, c.stderr, c.n_evaluations, c.n_players, c.method, c.game_text_share, c.reason
            FROM modality_contributions c JOIN products p ON p.id = c.product_pk WHERE c.run_id = :r"""),
            {"r": run_id}).all()
    return {r[0]: tuple(r[1:]) for r in rows}


def test_mmshap_identical_embedded_distributed_and_at_any_batch_position(tmp_path, pg_url, mmshap_broker, bundle):
    """A product's T-SHAP is seeded by (bundle id, its content) and evaluated on its own in float32:
    embedded, distributed (real workers, batches of 25) and with the feed reversed (other batch
    positions, other batch neighbours) it is bit for bit the same, at one torch thread count."""
    from pipeline.synthetic import make_catalogue

    feed = make_catalogue(tmp_path / "feed", 40, 6, seed=8, image_size=32, drop_image=0.1)
    rows = list(csv.DictReader(open(feed)))
    reversed_feed = feed.parent / "reversed.csv"
    with open(reversed_feed, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=rows[0].keys())
        w.writeheader()
        w.writerows(rows[::-1])
    target = {"SHAPSTACK_MMSHAP_TARGET_STDERR": "0.05", "SHAPSTACK_MMSHAP_CAP": "300"}

    c = Cluster(tmp_path, pg_url, mmshap_broker, bundle, **target)
    try:
        c.start("infer", "infer")
        c.start("rest", "ingest,stack", "--beat")
        r = c.shapstack("classify", str(feed), "--distributed", "--wait")
        assert r.returncode == 0, r.stderr + c.logs()
        distributed = _contributions(c.engine, 1)
    finally:
        c.stop()

    embedded = []
    for name, source in (("forward", feed), ("reversed", reversed_feed)):
        # one torch thread, as each worker process runs (workers/resources.py): float32 sums over
        # another thread count are ordered otherwise and move T-SHAP by ~1e-6
        env = {**c.env, "SHAPSTACK_DATABASE_URL": f"sqlite:///{tmp_path / name}.db", "SHAPSTACK_BATCH_SIZE": "32",
               "OMP_NUM_THREADS": "1"}
        env.pop("SHAPSTACK_BROKER_URL")
        r = subprocess.run([sys.executable, "-m", "shapstack", "classify", str(source)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        embedded.append(_contributions(f"sqlite:///{tmp_path / name}.db", 1))

    assert len(distributed) == 40 and set(distributed) == set(embedded[0]) == set(embedded[1])
    estimated = [k for k, v in distributed.items() if v[0] is not None]
    assert len(estimated) >= 30 and all(distributed[k][2] > 0 for k in estimated)
    missing = [k for k, v in distributed.items() if v[5] is None]
    assert missing and all(distributed[k][0] is None and distributed[k][6].startswith("missing modality")
                           for k in missing)
    for key, value in distributed.items():
        assert embedded[0][key] == value, (key, embedded[0][key], value)
        assert embedded[1][key] == value, (key, embedded[1][key], value)
