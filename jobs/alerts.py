"""Alerts when a run finishes: a collapse flag raised, or products failed or dead-lettered.

Each one is a WARNING log line carrying the run id, and, when `alert_webhook_url` is set, one JSON
POST per run to that URL:

    {"event": "run_finished", "run_id": 12, "failed": 0, "dead": 1, "t_shap_drift": 0.21,
     "flags": [{"scope": "all", "flag": "drift"}], "alerts": ["run 12: collapse flag drift raised (all)", ...]}

The POST is bounded in time (`alert_timeout_s`, DNS included), follows no redirect, and goes only to
global addresses unless `alert_webhook_private` is set; a failure is logged, never raised: an alert
that cannot be delivered must not fail the run it reports on.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.client import HTTPException
from urllib.parse import urlsplit

from db.stats import failures, raised_flags, t_shap_drift

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunReport:
    run_id: int
    failed: int = 0
    dead: int = 0
    flags: list[tuple[str, str]] = field(default_factory=list)  # (scope, flag)
    t_shap_drift: float | None = None

    @property
    def alerts(self) -> list[str]:
        out = [f"run {self.run_id}: collapse flag {flag} raised ({scope})" for scope, flag in self.flags]
        if self.failed or self.dead:
            out.append(f"run {self.run_id}: finished with {self.failed} failed and {self.dead} dead-lettered products")
        return out


def run_finished(factory, run_id: int, settings) -> RunReport:
    """Read the finished run's flags and failures, log a warning for each, call the webhook if any."""
    with factory() as s:
        report = RunReport(run_id, *failures(s, run_id), raised_flags(s, run_id), t_shap_drift(s, run_id))
    for line in report.alerts:
        log.warning(line, extra={"run_id": run_id})
    if report.alerts and settings.alert_webhook_url:
        payload = {"event": "run_finished", "run_id": run_id, "failed": report.failed, "dead": report.dead,
                   "t_shap_drift": report.t_shap_drift, "flags": [{"scope": s, "flag": f} for s, f in report.flags],
                   "alerts": report.alerts}
        post(settings.alert_webhook_url, payload, timeout=settings.alert_timeout_s,
             allow_private=settings.alert_webhook_private, run_id=run_id)
    return report


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a redirect could lead to an address the check below refused


_opener = urllib.request.build_opener(_NoRedirect)


def refused_address(url: str) -> str | None:
    """Why url may not be posted to without alert_webhook_private, or None when every address is global."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "not an http(s) URL"
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80),
                                   type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        return f"cannot resolve {parts.hostname}: {exc}"
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not address.is_global:
            return f"{parts.hostname} resolves to the non-global address {address} (set alert_webhook_private)"
    return None


def post(url: str, payload: dict, *, timeout: float, allow_private: bool = False, run_id: int | None = None) -> bool:
    """POST payload as JSON; returns whether the server answered 2xx within timeout seconds."""
    host = urlsplit(url).hostname or "?"  # the URL itself may hold a token: only its host is logged
    outcome: dict[str, object] = {}

    def send() -> None:
        try:
            problem = None if allow_private else refused_address(url)
            if problem:
                outcome["error"] = f"refused: {problem}"
                return
            request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                             headers={"Content-Type": "application/json", "User-Agent": "shapstack"})
            with _opener.open(request, timeout=timeout) as response:
                outcome["status"] = response.status
        except (OSError, ValueError, HTTPException) as exc:  # URLError and HTTPError are OSErrors
            outcome["error"] = f"{type(exc).__name__}: {getattr(exc, 'reason', None) or exc}"

    worker = threading.Thread(target=send, name="shapstack-webhook", daemon=True)
    worker.start()
    worker.join(timeout)
    status = outcome.get("status")
    if isinstance(status, int) and 200 <= status < 300:
        return True
    error = outcome.get("error") or (f"HTTP {status}" if status else f"no answer within {timeout} s")
    log.warning("alert webhook at %s not delivered: %s", host, error, extra={"run_id": run_id})
    return False
