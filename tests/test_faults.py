"""Faults at default settings (task time limit 900 s, heartbeat 10 s, lease 60 s), for real: a private
Redis and, where PostgreSQL is restarted, a private PostgreSQL cluster (tests/private_services.py),
`shapstack worker` processes, a tiny bundle. Each test ends with exactly one prediction per accepted
product, nothing failed or dead-lettered, and prints how long the recovery took (docs/operations.md).
"""

from __future__ import annotations

import math
import re
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from private_services import PrivatePostgres, PrivateRedis, free_port
from test_distributed import Cluster, bundle, wait_until  # noqa: F401 - bundle is a fixture

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

N = 80
BATCH = 10
FAULTS = {"SHAPSTACK_ALLOW_FAULT_INJECTION": "1"}
FAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


@pytest.fixture
def feed(tmp_path) -> Path:
    from pipeline.synthetic import make_catalogue

    return make_catalogue(tmp_path / "feed", N, 6, seed=11, image_size=32)


@pytest.fixture
def redis(tmp_path):
    server = PrivateRedis(tmp_path / "redis").start()
    yield server
    server.stop()


def make_cluster(tmp_path, database_url: str, redis: PrivateRedis, bundle: Path) -> Cluster:
    """Default time limits: only the batch size is the tests' own."""
    c = Cluster(tmp_path, database_url, redis.url, bundle, SHAPSTACK_INFER_BATCH_SIZE=str(BATCH))
    c.env.pop("SHAPSTACK_TASK_TIME_LIMIT_S")
    return c


@pytest.fixture
def cluster(tmp_path, pg_url, redis, bundle):
    c = make_cluster(tmp_path, pg_url, redis, bundle)
    yield c
    c.stop()


def in_flight(c: Cluster, run_id: int) -> list[int]:
    """Products an infer worker has started work on and not finished."""
    return [pk for (pk,) in c.query("""
        SELECT id FROM products p WHERE run_id = :r AND status = 'pending' AND attempts > 0
        AND claimed_by IS NOT NULL
        AND NOT EXISTS (SELECT 1 FROM modality_contributions c WHERE c.product_pk = p.id)""", r=run_id)]


def predicted_of(c: Cluster, pks: list[int]) -> int:
    return c.query("SELECT count(DISTINCT product_pk) FROM predictions WHERE product_pk = ANY(:p)", p=pks)[0][0]


def resends(c: Cluster, name: str) -> int:
    return c.log(name).count("sending them again") + c.log(name).count("sending the ingest again") \
        + c.log(name).count("sending it again")


def received(c: Cluster, name: str, task: str) -> int:
    """Messages of task the worker received (each delivery once)."""
    return len(re.findall(rf"Task shapstack\.{task}\[[0-9a-f-]+\] received", c.log(name)))


def test_infer_worker_killed_mid_batch_recovers_within_two_minutes(cluster, feed):
    cluster.start("infer", "infer", SHAPSTACK_FAULT_INJECT="slow:2", **FAULTS)
    cluster.start("rest", "ingest,stack", "--beat")
    run_id = cluster.submit(feed)
    held = wait_until(lambda: in_flight(cluster, run_id), 120, "a batch in flight", every=0.05)
    cluster.kill("infer")  # the worker and its pool, as a machine dying
    killed = time.monotonic()
    cluster.start("infer-again", "infer")
    wait_until(lambda: predicted_of(cluster, held) == len(held), 150, "the killed batch to be predicted", every=0.5,
               detail=cluster.logs)
    recovery = time.monotonic() - killed
    cluster.wait_done(run_id, timeout=120)
    print(f"\nSIGKILLed infer worker: its batch of {len(held)} predicted {recovery:.1f} s after the kill")
    assert recovery < 120
    cluster.assert_exactly_once(run_id, N)
    assert "held by a worker that died or whose lease expired" in cluster.log("rest")


