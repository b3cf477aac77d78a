"""The workers' decisions without worker processes: claims, poison batches, the failure policy and
the sweeper, on SQLite, with a real Celery app sending to a private Redis (read back with
workers.broker, the sweeper's own view of the broker)."""

from __future__ import annotations

import psycopg
import pytest
import sqlalchemy.exc
from sqlalchemy import select, update

from db import models as m
from db.claims import claim, heartbeat, in_seconds, mark_worker, take_lock
from db.engine import connect
from db.products import dead_letter
from db.runs import finish_run
from jobs.ingest import ingest_feed
from pipeline.records import Limits
from private_services import PrivateRedis
from shapstack.settings import load_settings
from workers.app import create_app
from workers.broker import held
from workers.poison import ALONE_LIMIT, FAIL_LIMIT, LOST_LIMIT, Claimant, run_batch
from workers.policy import FATAL, PRODUCT, TRANSIENT, Breaker, WorkerFatal, kind
from workers.retries import Transient, backoff_s, retries_for

W1, W2 = Claimant("w1", 60, 30), Claimant("w2", 60, 30)


@pytest.fixture
def products(tmp_path, catalogue):
    """(factory, run id, product keys) of 8 products ingested into a fresh SQLite file."""
    factory = connect(f"sqlite:///{tmp_path / 'w.db'}")
    run_id = ingest_feed(factory, catalogue, Limits(verify_images=False), batch_size=1000)
    with factory() as s:
        pks = sorted(s.scalars(select(m.Product.id).where(m.Product.run_id == run_id)))[:8]
    return factory, run_id, pks


def status_of(factory, pks):
    with factory() as s:
        return {p.id: (p.status, p.attempts, p.claimed_by) for p in s.query(m.Product).filter(m.Product.id.in_(pks))}


def ok(todo, ready):
    return None


def test_a_batch_that_raises_is_split_then_the_poison_parked_after_two_workers(products):
    factory, _, pks = products
    poison = pks[5]
    resent: list[tuple[list[int], int]] = []

    def work(todo, ready):
        if poison in todo:
            raise ValueError("bad pixels")

    out = run_batch("infer", factory, pks, 0, work, lambda half, seen: resent.append((half, seen)), W1)
    assert out.done == [] and resent == [(pks[:4], 1), (pks[4:], 1)]
    resent.clear()
    assert run_batch("infer", factory, pks[:4], 1, work, lambda *a: resent.append(a), W1).done == pks[:4]
    with factory() as s, s.begin():  # another worker serves infer: the poison gets a second opinion
        heartbeat(s, "w2", "infer,stack", 60)
    out = run_batch("infer", factory, [poison], 1, work, lambda *a: resent.append(a), W1)
    assert out.parked == 0 and resent == [([poison], 2)]
    assert status_of(factory, [poison])[poison] == ("pending", 2, None)
    out = run_batch("infer", factory, [poison], 2, work, lambda *a: resent.append(a), W2)
    assert out.parked == 1 and FAIL_LIMIT == 2
    assert status_of(factory, [poison])[poison][0] == "dead"
    assert all(st == ("pending", 0, None) for st in status_of(factory, pks[:4]).values())


def test_alone_on_the_only_worker_the_poison_is_parked_too(products):
    factory, _, pks = products

    def work(todo, ready):
        raise ValueError("bad pixels")

    seen = 0
    for _ in range(ALONE_LIMIT):
        out = run_batch("infer", factory, pks[:1], seen, work, lambda *a: None, W1)
        seen += 1
        if out.parked:
            break
    assert out.parked == 1 and seen == FAIL_LIMIT  # nobody else serves infer: two failures are enough


def test_a_batch_whose_worker_died_is_split_and_a_repeat_killer_parked(products):
    factory, _, pks = products
    with factory() as s, s.begin():  # three earlier deliveries died mid-batch without a handler
        s.execute(update(m.Product).where(m.Product.id.in_(pks)).values(attempts=LOST_LIMIT))
    resent = []
    out = run_batch("infer", factory, pks, 0, ok, lambda half, seen: resent.append((half, seen)), W1)
    assert out.done == [] and [h for h, _ in resent] == [pks[:4], pks[4:]] and {s for _, s in resent} == {LOST_LIMIT}
    assert all(c is None for _, _, c in status_of(factory, pks).values())  # claims given back with the halves
    out = run_batch("infer", factory, [pks[0]], 0, ok, lambda *a: None, W1)
    assert out.parked == 1 and status_of(factory, [pks[0]])[pks[0]][0] == "dead"
    # seen == attempts: nothing died since the message was sent, so the batch runs
    assert run_batch("infer", factory, pks[1:2], LOST_LIMIT, ok, lambda *a: None, W1).done == pks[1:2]


