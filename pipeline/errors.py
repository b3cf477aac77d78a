"""The project's exceptions: one base class, and the subclass for errors the user can fix.

The CLI prints a `UserError` as one line and exits 2; every other exception is a bug and keeps its
traceback. `UserError` is also a `ValueError`, so code that validates input can be caught by
callers that only know the standard library.
"""

from __future__ import annotations

import re

# user:password@ in any URL of a message
_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s:]+(:[^/@\s]*)?@", re.I)


class ShapstackError(Exception):
    """Base class of every error shapstack raises on purpose."""


class UserError(ShapstackError, ValueError):
    """Bad input, a missing file or setting, a model bundle that does not fit: the user's to fix."""


def hide_credentials(text: str) -> str:
    """text with the user and password of every URL in it replaced by ***: what a message may show."""
    return _CREDENTIALS.sub(lambda m: m.group("scheme") + "***@", text)
