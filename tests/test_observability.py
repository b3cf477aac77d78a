"""What an operator watches: a real `shapstack worker --metrics-port` over Redis and PostgreSQL
(metrics that move, JSON log lines with run ids, a collapse alert on a webhook), schema revisions
(a worker refuses a database at another one), secrets from files, and no password in any output."""

from __future__ import annotations

import csv
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REDIS_URL, service_missing
from test_distributed import bundle, free_port, wait_until  # noqa: F401 - bundle: a tiny bundle, trained once

PASSWORD = "S3cret-pw-42"
REDIS_DB = REDIS_URL.rsplit("/", 1)[0] + "/2"


def shapstack(*args: str, cwd: Path, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shapstack", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def base_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHAPSTACK_")}
    return {**env, "SHAPSTACK_DEVICE": "cpu", **extra}


def with_password(url: str) -> str:
    """The same PostgreSQL URL with a password (the test server trusts local connections: any password works)."""
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@")


def scrape(port: int) -> dict[str, float]:
    """{'name{label="v",...}': value} of every shapstack_* sample on the worker's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("shapstack_"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


class Webhook:
    """A local HTTP server that records the JSON bodies POSTed to it."""

    def __init__(self, delay_s: float = 0.0):
        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                time.sleep(delay_s)
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook/t0ken"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def redis_db2():
    import redis

    client = redis.Redis.from_url(REDIS_DB, socket_timeout=5)
    try:
        client.flushdb()
    except redis.exceptions.RedisError as exc:
        service_missing("Redis", exc)
    yield REDIS_DB
    client.flushdb()


def drifted(bundle: Path, out: Path) -> Path:
    """A copy of the bundle whose drift reference says every training product had T-SHAP 0.5 (with
    a tiny spread): any run of its nearly untrained models (T-SHAP near 1) raises the drift flag,
    whatever their weights came out as."""
    import shutil

    shutil.copytree(bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for scopes in manifest["extra"]["collapse_reference"]["stackers"].values():
        n = scopes["all"]["n_reliance"]
        scopes["all"].update(sum_t=0.5 * n, sumsq_t=0.25 * n + 1e-4)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.slow
def test_worker_serves_metrics_that_move_logs_json_and_alerts(tmp_path, pg_url, redis_db2, bundle):
    from pipeline.synthetic import make_catalogue

    bundle = drifted(bundle, tmp_path / "bundle")
    feed = make_catalogue(tmp_path / "feed", 40, 6, seed=3, image_size=32)
    with open(feed, "a") as fh:  # two rejects: a duplicate id, a row with nothing usable
        rows = list(csv.reader(open(feed)))
        fh.write(",".join(rows[1]) + "\n" + "P-empty,,,,,,,\n")
    hook = Webhook()
    port = free_port()
    env = base_env(SHAPSTACK_DATABASE_URL=with_password(pg_url), SHAPSTACK_BROKER_URL=redis_db2,
                   SHAPSTACK_BUNDLE=str(bundle), SHAPSTACK_LOG_FORMAT="json", SHAPSTACK_INFER_BATCH_SIZE="16",
                   SHAPSTACK_MIN_PRODUCTS="1000",  # flags of scope all only: the drift flag (drifted above)
                   SHAPSTACK_ALERT_WEBHOOK_URL=hook.url, SHAPSTACK_ALERT_WEBHOOK_PRIVATE="1")
    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as log:
        worker = subprocess.Popen([sys.executable, "-m", "shapstack", "worker", "--queues", "ingest,infer,stack",
                                   "--hostname", "obs@%h", "--metrics-port", str(port)], cwd=tmp_path, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        logs = lambda: log_path.read_text(errors="replace")  # noqa: E731
        wait_until(lambda: " ready." in logs() or worker.poll() is not None, 90, "the worker", detail=logs)
        assert worker.poll() is None, logs()
        before = scrape(port)
        assert not any(k.startswith("shapstack_products_total") for k in before), before

        r = shapstack("classify", str(feed), "--distributed", "--wait", cwd=tmp_path, env=env, timeout=240)
        assert r.returncode == 0, r.stderr + logs()
        run_id = int(r.stdout.split()[1].rstrip(":"))
        assert "40 products accepted, 2 rejected" in r.stdout
        after = wait_until(lambda: (m := scrape(port)).get('shapstack_runs_finished_total{outcome="clean"}') and m,
                           30, "the run's metrics", detail=lambda: str(scrape(port)))
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(30)
        hook.close()

    # counters: products by stage and status, rejects by reason code, MM-SHAP cost, batch latency
    assert after['shapstack_products_total{stage="ingest",status="accepted"}'] == 40
    assert after['shapstack_products_total{stage="infer",status="done"}'] == 40
    assert after['shapstack_products_total{stage="stack",status="done"}'] == 40
    assert after['shapstack_rejects_total{reason="duplicate_id"}'] == 1
    assert after['shapstack_rejects_total{reason="empty_row"}'] == 1
    from sqlalchemy import create_engine, text

    engine = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        evaluations = conn.execute(text("SELECT sum(n_evaluations) FROM modality_contributions")).scalar()
        drift = conn.execute(text("SELECT value FROM collapse_metrics WHERE scope = 'all' "
                                  "AND metric = 'drift_t_shap'")).scalar()
    engine.dispose()
    assert evaluations > 0 and after["shapstack_mmshap_evaluations_total"] == evaluations
    assert after["shapstack_mmshap_errors_total"] == 0
    assert after['shapstack_batch_seconds_count{stage="infer"}'] == 3  # 40 products in batches of 16
    assert after['shapstack_batch_seconds_count{stage="stack"}'] == 3
    assert after['shapstack_tasks_total{stage="ingest",state="SUCCESS"}'] == 1
    assert after['shapstack_collapse_flags_total{flag="drift"}'] == 1
    assert after["shapstack_tshap_drift"] == pytest.approx(drift)

    # logs: every line one JSON object; the task lines carry the run id, stage, batch and worker
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    of_run = [e for e in lines if e.get("run_id") == run_id]
    assert {e["stage"] for e in of_run} >= {"ingest", "infer", "stack"}
    assert all(e["worker"].startswith("obs@") and e["batch"] for e in of_run if e.get("stage") in ("infer", "stack"))
    alert = [e for e in of_run if e["level"] == "WARNING" and "collapse flag drift raised" in e["msg"]]
    assert alert, [e["msg"] for e in lines]
    assert PASSWORD not in log_path.read_text() + r.stdout + r.stderr

    # the webhook: one POST for the run, with its flag
    assert [(h["run_id"], h["flags"]) for h in hook.received] == [(run_id, [{"scope": "all", "flag": "drift"}])]


@pytest.mark.postgres
def test_worker_refuses_a_database_at_another_revision_and_no_password_is_printed(tmp_path, pg_url, monkeypatch):
    """The db commands in-process (the CLI's start-up costs seconds), the worker as a real process."""
    from click.testing import CliRunner

    from db.engine import connect
    from shapstack.cli import cli

    url = with_password(pg_url)
    secret = tmp_path / "database_url"
    secret.write_text(url + "\n")  # as Docker writes a secret: the URL from a file, SHAPSTACK_DATABASE_URL_FILE
    env = base_env(SHAPSTACK_DATABASE_URL_FILE=str(secret), SHAPSTACK_BROKER_URL=REDIS_DB)
    for name in [k for k in os.environ if k.startswith("SHAPSTACK_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SHAPSTACK_DATABASE_URL_FILE", str(secret))
    monkeypatch.chdir(tmp_path)
    outputs = []

    def run(*args: str):
        r = CliRunner().invoke(cli, list(args))
        outputs.append(r.output)
        assert r.exception is None or isinstance(r.exception, SystemExit), r.output
        return r

    from db.engine import head_revision

    head = head_revision()
    before = f"{int(head) - 1:04d}"  # the revision a worker of the previous release left
    assert run("db", "upgrade").exit_code == 0
    r = run("db", "current")
    assert r.exit_code == 0 and f"{head} (at head" in r.stdout and ":***@" in r.stdout
    assert "base -> 0001" in run("db", "history").stdout
    r = run("db", "downgrade", before)
    assert r.exit_code == 0 and f"{head} -> {before}" in r.stdout

    w = shapstack("worker", "--queues", "infer", cwd=tmp_path, env=env)
    outputs.append(w.stdout + w.stderr)
    assert w.returncode == 1, w.stdout + w.stderr
    [line] = w.stderr.strip().splitlines()
    assert f"at schema revision {before}, this shapstack needs {head}" in line and "shapstack db upgrade" in line
    r = run("status")  # any command: a shared database is never migrated behind the operator's back
    assert r.exit_code == 1 and "shapstack db upgrade" in r.stderr, r.output
    r = run("db", "current")
    assert r.exit_code == 1 and f"{before} (not at head" in r.stdout

    assert run("db", "upgrade").exit_code == 0
    assert run("status").exit_code == 0
    connect.cache_clear()
    # unreachable: a runtime failure (1); not a URL at all: a user error (2)
    for bad, code in ((f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/x", 1),
                      (f"postgresql://postgres:{PASSWORD}@127.0.0.1:port/x", 2)):
        secret.write_text(bad)
        for args in (("db", "current"), ("db", "upgrade"), ("status",)):
            r = run(*args)
            assert r.exit_code == code and len(r.stderr.strip().splitlines()) == 1, r.output
    joined = "\n".join(outputs)
    assert PASSWORD not in joined, joined


def test_secrets_from_files(tmp_path):
    from pipeline.errors import UserError
    from shapstack.settings import load_settings

    secret = tmp_path / "broker"
    secret.write_text("redis://:pw@redis:6379/0\n")
    retries = tmp_path / "retries"
    retries.write_text("7")
    s = load_settings(env={"SHAPSTACK_BROKER_URL_FILE": str(secret), "SHAPSTACK_MAX_RETRIES_FILE": str(retries)})
    assert (s.broker_url, s.max_retries) == ("redis://:pw@redis:6379/0", 7)
    with pytest.raises(UserError, match="not both"):
        load_settings(env={"SHAPSTACK_BROKER_URL_FILE": str(secret), "SHAPSTACK_BROKER_URL": "redis://x"})
    with pytest.raises(UserError, match="SHAPSTACK_DATABASE_URL_FILE: cannot read"):
        load_settings(env={"SHAPSTACK_DATABASE_URL_FILE": str(tmp_path / "missing")})
    with pytest.raises(UserError, match="log_format must be one of text, json"):
        load_settings(env={"SHAPSTACK_LOG_FORMAT": "xml"})


def test_reject_reason_codes_are_short_and_bounded():
    from workers.metrics import reason_code

    assert reason_code("image file over 20000000 bytes") == "image_too_large"
    assert reason_code("image has 9000x9000 pixels, over the 40000000 limit") == "image_too_many_pixels"
    assert reason_code("duplicate product_id within the feed") == "duplicate_id"
    assert reason_code("NUL byte in column 'title'") == "nul_byte"
    assert reason_code("row has 3 cells, header has 8: bad quoting") == "row_has_cells"
    assert reason_code("") == "other"


def test_webhook_refuses_private_addresses_and_is_bounded_in_time():
    from jobs.alerts import post

    hook = Webhook()
    try:
        assert not post(hook.url, {"x": 1}, timeout=2)  # 127.0.0.1 is not global: refused by default
        assert hook.received == []
        assert post(hook.url, {"x": 1}, timeout=2, allow_private=True)
        assert hook.received == [{"x": 1}]
    finally:
        hook.close()
    slow = Webhook(delay_s=5)
    try:
        t0 = time.monotonic()
        assert not post(slow.url, {"x": 2}, timeout=0.5, allow_private=True)
        assert time.monotonic() - t0 < 2
    finally:
        slow.close()


def test_json_log_lines_carry_the_task_context():
    import logging

    from workers.logs import JsonFormatter, bound, task_fields

    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "batch of %d failed", (3,), None)
    with bound(**task_fields("shapstack.infer", [12, [1, 2, 3], 0], "task-1")):
        line = JsonFormatter().format(record)
    assert json.loads(line) | {"ts": None, "pid": None} == {
        "ts": None, "pid": None, "level": "WARNING", "logger": "x", "msg": "batch of 3 failed",
        "stage": "infer", "run_id": 12, "batch": "task-1", "products": 3}
    assert re.fullmatch(r"\{.*\}", line)
