"""Whose fault is a failure: the product's, the world's, or this worker's machine.

- product (the default): the batch is split until the product that raises is alone; alone, it is
  parked (dead-lettered) once it has raised on two different workers (workers.poison);
- transient (workers.retries): the database, the broker or Triton away; retried with capped
  backoff for settings.retry_budget_s, the batch whole and its products not charged;
- worker-fatal: errors that say this machine is broken (a CUDA error, CUDA out of memory, a lost
  GPU, a Triton server serving another bundle or none of it). The worker gives its batch back
  uncharged, takes no more work and exits; the message goes to another worker.

A circuit breaker turns a "product" error into a worker-fatal one when the same error comes back
on three batches with no product in common and nothing succeeded in between: a missing mount or a
broken library fails every batch alike, and no product is to blame.
"""

from __future__ import annotations

import os
import re
import time
from typing import Sequence

from serving.client import TritonMismatch
from workers.retries import is_transient

PRODUCT, TRANSIENT, FATAL = "product", "transient", "fatal"

FATAL_PATTERNS = re.compile(
    r"CUDA error|CUDA out of memory|CUDA driver|CUDA-capable device|cuDNN error|CUBLAS_STATUS|NCCL error"
    r"|device-side assert|GPU is lost|GPU has fallen off the bus|unknown model", re.IGNORECASE)
FATAL_TYPES = ("OutOfMemoryError", "AcceleratorError", "CudaError")


class WorkerFatal(Exception):
    """This worker's machine is broken: stop taking work (the message goes to another worker)."""


class SetupFailed(Exception):
    """What a run needs (its bundle, stacker, models) could not be loaded; counted per run."""


def kind(exc: BaseException) -> str:
    """PRODUCT, TRANSIENT or FATAL for an error raised while a batch ran (its causes included)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (WorkerFatal, TritonMismatch)) or type(e).__name__ in FATAL_TYPES \
                or FATAL_PATTERNS.search(str(e)):
            return FATAL
        e = e.__cause__ or e.__context__
    return TRANSIENT if is_transient(exc) else PRODUCT


def signature(error: str) -> str:
    """An error without its numbers and addresses: identical errors of different products match."""
    return re.sub(r"0x[0-9a-f]+|\d+", "#", error)[:300]


class Breaker:
    """Trips on the same error from `trips_at` batches with no product in common, nothing succeeding between."""

    def __init__(self, trips_at: int = 3):
        self.trips_at = trips_at
        self.error: str | None = None
        self.batches: list[frozenset[int]] = []

    def failed(self, error: str, pks: Sequence[int]) -> bool:
        sig = signature(error)
        if sig != self.error:
            self.error, self.batches = sig, []
        self.batches.append(frozenset(pks))
        union: set[int] = set()
        disjoint = 0
        for batch in self.batches:
            if not batch & union:
                disjoint += 1
                union |= batch
        return disjoint >= self.trips_at

    def succeeded(self) -> None:
        self.error, self.batches = None, []


BREAKER = Breaker()  # one per worker process


def inject_fault(stage: str) -> None:
    """Test-only: SHAPSTACK_FAULT_INJECT=cuda|cuda-oom|product makes every batch of stage infer raise,
    slow:SECONDS makes it take that much longer; honoured only with SHAPSTACK_ALLOW_FAULT_INJECTION=1."""
    if os.environ.get("SHAPSTACK_ALLOW_FAULT_INJECTION") != "1" or stage != "infer":
        return
    fault = os.environ.get("SHAPSTACK_FAULT_INJECT", "")
    if fault.startswith("slow:"):
        time.sleep(float(fault.removeprefix("slow:")))
    if fault == "cuda":
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
    if fault == "cuda-oom":
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
    if fault == "product":
        raise ValueError("cannot decode image (injected)")