def test_a_second_delivery_gets_nothing_while_a_live_claim_holds_the_batch(products):
    factory, _, pks = products
    with factory() as s, s.begin():
        assert claim(s, pks, "w1", 60) == {pk: 0 for pk in pks}
    ran = []
    out = run_batch("infer", factory, pks, 0, lambda todo, r: ran.append(todo), lambda *a: None, W2)
    assert out.done == [] and ran == [] and all(a == 0 for _, a, _ in status_of(factory, pks).values())
    with factory() as s, s.begin():  # the lease ran out (w1 stopped beating): the batch is free
        s.execute(update(m.Product).where(m.Product.id.in_(pks)).values(lease_until=in_seconds(-1.0)))
    assert run_batch("infer", factory, pks, 0, lambda todo, r: ran.append(todo), lambda *a: None, W2).done == pks


def test_the_world_and_the_machine_charge_nothing_to_products(products):
    factory, _, pks = products
    away = sqlalchemy.exc.OperationalError("SELECT 1", {}, psycopg.OperationalError("server closed the connection"))
    for error, raised in ((away, Transient), (RuntimeError("CUDA error: an illegal memory access"), WorkerFatal),
                          (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), WorkerFatal)):
        def work(todo, ready, error=error):
            raise error

        with pytest.raises(raised):
            run_batch("infer", factory, pks, 0, work, lambda *a: pytest.fail("re-sent"), W1)
        assert set(status_of(factory, pks).values()) == {("pending", 0, None)}


def test_setup_failures_release_the_claims_uncharged(products):
    from workers.policy import SetupFailed

    factory, _, pks = products

    def prepare():
        raise FileNotFoundError("bundle/stacker_mmshap.pt")

    with pytest.raises(SetupFailed):
        run_batch("stack", factory, pks, 0, ok, lambda *a: None, W1, prepare)
    assert set(status_of(factory, pks).values()) == {("pending", 0, None)}


def test_the_breaker_trips_on_one_error_across_unrelated_batches_not_on_a_poison_hunt():
    poison_hunt = Breaker()
    nested = [range(0, 64), range(32, 64), range(32, 48), range(40, 48), range(44, 48), range(44, 46), range(45, 46)]
    assert not any(poison_hunt.failed("ValueError: bad pixels in product 45", list(b)) for b in nested)
    broken = Breaker()
    assert not broken.failed("OSError: [Errno 2] /mnt/images/1.jpg", [1, 2])
    assert not broken.failed("OSError: [Errno 2] /mnt/images/3.jpg", [3, 4])
    broken.succeeded()
    assert not broken.failed("OSError: [Errno 2] /mnt/images/5.jpg", [5, 6])
    assert not broken.failed("OSError: [Errno 2] /mnt/images/7.jpg", [7, 8])
    assert broken.failed("OSError: [Errno 2] /mnt/images/9.jpg", [9, 10])


def test_failure_kinds():
    from serving.client import TritonMismatch

    away = sqlalchemy.exc.OperationalError("UPDATE", {}, psycopg.OperationalError("connection refused"))
    read_only = sqlalchemy.exc.InternalError(
        "UPDATE", {}, psycopg.errors.ReadOnlySqlTransaction("cannot execute UPDATE in a read-only transaction"))
    assert kind(away) == kind(read_only) == kind(ConnectionError("Triton down")) == TRANSIENT
    assert kind(TritonMismatch("the server serves bundle b-1, not b-2")) == FATAL
    assert kind(RuntimeError("[StatusCode.NOT_FOUND] Request for unknown model: 'text' is not found")) == FATAL
    try:
        try:
            raise RuntimeError("CUDA error: device-side assert triggered")
        except RuntimeError as inner:
            raise ValueError("batch failed") from inner
    except ValueError as wrapped:
        assert kind(wrapped) == FATAL
    assert kind(ValueError("cannot identify image file")) == PRODUCT


