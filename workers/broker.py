"""What the broker holds: the product keys and runs named by messages that wait in a queue or were
delivered and not yet acknowledged (Redis: the queue lists and kombu's `unacked` hash).

The sweeper compares this with the database: a pending product that no worker claims and no
message names has lost its message (a broker restarted without persistence, a send that failed);
one that a message names is merely queued, however long the queue.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field

import redis

from workers.queues import QUEUES

PRIORITY_SEP = "\x06\x16"  # kombu's separator of a queue's priority lists
UNACKED = "unacked"


@dataclass
class Held:
    products: set[int] = field(default_factory=set)
    ingests: set[int] = field(default_factory=set)  # runs with an ingest message


def held(broker_url: str) -> Held | None:
    """What messages in the broker name; None when the broker is not Redis (it cannot be read)."""
    if not broker_url.startswith(("redis://", "rediss://")):
        return None
    client = redis.Redis.from_url(broker_url, socket_timeout=10)
    try:
        out = Held()
        keys = [q for q in QUEUES] + [f"{q}{PRIORITY_SEP}{p}" for q in QUEUES for p in range(1, 10)]
        for key in keys:
            for raw in client.lrange(key, 0, -1):
                _add(out, json.loads(raw))
        for raw in client.hvals(UNACKED):
            _add(out, json.loads(raw)[0])
        return out
    finally:
        client.close()


def _add(out: Held, message: dict) -> None:
    task = message.get("headers", {}).get("task", "")
    body = message.get("body", "")
    if message.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    try:
        args = json.loads(body)[0]
    except (ValueError, IndexError, KeyError, TypeError):
        return
    if task in ("shapstack.infer", "shapstack.stack") and len(args) >= 2:
        out.products.update(int(pk) for pk in args[1])
    elif task == "shapstack.ingest" and args:
        out.ingests.add(int(args[0]))