def test_a_run_queued_behind_another_is_never_sent_again(cluster, feed, tmp_path):
    from pipeline.synthetic import make_catalogue

    cluster.start("rest", "ingest,stack", "--beat")
    a = cluster.submit(feed)
    b = cluster.submit(make_catalogue(tmp_path / "feed-b", 40, 6, seed=12, image_size=32))
    wait_until(lambda: cluster.run_status(b) == "classifying", 120, "both runs queued for infer")
    cluster.start("infer", "infer", SHAPSTACK_FAULT_INJECT="slow:6", **FAULTS)  # A: about a minute
    cluster.wait_done(a, timeout=240)
    cluster.wait_done(b, timeout=120)
    [(b_first, b_sent)] = cluster.query("SELECT (SELECT min(created_at) FROM predictions WHERE run_id = :b), "
                                        "(SELECT created_at FROM runs WHERE id = :b)", b=b)
    print(f"\nrun B queued {(b_first - b_sent).total_seconds():.0f} s behind run A with one infer worker: "
          f"{resends(cluster, 'rest')} re-sends")
    cluster.assert_exactly_once(a, N)
    cluster.assert_exactly_once(b, 40)
    assert resends(cluster, "rest") == 0, cluster.log("rest")
    assert received(cluster, "infer", "infer") == math.ceil(N / BATCH) + math.ceil(40 / BATCH)


def test_a_worker_with_a_cuda_error_stops_and_its_batches_go_to_the_healthy_one(cluster, feed):
    sick = cluster.start("sick", "infer", SHAPSTACK_FAULT_INJECT="cuda", **FAULTS)
    cluster.ready("sick")
    cluster.start("healthy", "infer")
    cluster.start("rest", "ingest,stack", "--beat")
    cluster.ready("healthy")
    started = time.monotonic()
    run_id = cluster.submit(feed)
    wait_until(lambda: sick.poll() is not None, 120, "the sick worker to exit", detail=cluster.logs)
    assert sick.returncode == 4, cluster.log("sick")  # not 0: a supervisor restarting "on-failure" sees it
    stopped = time.monotonic() - started
    cluster.wait_done(run_id, timeout=150)
    print(f"\nCUDA-error worker stopped {stopped:.1f} s after the run was sent; run done in "
          f"{time.monotonic() - started:.1f} s")
    cluster.assert_exactly_once(run_id, N)
    assert cluster.query("SELECT count(*) FROM products WHERE run_id = :r AND status <> 'done'", r=run_id)[0][0] == 0
    [(status, error)] = cluster.query("SELECT status, error FROM workers WHERE id LIKE 'sick@%' AND status = 'fatal'")
    assert "CUDA error" in error
    assert "CUDA error" in cluster.log("sick") and received(cluster, "sick", "infer") >= 1


@pytest.mark.skipif(not FAKETIME.exists(), reason="libfaketime not installed (apt-get install faketime)")
def test_a_worker_whose_clock_is_20_minutes_behind(cluster, feed):
    behind = {"LD_PRELOAD": str(FAKETIME), "FAKETIME": "-20m"}
    cluster.start("infer", "infer", SHAPSTACK_FAULT_INJECT="slow:1", **FAULTS, **behind)
    cluster.start("rest", "ingest,stack", "--beat", **behind)  # the beat and the sweeper too
    started = time.monotonic()
    run_id = cluster.submit(feed)
    cluster.wait_done(run_id, timeout=180)
    print(f"\nworkers 20 minutes behind: run done in {time.monotonic() - started:.1f} s, "
          f"{resends(cluster, 'rest')} re-sends")
    cluster.assert_exactly_once(run_id, N)
    assert resends(cluster, "rest") == 0, cluster.log("rest")
    assert received(cluster, "infer", "infer") == math.ceil(N / BATCH)
    # its heartbeat is written in the database's time, not in its own
    [(age,)] = cluster.query("SELECT extract(epoch FROM now() - max(last_seen)) FROM workers WHERE id LIKE 'infer@%'")
    assert age < 60


