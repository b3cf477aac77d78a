"""A hostile network: image URLs aimed at loopback, private and link-local addresses reach nothing
(a recording listener on 127.0.0.1 must see no connection), a slow server cannot hold a row past its
deadline, reject reasons never carry remote text; and the environment around the CLI: an unsafe
./shapstack.toml is ignored, a database URL never prints its password."""

from __future__ import annotations

import http.server
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image
from sqlalchemy import select

from db import models as m
from db.engine import connect
from jobs.ingest import ingest_feed
from pipeline.errors import UserError
from pipeline.feed import read_feed
from pipeline.records import Limits, Product
from shapstack.cli import cli
from shapstack.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
SERVER_HOST = "127.0.0.3"  # the "global" image server: allowed through url_allow_networks
SECRET = "SECRET-BANNER"


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 120, 240)).save(buf, "PNG")
    return buf.getvalue()


class Recorder:
    """Listens on 127.0.0.1 and ::1 (same port) and counts every connection it is offered."""

    def __init__(self):
        self.connections = 0
        self.sockets = [socket.create_server(("127.0.0.1", 0))]
        self.port = self.sockets[0].getsockname()[1]
        try:
            self.sockets.append(socket.create_server(("::1", self.port), family=socket.AF_INET6))
        except OSError:
            pass
        for s in self.sockets:
            threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, s: socket.socket) -> None:
        while True:
            try:
                conn, _ = s.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        for s in self.sockets:
            s.close()


class Handler(http.server.BaseHTTPRequestHandler):
    recorder_port = 0

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, ctype: str, body: bytes, reason: str | None = None, **headers) -> None:
        self.send_response(status, reason)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path
        if path == "/ok.png":
            self._send(200, "image/png", png())
        elif path == "/html":
            self._send(200, "text/html", f"<h1>{SECRET}\x1b[31m</h1>".encode())
        elif path == "/err":
            self._send(500, "text/plain", f"{SECRET}\x1b[31m".encode(), reason=SECRET)
        elif path == "/redirect-ok":
            self._send(302, "text/plain", b"", Location="/ok.png")
        elif path == "/redirect-loopback":
            self._send(302, "text/plain", b"", Location=f"http://127.0.0.1:{self.recorder_port}/x.png")
        elif path == "/redirect-loop":
            self._send(302, "text/plain", b"", Location="/redirect-loop")
        elif path == "/huge":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
        elif path in ("/slow", "/slow-headers"):
            head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
            data = head[:5] + head[5:] if path == "/slow-headers" else b""
            try:
                if path == "/slow":
                    self.wfile.write(head)
                    self.wfile.flush()
                    data = png()
                for i in range(len(data)):  # one byte every second, for minutes if the client waits
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                    time.sleep(1.0)
            except OSError:
                pass
            self.close_connection = True
        else:
            self._send(404, "text/plain", SECRET.encode())


