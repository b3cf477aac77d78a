"""`shapstack serve` as a child process on free ports: for tests and benchmarks on one machine.

One launcher, so that what "ready" means (Triton's own /v2/health/ready) and how the server is
stopped (SIGTERM, then SIGKILL of its process group) are written once.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextmanager
def serve_subprocess(args: Sequence[str], log: Path, *, timeout_s: float = 120,
                     env: dict[str, str] | None = None, ports: dict[str, int] | None = None) -> Iterator[dict[str, str]]:
    """Start `shapstack serve ARGS` on free ports (or ports: http, grpc, metrics, to start a server
    again where its clients expect it), wait until ready, yield its URLs; always stop it.

    Raises RuntimeError (with the log's tail) when the server exits or is not ready in time.
    """
    ports = ports or {k: free_port() for k in ("http", "grpc", "metrics")}
    urls = {"http": f"http://127.0.0.1:{ports['http']}", "grpc": f"grpc://127.0.0.1:{ports['grpc']}",
            "metrics": f"http://127.0.0.1:{ports['metrics']}"}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shapstack", "serve", *args, "--http-port", str(ports["http"]),
             "--grpc-port", str(ports["grpc"]), "--metrics-port", str(ports["metrics"])],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not http_ok(urls["http"] + "/v2/health/ready"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Triton did not become ready (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield urls
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
