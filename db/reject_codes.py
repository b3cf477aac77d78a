"""A short, stable code for each reject reason, for BI (group by code; the reason keeps the detail).

The feed parser (pipeline/feed.py, pipeline/images.py) writes a reason as free text, often with a
detail embedded ("image has 9000x9000 pixels, over the ... limit"). The code is derived from the
reason's fixed beginning, in this one table: the `reject_reasons` view's CASE expression is built
from it (`code_sql`), and Python callers use `reject_code`. A reason no pattern matches is
"other"; a new reason text in the parser needs a line here.
"""

from __future__ import annotations

# (code, SQL LIKE pattern of the reason); first match wins
CODES: tuple[tuple[str, str], ...] = (
    ("missing_id", "missing product_id"),
    ("id_too_long", "product_id longer than %"),
    ("duplicate_id", "duplicate product_id%"),
    ("nul_byte", "NUL byte%"),
    ("not_utf8", "undecodable text%"),
    ("malformed_row", "malformed row%"),
    ("no_content", "nothing usable%"),
    ("url_not_allowed", "image URL not allowed%"),
    ("url_scheme", "unsupported image URL scheme%"),
    ("url_unreadable", "image URL unreadable%"),
    ("path_absolute", "image path is absolute%"),
    ("path_escape", "image path escapes%"),
    ("image_missing", "image file not found%"),
    ("image_too_large", "image file over %"),
    ("image_too_large", "image over %"),
    ("image_too_many_pixels", "image has %pixels, over%"),
    ("image_bomb", "image is a decompression bomb%"),
    ("image_corrupt", "image corrupt or unsupported%"),
    ("image_unreadable", "image file unreadable%"),
    ("image_unreadable", "image unreadable%"),
)
OTHER = "other"


def _like(text: str, pattern: str) -> bool:
    """SQL LIKE with % as the wildcard (an _ in a pattern is taken literally here; in SQL it
    matches any one character, a difference no reason text of the parser meets)."""
    parts = pattern.split("%")
    if not text.startswith(parts[0]):
        return False
    pos = len(parts[0])
    for i, part in enumerate(parts[1:], 1):
        if i == len(parts) - 1:
            return text.endswith(part) and len(text) - len(part) >= pos
        found = text.find(part, pos)
        if found < 0:
            return False
        pos = found + len(part)
    return pos == len(text)


def reject_code(reason: str) -> str:
    """The code of a reject reason (OTHER when no pattern matches)."""
    for code, pattern in CODES:
        if _like(reason, pattern):
            return code
    return OTHER


def code_sql(column: str) -> str:
    """The same mapping as a SQL CASE expression over column (PostgreSQL and SQLite)."""
    whens = " ".join(f"WHEN {column} LIKE '{pattern}' THEN '{code}'"
                     for code, pattern in CODES)
    return f"CASE {whens} ELSE '{OTHER}' END"