def test_redis_restarted_mid_run(cluster, redis, feed):
    cluster.start("infer", "infer", SHAPSTACK_FAULT_INJECT="slow:1", **FAULTS)
    cluster.start("rest", "ingest,stack", "--beat")
    run_id = cluster.submit(feed)
    wait_until(lambda: cluster.predicted(run_id) >= 20, 120, "progress before the restart", every=0.2)
    redis.stop()  # every queued message is lost with it
    left = N - cluster.predicted(run_id)
    time.sleep(3)
    redis.start()
    back = time.monotonic()
    cluster.wait_done(run_id, timeout=180)
    print(f"\nRedis restarted with {left} products left: run done {time.monotonic() - back:.1f} s after it was back")
    assert left > 0
    cluster.assert_exactly_once(run_id, N)
    assert "in no message of the broker (lost)" in cluster.log("rest")


def test_postgres_restarted_mid_run(tmp_path, redis, feed, bundle):
    pg = PrivatePostgres().start()
    c = make_cluster(tmp_path, pg.url, redis, bundle)
    try:
        c.start("infer", "infer", SHAPSTACK_FAULT_INJECT="slow:1", **FAULTS)
        c.start("rest", "ingest,stack", "--beat")
        run_id = c.submit(feed)
        wait_until(lambda: c.predicted(run_id) >= 20, 120, "progress before the restart", every=0.2)
        c.engine.dispose()
        pg.restart()
        back, before = time.monotonic(), c.predicted(run_id)
        wait_until(lambda: c.predicted(run_id) > before, 120, "a prediction after the restart", every=0.2,
                   detail=c.logs)
        resumed = time.monotonic() - back
        c.wait_done(run_id, timeout=180)
        print(f"\nPostgreSQL restarted with {N - before} products left: predictions resumed {resumed:.1f} s "
              f"after it was back, run done {time.monotonic() - back:.1f} s after")
        c.assert_exactly_once(run_id, N)
    finally:
        c.stop()
        pg.close()


def explained(c: Cluster, run_id: int) -> int:
    return c.query("SELECT count(*) FROM modality_contributions WHERE run_id = :r", r=run_id)[0][0]


@pytest.mark.triton
def test_triton_down_for_90_seconds_mid_run(tmp_path, pg_url, redis, feed, bundle):
    """The infer worker's models behind `shapstack serve` (PyTriton, gRPC as in the compose stack):
    the server stops mid-run and starts again on the same ports 90 s later. The client's retries
    run out, the task retries with backoff (1, 2, 4 ... 30 s) within retry_budget_s (600 s)."""
    from serving.local import serve_subprocess

    pytest.importorskip("pytriton.triton")
    ports = {k: free_port() for k in ("http", "grpc", "metrics")}
    serve = ["--bundle", str(bundle), "--max-batch-size", "64", "--device", "cpu"]
    c = make_cluster(tmp_path, pg_url, redis, bundle)
    with ExitStack() as server:
        try:
            urls = server.enter_context(serve_subprocess(serve, tmp_path / "triton.log", ports=ports))
            c.start("infer", "infer", SHAPSTACK_TRITON_URL=urls["grpc"], SHAPSTACK_FAULT_INJECT="slow:2", **FAULTS)
            c.start("rest", "ingest,stack", "--beat")
            run_id = c.submit(feed)
            wait_until(lambda: explained(c, run_id) >= 20, 240, "progress before Triton stops", every=0.2,
                       detail=c.logs)
            server.close()  # SIGTERM: the server and its models are gone
            left = N - explained(c, run_id)
            time.sleep(90)
            during = explained(c, run_id)
            server.enter_context(serve_subprocess(serve, tmp_path / "triton.log", ports=ports))
            back = time.monotonic()
            wait_until(lambda: explained(c, run_id) > during, 120, "inference after Triton is back", every=0.2,
                       detail=c.logs)
            resumed = time.monotonic() - back
            c.wait_done(run_id, timeout=300)
            print(f"\nTriton down 90 s with {left} products left to infer: inference resumed {resumed:.1f} s after "
                  f"it was back, run done {time.monotonic() - back:.1f} s after")
            assert left > 0 and during < N
            c.assert_exactly_once(run_id, N)
            assert "unavailable" in c.log("infer") and "retry" in c.log("infer").lower()
            assert c.query("SELECT count(*) FROM workers WHERE status = 'fatal'")[0][0] == 0
        finally:
            c.stop()