@pytest.fixture
def network():
    recorder = Recorder()
    handler = type("H", (Handler,), {"recorder_port": recorder.port})
    server = http.server.ThreadingHTTPServer((SERVER_HOST, 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield recorder, f"http://{SERVER_HOST}:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    recorder.close()


def ssrf_urls(port: int, server: str) -> list[str]:
    return [
        f"http://127.0.0.1:{port}/a.png",
        f"http://2130706433:{port}/a.png",  # decimal 127.0.0.1
        f"http://0x7f000001:{port}/a.png",  # hex
        f"http://0177.0.0.1:{port}/a.png",  # octal
        f"http://127.1:{port}/a.png",
        f"http://[::1]:{port}/a.png",
        f"http://[::ffff:127.0.0.1]:{port}/a.png",
        f"http://localhost:{port}/a.png",
        f"http://LOCALHOST.:{port}/a.png",
        f"http://0.0.0.0:{port}/a.png",
        f"http://10.1.2.3:{port}/a.png",
        f"http://192.168.1.1:{port}/a.png",
        f"http://169.254.169.254:{port}/latest/meta-data/",
        f"{server}/redirect-loopback",  # an allowed server redirecting to loopback
    ]


LIMITS = dict(allow_image_urls=True, url_timeout_s=3.0, url_allow_networks=(f"{SERVER_HOST}/32",))


def test_ssrf_urls_reach_nothing(network, tmp_path: Path):
    recorder, server = network
    urls = ssrf_urls(recorder.port, server)
    feed = tmp_path / "f.csv"
    feed.write_text("product_id,title,image\n" + "".join(f"u{i},T,{u}\n" for i, u in enumerate(urls)))
    started = time.monotonic()
    items = list(read_feed(feed, Limits(**LIMITS, image_store=str(tmp_path / "store"))))
    assert time.monotonic() - started < 10
    assert [i.code for i in items] == ["url_not_global"] * len(urls), [(i.raw_id, i.reason) for i in items]
    assert recorder.connections == 0


def test_good_bad_and_slow_servers(network, tmp_path: Path):
    recorder, server = network
    cases = {  # path -> code of the reject, or None for a product
        "/ok.png": None, "/redirect-ok": None, "/html": "url_content_type", "/err": "url_http_status",
        "/missing": "url_http_status", "/redirect-loop": "url_redirects", "/huge": "image_too_large",
        "/slow": "url_deadline", "/slow-headers": "url_deadline",
    }
    feed = tmp_path / "f.csv"
    feed.write_text("product_id,title,image\n" + "".join(f"p{i},T,{server}{p}\n" for i, p in enumerate(cases))
                    + f"cred,T,http://user:pw@{SERVER_HOST}/ok.png\n")
    timings = []
    items = []
    reader = read_feed(feed, Limits(**LIMITS, image_store=str(tmp_path / "store")))
    while True:
        t0 = time.monotonic()
        item = next(reader, None)
        if item is None:
            break
        timings.append(time.monotonic() - t0)
        items.append(item)
    got = [None if isinstance(i, Product) else i.code for i in items]
    assert got == [*cases.values(), "url_credentials"], [getattr(i, "reason", None) for i in items]
    assert max(timings) < 3.0 + 1.5  # the deadline, not the server, ends a fetch
    for item in items:
        if isinstance(item, Product):
            assert Path(item.image).is_relative_to(tmp_path / "store")
        else:
            assert SECRET not in item.reason and "\x1b" not in item.reason and item.reason.isprintable()
    only = list(read_feed(feed, Limits(**LIMITS, url_allowed_hosts=("images.example.com",))))
    assert {i.code for i in only} == {"url_host_not_allowed", "url_credentials"}
    assert recorder.connections == 0


def test_url_feed_through_the_cli(network, db_url: str, tmp_path: Path, monkeypatch):
    """`shapstack ingest --allow-urls` (in this process: the listener must see what it does)."""
    recorder, server = network
    urls = [*ssrf_urls(recorder.port, server), f"{server}/ok.png", f"{server}/slow", f"{server}/err"]
    feed = tmp_path / "f.csv"
    feed.write_text("product_id,title,image\n" + "".join(f"u{i},T,{u}\n" for i, u in enumerate(urls)))
    monkeypatch.chdir(tmp_path)
    env = {"SHAPSTACK_URL_ALLOW_NETWORKS": f"{SERVER_HOST}/32", "SHAPSTACK_URL_TIMEOUT_S": "3",
           "SHAPSTACK_IMAGE_STORE": str(tmp_path / "store")}
    r = CliRunner().invoke(cli, ["--db", db_url, "ingest", str(feed), "--allow-urls"], env=env)
    assert r.exit_code == 0 and r.exception is None, r.output
    assert SECRET not in r.output
    assert "1 products accepted" in r.output
    with connect(db_url)() as s:
        codes = [c for c, in s.execute(select(m.RejectRow.code).order_by(m.RejectRow.row))]
        [image] = s.scalars(select(m.Product.image))
    assert codes == ["url_not_global"] * (len(urls) - 3) + ["url_deadline", "url_http_status"]
    assert Path(image).is_relative_to(tmp_path / "store")
    assert recorder.connections == 0


def test_a_trickling_server_does_not_hold_an_ingest(network, db_url: str, tmp_path: Path):
    """Rows on a server that trickles a byte a second: each is cut at its deadline, the ingest goes on."""
    recorder, server = network
    feed = tmp_path / "f.csv"
    feed.write_text("product_id,title,image\n" + "".join(f"s{i},T,{server}/slow\n" for i in range(3))
                    + "ok,T,\n")
    started = time.monotonic()
    run = ingest_feed(connect(db_url), str(feed), Limits(**{**LIMITS, "url_timeout_s": 1.0},
                                                         image_store=str(tmp_path / "store")))
    assert time.monotonic() - started < 3 * 1.0 + 5
    with connect(db_url)() as s:
        assert [c for c, in s.execute(select(m.RejectRow.code).where(m.RejectRow.run_id == run))] == ["url_deadline"] * 3
        assert list(s.scalars(select(m.Product.product_id).where(m.Product.run_id == run))) == ["ok"]


# ------------------------------------------------------------------------------ the environment

def test_working_directory_config_only_when_safe(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "shapstack.toml"
    cfg.write_text("allow_image_urls = true\n")
    cfg.chmod(0o666)
    assert not load_settings(env={}).limits.allow_image_urls  # writable by others: ignored
    cfg.chmod(0o644)
    assert load_settings(env={}).limits.allow_image_urls
    cfg.unlink()
    cfg.symlink_to(tmp_path / "elsewhere.toml")
    (tmp_path / "elsewhere.toml").write_text("allow_image_urls = true\n")
    assert not load_settings(env={}).limits.allow_image_urls  # a link: ignored
    assert load_settings(tmp_path / "elsewhere.toml", env={}).limits.allow_image_urls  # named: used
    (tmp_path / "typed.toml").write_text('allow_image_urls = "false"\nurl_allow_networks = ["10.0.0.0/8"]\n')
    with pytest.raises(UserError, match="allow_image_urls must be bool"):
        load_settings(tmp_path / "typed.toml", env={})
    (tmp_path / "nets.toml").write_text('url_allow_networks = ["not a network"]\n')
    with pytest.raises(UserError, match="not a network"):
        load_settings(tmp_path / "nets.toml", env={})


def test_database_urls_never_print_a_password(tmp_path: Path):
    cases = [["--db", "postgresql://admin:s3cr3t-pw@127.0.0.1:notaport/x", "status"],
             ["--db", "mysql://admin:s3cr3t-pw@127.0.0.1/x", "db", "upgrade"],
             ["--db", "postgresql://admin:s3cr3t-pw@127.0.0.1:1/x", "db", "upgrade"]]
    for args in cases[:2]:  # in this process: the same code path, without a start-up per case
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
        assert "s3cr3t" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    r = subprocess.run([sys.executable, "-m", "shapstack", *cases[2]], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "s3cr3t" not in r.stderr + r.stdout and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
