"""Streaming feed reader: CSV, JSONL and Parquet in, Products and Rejects out.

One bad row never sinks the feed: every row either becomes a Product or a Reject with a reason.
Only a feed that cannot be opened at all (missing file, unknown format, no product_id column)
raises FeedError. Rows are read one at a time (Parquet in record batches), so memory stays
bounded whatever the feed's size; the only per-row state kept is an 8-byte digest per product id
for duplicate detection.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

from pipeline.images import ImageError, check_image, resolve_image_ref
from pipeline.records import Limits, Product, Reject, content_hash

KNOWN = ("product_id", "title", "description", "image", "category", "group_id")
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


class FeedError(ValueError):
    """The feed as a whole cannot be read."""


def feed_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise FeedError(f"unknown feed format {path.suffix!r} (use .csv, .jsonl or .parquet)")
    return fmt


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    # surrogateescape keeps undecodable bytes visible per row instead of failing the file
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise FeedError("feed is empty") from None
        except csv.Error as exc:
            raise FeedError(f"cannot read CSV header: {exc}") from None
        header = [h.strip() for h in header]
        if "product_id" not in header:
            raise FeedError(f"feed has no product_id column (columns: {', '.join(header)})")
        row = 0
        while True:
            row += 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield row, f"malformed row: {exc}"
                continue
            if not cells or cells == [""]:
                row -= 1  # blank lines are not rows
                continue
            if len(cells) != len(header):
                yield row, f"malformed row: {len(cells)} columns, header has {len(header)}"
                continue
            yield row, dict(zip(header, cells))


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    with open(path, "rb") as fh:
        row = 0
        for line in fh:
            if not line.strip():
                continue
            row += 1
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                yield row, "undecodable text (not UTF-8)"
                continue
            except json.JSONDecodeError as exc:
                yield row, f"malformed row: {exc.msg}"
                continue
            if not isinstance(obj, dict):
                yield row, "malformed row: not a JSON object"
                continue
            yield row, obj


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise FeedError(f"cannot read Parquet feed: {exc}") from None
    if "product_id" not in pf.schema_arrow.names:
        raise FeedError(f"feed has no product_id column (columns: {', '.join(pf.schema_arrow.names)})")
    row = 0
    for batch in pf.iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            row += 1
            yield row, rec


def raw_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(row number, dict of cells) or (row number, reason) for rows that cannot be parsed."""
    if not path.is_file():
        raise FeedError(f"feed not found: {path}")
    reader = {"csv": _csv_rows, "jsonl": _jsonl_rows, "parquet": _parquet_rows}[feed_format(path)]
    try:
        yield from reader(path)
    except UnicodeDecodeError as exc:  # only the header can get here
        raise FeedError(f"feed header is not UTF-8: {exc}") from None


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN from Parquet/pandas
        return ""
    return str(value).strip()


def _bad_text(value: str) -> str | None:
    if "\x00" in value:
        return "NUL byte"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "undecodable text (not UTF-8)"
    return None


def parse_row(row: int, cells: dict[str, Any], root: Path, limits: Limits) -> Product | Reject:
    """Validate and normalise one row. Over-long title/description are truncated, not rejected."""
    pid = _text(cells.get("product_id"))
    raw_id = pid.encode("utf-8", "replace").decode("utf-8").replace("\x00", "")[:200] or None
    if not pid:
        return Reject(row, None, "missing product_id")
    if len(pid) > limits.max_id_length:
        return Reject(row, raw_id[: limits.max_id_length], f"product_id longer than {limits.max_id_length} characters")

    attributes: dict[str, Any] = {}
    for key, value in cells.items():
        text = _text(value) if not isinstance(value, (int, float, bool)) or key in KNOWN else value
        if isinstance(text, str):
            problem = _bad_text(text) or _bad_text(str(key))
            if problem:
                return Reject(row, raw_id, f"{problem} in column {str(key).encode('utf-8', 'replace').decode()!r}")
        if key not in KNOWN:
            attributes[str(key)] = text

    title = _text(cells.get("title"))
    description = _text(cells.get("description"))
    truncated = [
        name
        for name, value, limit in (
            ("title", title, limits.max_title_chars),
            ("description", description, limits.max_description_chars),
        )
        if len(value) > limit
    ]
    title = title[: limits.max_title_chars]
    description = description[: limits.max_description_chars]
    if truncated:
        attributes["_truncated"] = truncated

    image_cell = _text(cells.get("image"))
    image: str | None = None
    digest: str | None = None
    if image_cell:
        try:
            image = resolve_image_ref(image_cell, root, limits)
            if limits.verify_images:
                digest = check_image(image, limits)
        except ImageError as exc:
            return Reject(row, raw_id, str(exc))
        except Exception as exc:  # noqa: BLE001 - e.g. http.client.InvalidURL: one row, not the feed
            return Reject(row, raw_id, f"image unreadable: {type(exc).__name__}")

    if not (title or description or image):
        return Reject(row, raw_id, "nothing usable: no title, no description, no image")

    label = _text(cells.get("category")) or None
    group = _text(cells.get("group_id")) or None
    return Product(
        product_id=pid,
        title=title,
        description=description,
        image=image,
        label=label,
        group_id=group,
        attributes=attributes,
        row=row,
        content_hash=content_hash(title, description, digest or image),
    )


def read_feed(path: str | Path, limits: Limits = Limits()) -> Iterator[Product | Reject]:
    """Stream a feed: every data row yields exactly one Product or Reject, in file order."""
    path = Path(path)
    root = path.parent
    seen: set[bytes] = set()
    for row, cells in raw_rows(path):
        if isinstance(cells, str):
            yield Reject(row, None, cells)
            continue
        item = parse_row(row, cells, root, limits)
        if isinstance(item, Product):
            key = hashlib.blake2b(item.product_id.encode("utf-8"), digest_size=8).digest()
            if key in seen:
                item = Reject(row, item.product_id, "duplicate product_id within the feed")
            else:
                seen.add(key)
        yield item


def batched(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
