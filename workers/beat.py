"""A beat that refuses to run twice: it schedules only while it holds the `beat` lock (db.claims),
a lease in the database renewed every heartbeat. A second `--beat` started by mistake waits as a
standby and takes over within three heartbeats of the first one dying."""

from __future__ import annotations

import logging
import os
import socket
import time

from celery.beat import Scheduler

from db.claims import take_lock
from workers.app import settings
from workers.resources import factory
from workers.retries import describe

log = logging.getLogger(__name__)

LOCK = "beat"


class LockedScheduler(Scheduler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.holder = f"beat@{socket.gethostname()}/{os.getpid()}"
        self.holding, self.checked = False, float("-inf")

    def tick(self, *args, **kwargs) -> float:
        every = settings().heartbeat_s
        if time.monotonic() - self.checked >= every:
            self.checked = time.monotonic()
            was = self.holding
            try:
                with factory()() as s, s.begin():
                    self.holding = take_lock(s, LOCK, self.holder, 3 * every)
            except Exception as exc:  # noqa: BLE001 - the database away: schedule nothing until it is back
                log.warning("beat lock not renewed: %s", describe(exc))
                self.holding = False
            if self.holding != was:
                log.warning("%s %s the beat lock", self.holder, "holds" if self.holding else "does not hold")
        if not self.holding:
            return min(every, self.max_interval)
        return super().tick(*args, **kwargs)