def test_the_retry_budget_is_minutes_of_capped_backoff():
    n = retries_for(600)
    waited = sum(backoff_s(i) for i in range(n))
    assert 600 <= waited < 630 and max(backoff_s(i) for i in range(n)) == 30


def test_dead_letters_only_park_pending_products_and_runs_say_they_had_failures(products):
    factory, run_id, pks = products
    with factory() as s, s.begin():
        s.execute(update(m.Product).where(m.Product.id == pks[0]).values(status="done"))
        assert dead_letter(s, pks[0], "infer", "late duplicate", 2) is False
        assert dead_letter(s, pks[1], "infer", "bad pixels", 2) is True
        s.execute(update(m.Product).where(m.Product.run_id == run_id, m.Product.status == "pending")
                  .values(status="done"))
        s.execute(update(m.Run).where(m.Run.id == run_id).values(status="classifying", mode="distributed"))
    assert status_of(factory, pks[:1])[pks[0]][0] == "done"
    with factory() as s, s.begin():
        assert finish_run(s, run_id, if_complete=True)
    with factory() as s:
        assert s.get(m.Run, run_id).status == "done_with_failures"


def test_the_beat_lock_has_one_holder_until_its_lease_runs_out(products):
    factory, _, _ = products
    with factory() as s, s.begin():
        assert take_lock(s, "beat", "a", 30) and not take_lock(s, "beat", "b", 30) and take_lock(s, "beat", "a", 30)
        s.execute(update(m.Lock).values(until=in_seconds(-1.0)))
        assert take_lock(s, "beat", "b", 30) and not take_lock(s, "beat", "a", 30)


@pytest.fixture
def redis_app(products, tmp_path):
    redis = PrivateRedis(tmp_path / "redis").start()
    settings = load_settings(env={}, database_url=f"sqlite:///{tmp_path / 'w.db'}", broker_url=redis.url)
    app = create_app(settings, allow_sqlite=True)
    yield app, redis.url
    redis.stop()


def test_the_sweeper_resends_what_dead_workers_hold_and_the_broker_lost_never_what_is_queued(products, redis_app):
    from workers.dispatch import send_batches
    from workers.sweeper import sweep

    factory, run_id, pks = products
    _, url = redis_app
    with factory() as s, s.begin():
        s.execute(update(m.Run).where(m.Run.id == run_id).values(status="classifying", mode="distributed"))
        s.execute(update(m.Product).where(m.Product.run_id == run_id, m.Product.id.not_in(pks))
                  .values(status="done"))
        s.execute(update(m.Product).values(updated_at=in_seconds(-600.0)))  # long queued, or long lost
        claim(s, pks[:2], "alive", 60)  # a slow batch: its worker beats
        claim(s, pks[2:4], "killed", 60)  # its worker stopped beating 45 s ago
        heartbeat(s, "alive", "infer", 60)
        heartbeat(s, "killed", "infer", 60)
        s.execute(update(m.Worker).where(m.Worker.id == "killed").values(last_seen=in_seconds(-45.0)))
    send_batches(run_id, pks[4:6])  # queued behind other runs: a message names them
    # pks[6:8]: pending, unclaimed, and in no message: their message was lost
    assert held(url).products == set(pks[4:6])
    assert sweep() == {run_id: 4}
    assert held(url).products == set(pks[2:8])
    assert [c for _, _, c in status_of(factory, pks).values()] == ["alive"] * 2 + [None] * 6
    assert sweep() == {}  # all in the broker now, the slow batch still held: nothing more to send
    with factory() as s, s.begin():
        mark_worker(s, "alive", "fatal", "CUDA error")  # a worker-fatal stop frees its claims at once
    assert sweep() == {run_id: 2}


def test_the_aggregation_has_a_queue_of_its_own_that_the_beats_worker_serves():
    from workers.queues import AGGREGATE, DEFAULT, ROUTES, parse_queues, with_beat

    assert ROUTES["shapstack.aggregate"] == {"queue": AGGREGATE} != ROUTES["shapstack.stack"]
    assert with_beat(parse_queues("ingest,stack")) == ["ingest", "stack", AGGREGATE]  # the README's second worker
    assert with_beat(parse_queues("aggregate")) == [AGGREGATE]
    assert AGGREGATE in parse_queues(DEFAULT) and AGGREGATE not in parse_queues("stack")
