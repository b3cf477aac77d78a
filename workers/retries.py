"""Which failures are the world's (retry later), and for how long.

The database, the broker or a Triton server being away is not a product's fault: the task is
retried with exponential backoff capped at BACKOFF_MAX_S, for as many retries as fit in
settings.retry_budget_s (10 minutes by default: a PostgreSQL failover or a Triton restart), and the
batch keeps its size. A PostgreSQL that turned read-only (a failover's old primary) is the world
too. workers.policy sorts the rest: the product's, or this worker's machine.
"""

from __future__ import annotations

import kombu.exceptions
import psycopg
import redis.exceptions
import sqlalchemy.exc

from db.engine import DatabaseError


class Transient(Exception):
    """A failure worth retrying as it is, later; the original error is its __cause__."""


TRANSIENT: tuple[type[BaseException], ...] = (
    Transient,
    ConnectionError,  # refused, reset, broken pipe; serving.client.TritonUnavailable after its own retries
    TimeoutError,
    sqlalchemy.exc.OperationalError,  # server gone, deadlock, serialization failure
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.DisconnectionError,
    sqlalchemy.exc.TimeoutError,  # connection pool exhausted
    psycopg.OperationalError,
    DatabaseError,  # db.engine could not connect or migrate at start-up
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    kombu.exceptions.OperationalError,  # broker unreachable while sending the next stage
)

# the broker itself away: whatever could not be sent is recovered by the sweeper, not by a person
BROKER: tuple[type[BaseException], ...] = (
    kombu.exceptions.OperationalError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


BACKOFF_MAX_S = 30


def backoff_s(retries: int) -> float:
    """Countdown before retry number retries + 1: 1, 2, 4 ... s, capped."""
    return float(min(BACKOFF_MAX_S, 2 ** retries))


def retries_for(budget_s: float) -> int:
    """How many retries backoff_s spreads over budget_s seconds."""
    n, waited = 0, 0.0
    while waited < budget_s:
        waited += backoff_s(n)
        n += 1
    return n


def _read_only(exc: BaseException) -> bool:
    return "read-only transaction" in str(exc) or getattr(getattr(exc, "orig", None), "sqlstate", None) == "25006"


def is_transient(exc: BaseException) -> bool:
    """Whether exc, or an error it was raised from (`raise ... from`), is the world being away.

    Only explicit causes count: an error raised while handling another is not that error.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, TRANSIENT):
            return True
        if isinstance(exc, sqlalchemy.exc.DBAPIError) and (exc.connection_invalidated or _read_only(exc)):
            return True
        exc = exc.__cause__
    return False


def describe(exc: BaseException, limit: int = 2000) -> str:
    """One line for logs, run.error and dead letters."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:limit]
