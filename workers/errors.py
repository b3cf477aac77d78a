"""Which failures are the world's (retry later) and which are the product's (split, dead-letter).

The database, the broker or a Triton server being briefly away is not a product's fault: the
task is retried with exponential backoff and the batch keeps its size. Anything else raised while
a batch runs is taken as the batch's own, and workers.batches hunts for the product that causes it.
"""

from __future__ import annotations


class Transient(Exception):
    """A failure worth retrying as it is, later; the original error is its __cause__."""


def _transient_types() -> tuple[type[BaseException], ...]:
    import kombu.exceptions
    import psycopg
    import redis.exceptions
    import sqlalchemy.exc

    from db.engine import DatabaseError

    return (
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


TRANSIENT: tuple[type[BaseException], ...] = _transient_types()


def _broker_types() -> tuple[type[BaseException], ...]:
    import kombu.exceptions
    import redis.exceptions

    return kombu.exceptions.OperationalError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError


# the broker itself away: whatever could not be sent is recovered by the sweeper, not by a person
BROKER: tuple[type[BaseException], ...] = _broker_types()


def is_transient(exc: BaseException) -> bool:
    """Whether exc, or an error it was raised from (`raise ... from`), is the world being away.

    Only explicit causes count: an error raised while handling another is not that error.
    """
    import sqlalchemy.exc

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, TRANSIENT):
            return True
        if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
            return True
        exc = exc.__cause__
    return False


def describe(exc: BaseException, limit: int = 2000) -> str:
    """One line for logs, run.error and dead letters."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:limit]
