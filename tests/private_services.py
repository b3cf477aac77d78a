"""Private Redis and PostgreSQL servers for tests that stop, kill or restart them: the shared ones
(5432, 6379) are never touched. Each runs as a subprocess on a free port in a temporary folder."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


class PrivateRedis:
    """redis-server with no persistence: a restart loses every message, as Redis without AOF does."""

    def __init__(self, folder: Path):
        self.folder, self.port, self.proc = folder, free_port(), None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "PrivateRedis":
        if shutil.which("redis-server") is None:
            import pytest

            pytest.skip("redis-server not installed")
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--daemonize", "no", "--dir", str(self.folder)],
                                     stdout=open(self.folder / "redis.log", "ab"), stderr=subprocess.STDOUT)
        _wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


class PrivatePostgres:
    """A PostgreSQL 15 cluster of its own (initdb as user postgres), started and stopped with pg_ctl.

    Its folder is a directory of /tmp of its own, not under pytest's (which other pytest sessions
    reset to mode 0700, locking the postgres user out); close() removes it.
    """

    def __init__(self):
        self.folder, self.port = Path(tempfile.mkdtemp(prefix="shapstack-pg-")), free_port()
        self.data = self.folder / "pgdata"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *cmd: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        r = subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120, cwd=self.folder)
        if r.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")

    def start(self) -> "PrivatePostgres":
        if not (PG_BIN / "initdb").exists():
            import pytest

            pytest.skip("PostgreSQL 15 server binaries not installed")
        if not self.data.exists():
            if os.geteuid() == 0:
                shutil.chown(self.folder, "postgres", "postgres")
            self._as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                              "--no-sync")
        self._ctl("start", "-w")
        _wait_port(self.port)
        return self

    def _ctl(self, *args: str) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options, "-l",
                          str(self.folder / "pg.log"), *args)

    def stop(self, mode: str = "fast") -> None:
        self._ctl("stop", "-m", mode, "-w")

    def restart(self) -> None:
        self._ctl("restart", "-m", "fast", "-w")

    def close(self) -> None:
        """Stop it (immediately) and remove its files."""
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
