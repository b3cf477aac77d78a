"""Streaming feed reader: CSV, JSONL and Parquet in, Products and Rejects out.

One bad row never sinks the feed: every row either becomes a Product or a Reject with a code and a
reason. Only a feed that cannot be opened at all (missing file, unknown format, no product_id
column, a Parquet column of the wrong type) raises FeedError. Memory is bounded whatever the feed:
a CSV record and a JSONL line are read at most max_record_chars at a time (a longer one is skipped
and rejected, and reading resumes at the next line), Parquet is read in batches sized from the file's
own metadata with every string cell cut to its limit before it becomes a Python string, and the only
per-row state kept is an 8-byte digest per product id for duplicate detection.

Every value is checked against what the database will enforce (docs/ingest.md): lengths of the id,
category and group id columns, JSON attributes without NaN or Infinity and bounded in count and
size, no NUL bytes or undecodable text.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import sys
from collections import deque
from datetime import date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterable, Iterator, TextIO

from pipeline.errors import UserError
from pipeline.images import ImageError, ImageStore, resolve_image_ref, verify_image
from pipeline.records import ID_COLUMN_CHARS, LABEL_COLUMN_CHARS, Limits, Product, Reject, content_hash

log = logging.getLogger(__name__)

KNOWN = ("product_id", "title", "description", "image", "category", "group_id")
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
INT64 = 2**63
PARQUET_BATCH_BYTES = 32 << 20  # decoded bytes per Parquet batch, estimated from the file's metadata

# records are bounded by _Lines below; the csv module's own (process-wide) limit only has to be above them
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


class FeedError(UserError):
    """The feed as a whole cannot be read."""


class Bad(Exception):
    """A row's problem: code and reason of its Reject."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


Raw = tuple[int, "dict[str, Any] | Bad"]


def feed_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise FeedError(f"unknown feed format {path.suffix!r} (use .csv, .jsonl or .parquet)")
    return fmt


# ------------------------------------------------------------------------------------------ CSV

class _TooLarge(Exception):
    pass


_OVERLONG = "<an over-long line>"  # stands, by identity, for a physical line that was skipped


class _Lines:
    """The physical lines of a CSV file for csv.reader, bounded per record, with push-back.

    A record over max_record_chars or max_record_lines stops with _TooLarge; the lines it took are
    kept (bounded by the same limits) so that reading can resume at the line after its first.
    """

    def __init__(self, fh: TextIO, limits: Limits):
        self.fh, self.max_chars, self.max_lines = fh, limits.max_record_chars, limits.max_record_lines
        self.pending: deque[str] = deque()
        self.record: list[str] = []
        self.chars = 0

    def __iter__(self) -> "_Lines":
        return self

    def __next__(self) -> str:
        if self.pending:
            line = self.pending.popleft()
            if line is _OVERLONG:
                self.record.append(line)
                raise _TooLarge
        else:
            line = self.fh.readline(self.max_chars + 1)
            if not line:
                raise StopIteration
            if len(line) > self.max_chars and not line.endswith(("\n", "\r")):
                while (rest := self.fh.readline(1 << 16)) and not rest.endswith(("\n", "\r")):
                    pass  # skip the rest of an over-long physical line, keeping none of it
                self.record.append(_OVERLONG)
                raise _TooLarge
        self.record.append(line)
        self.chars += len(line)
        if self.chars > self.max_chars or len(self.record) > self.max_lines:
            raise _TooLarge
        return line

    def start(self) -> None:
        self.record, self.chars = [], 0

    def resume_after_first(self) -> None:
        """Give back every line of the current record but its first, to be read again."""
        self.pending.extendleft(reversed(self.record[1:]))
        self.start()


def _csv_rows(path: Path, limits: Limits) -> Iterator[Raw]:
    # surrogateescape keeps undecodable bytes visible per row instead of failing the file
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
        lines = _Lines(fh, limits)
        reader = csv.reader(lines)
        try:
            header = next(reader)
        except StopIteration:
            raise FeedError("feed is empty") from None
        except _TooLarge:
            raise FeedError(f"CSV header over {limits.max_record_chars} characters or "
                            f"{limits.max_record_lines} lines") from None
        except csv.Error as exc:
            raise FeedError(f"cannot read CSV header: {exc}") from None
        header = [h.strip() for h in header]
        if "product_id" not in header:
            shown = ", ".join(h[:40] for h in header[:20])
            raise FeedError(f"feed has no product_id column (columns: {shown.encode('utf-8', 'replace').decode()})")
        row = 0
        while True:
            lines.start()
            try:
                cells = next(reader)
            except StopIteration:
                return
            except _TooLarge:
                row += 1
                yield row, Bad("csv_record_too_large", f"CSV record over {limits.max_record_chars} characters or "
                                                       f"{limits.max_record_lines} lines (an unclosed quote?)")
                lines.resume_after_first()
                continue
            except csv.Error as exc:
                row += 1
                yield row, Bad("csv_malformed", f"malformed row: {exc}")
                lines.resume_after_first()
                continue
            if not cells or cells == [""]:
                continue  # blank lines are not rows
            row += 1
            if len(cells) != len(header):
                if len(lines.record) > 1:  # an unclosed quote swallowed the lines after it
                    yield row, Bad("csv_malformed", f"malformed row: an unclosed quote ({len(cells)} columns, "
                                                    f"header has {len(header)})")
                    lines.resume_after_first()
                else:
                    yield row, Bad("csv_malformed", f"malformed row: {len(cells)} columns, header has {len(header)}")
                continue
            yield row, dict(zip(header, cells))


# ---------------------------------------------------------------------------------------- JSONL

def _parse_int(text: str) -> int:
    if len(text) > 20:
        raise Bad("json_number_out_of_range", "number out of the 64-bit integer range")
    value = int(text)
    if not -INT64 <= value < INT64:
        raise Bad("json_number_out_of_range", "number out of the 64-bit integer range")
    return value


def _depth(value: Any, limit: int, depth: int = 1) -> None:
    if depth > limit:
        raise Bad("json_too_deep", f"JSON nested deeper than {limit} levels")
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for child in children:
        if isinstance(child, (dict, list)):
            _depth(child, limit, depth + 1)


def _json_object(line: bytes, limits: Limits) -> dict[str, Any]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise Bad("text_not_utf8", "undecodable text (not UTF-8)") from None
    try:
        obj = json.loads(text, parse_int=_parse_int)
    except RecursionError:
        raise Bad("json_too_deep", f"JSON nested deeper than {limits.max_json_depth} levels") from None
    except json.JSONDecodeError as exc:
        raise Bad("json_malformed", f"malformed row: {exc.msg}") from None
    if not isinstance(obj, dict):
        raise Bad("json_not_object", "malformed row: not a JSON object")
    _depth(obj, limits.max_json_depth)
    return obj


def _jsonl_rows(path: Path, limits: Limits) -> Iterator[Raw]:
    limit = limits.max_record_chars
    with open(path, "rb") as fh:
        row = 0
        first = True
        while line := fh.readline(limit + 1):
            if first:
                line, first = line.removeprefix(b"\xef\xbb\xbf"), False
            too_long = len(line) > limit and not line.endswith(b"\n")
            if too_long:
                while (rest := fh.readline(1 << 16)) and not rest.endswith(b"\n"):
                    pass
            elif not line.strip():
                continue
            row += 1
            if too_long:
                yield row, Bad("jsonl_line_too_long", f"JSONL line over {limit} bytes")
                continue
            try:
                yield row, _json_object(line, limits)
            except Bad as bad:
                yield row, bad


# -------------------------------------------------------------------------------------- Parquet

def _parquet_kind(t) -> str | None:
    """'text', 'int', 'float', 'bool', 'time', 'null' for the Arrow types a feed may hold, else None."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "text"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "float"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_temporal(t):
        return "time"
    if pa.types.is_null(t):
        return "null"
    return None


ALLOWED_KNOWN = {"product_id": {"text", "int", "float", "null"}, "image": {"text", "null"},
                 "category": {"text", "int", "float", "null"}, "group_id": {"text", "int", "float", "null"},
                 "title": {"text", "null"}, "description": {"text", "null"}}


def _cell_limits(limits: Limits) -> dict[str, int]:
    return {"product_id": min(limits.max_id_length, ID_COLUMN_CHARS), "title": limits.max_title_chars,
            "description": limits.max_description_chars, "category": LABEL_COLUMN_CHARS,
            "group_id": LABEL_COLUMN_CHARS, "image": 4096}


def _parquet_rows(path: Path, limits: Limits) -> Iterator[Raw]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
        schema = pf.schema_arrow
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a broken file
        raise FeedError(f"cannot read Parquet feed: {type(exc).__name__}") from None
    if "product_id" not in schema.names:
        raise FeedError(f"feed has no product_id column (columns: {', '.join(schema.names[:20])})")
    columns, text_columns = [], []
    for f in schema:
        kind = _parquet_kind(f.type)
        if f.name in ALLOWED_KNOWN:
            if kind not in ALLOWED_KNOWN[f.name]:
                raise FeedError(f"Parquet column {f.name!r} has type {f.type}; expected "
                                f"{' or '.join(sorted(ALLOWED_KNOWN[f.name] - {'null'}))}")
        elif kind is None:
            log.warning("Parquet column %r has type %s (not text, a number, a boolean or a time): not read",
                        f.name, f.type)
            continue
        columns.append(f.name)
        if kind == "text":
            text_columns.append(f.name)
    # cut every string cell to one character over its limit before it becomes a Python string (a
    # dictionary-encoded column can expand one 10 MB value into every row of a row group)
    cut = {c: _cell_limits(limits).get(c, limits.max_attribute_chars) + 1 for c in text_columns}
    try:
        pf = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False, read_dictionary=text_columns)
        meta = pf.metadata
        row = 0
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            per_row = max(1, rg.total_byte_size // max(1, rg.num_rows))
            size = int(max(1, min(4096, PARQUET_BATCH_BYTES // per_row)))
            for batch in pf.iter_batches(batch_size=size, row_groups=[g], columns=columns):
                arrays = {}
                for name, arr in zip(batch.schema.names, batch.columns):
                    if name in cut:
                        if not pa.types.is_dictionary(arr.type):
                            arr = arr.dictionary_encode()
                        arr = pa.DictionaryArray.from_arrays(
                            arr.indices, pc.utf8_slice_codeunits(arr.dictionary, 0, cut[name]))
                    arrays[name] = arr.to_pylist()
                for i in range(batch.num_rows):
                    row += 1
                    yield row, {name: values[i] for name, values in arrays.items()}
    except (OSError, pa.ArrowException) as exc:
        raise FeedError(f"cannot read Parquet feed at row {row + 1}: {type(exc).__name__}") from None


# --------------------------------------------------------------------------------------- a feed

def raw_rows(path: Path, limits: Limits = Limits()) -> Iterator[Raw]:
    """(row number, dict of cells) or (row number, Bad) for rows that cannot be parsed."""
    if not path.is_file():
        raise FeedError(f"feed not found: {path}")
    reader = {"csv": _csv_rows, "jsonl": _jsonl_rows, "parquet": _parquet_rows}[feed_format(path)]
    try:
        yield from reader(path, limits)
    except UnicodeDecodeError as exc:  # only the header can get here
        raise FeedError(f"feed header is not UTF-8: {exc.reason}") from None


def check_feed(path: str | Path, limits: Limits = Limits()) -> None:
    """Fail fast, before a run exists, when the feed as a whole cannot be read (FeedError)."""
    next(raw_rows(Path(path), limits), None)


# ---------------------------------------------------------------------------------- a row's values

def _check_text(value: str, where: str) -> str:
    if "\x00" in value:
        raise Bad("text_nul", f"NUL byte in {where}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Bad("text_not_utf8", f"undecodable text (not UTF-8) in {where}") from None
    return value


def _shown(name: str) -> str:
    return repr(name.encode("utf-8", "replace").decode("utf-8")[:60])


def _text(value: Any, column: str) -> str:
    """A known column's value as stripped text (None and NaN: empty)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise Bad("field_type", f"column {column} must be text, not {type(value).__name__}")
    return _check_text(str(value), f"column {column}").strip()


def _integral(value: Any, column: str) -> Any:
    """An id or label given as a float (a Parquet column of integers with nulls) as its integer."""
    if isinstance(value, float) and not math.isnan(value):
        if not math.isfinite(value) or not value.is_integer() or abs(value) > 2**53:
            raise Bad(f"{column}_not_integer", f"{column} is a number that is not an exact integer")
        return int(value)
    return value


def _attribute(value: Any, where: str, limits: Limits, depth: int = 0) -> tuple[Any, bool]:
    """(value as stored in JSON, whether it was truncated). Non-finite numbers become null."""
    if value is None or isinstance(value, (bool, int)):
        if isinstance(value, int) and not isinstance(value, bool) and not -INT64 <= value < INT64:
            raise Bad("number_out_of_range", f"number out of the 64-bit integer range in {where}")
        return value, False
    if isinstance(value, float):
        return (value if math.isfinite(value) else None), False
    if isinstance(value, Decimal):
        return (float(value) if value.is_finite() else None), False
    if isinstance(value, (datetime, date, time)):
        return value.isoformat(), False
    if isinstance(value, str):
        value = _check_text(value, where).strip() if depth == 0 else _check_text(value, where)
        if len(value) > limits.max_attribute_chars:
            return value[: limits.max_attribute_chars], True
        return value, False
    if depth < limits.max_json_depth and isinstance(value, list):
        parts = [_attribute(v, where, limits, depth + 1) for v in value]
        return [v for v, _ in parts], any(t for _, t in parts)
    if depth < limits.max_json_depth and isinstance(value, dict):
        parts = {_check_text(str(k), where): _attribute(v, where, limits, depth + 1) for k, v in value.items()}
        return {k: v for k, (v, _) in parts.items()}, any(t for _, t in parts.values())
    raise Bad("field_type", f"unsupported value ({type(value).__name__}) in {where}")


def _attributes(cells: dict[str, Any], limits: Limits, truncated: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    extra = [k for k in cells if k not in KNOWN]
    for key in extra[: limits.max_attributes]:
        name = _check_text(str(key), "a column name")[: limits.max_attribute_chars]
        out[name], cut = _attribute(cells[key], f"column {_shown(name)}", limits)
        if cut:
            truncated.append(name)
    if len(extra) > limits.max_attributes:
        truncated.append("_attributes")
    if truncated:
        out["_truncated"] = truncated
    size = len(json.dumps(out, allow_nan=False, ensure_ascii=False).encode("utf-8"))
    if size > limits.max_attributes_bytes:
        raise Bad("attributes_too_large", f"extra columns over {limits.max_attributes_bytes} bytes as JSON")
    return out


def _label(value: Any, column: str) -> str | None:
    text = _text(_integral(value, column), column)
    if len(text) > LABEL_COLUMN_CHARS:
        raise Bad(f"{column}_too_long", f"{column} longer than {LABEL_COLUMN_CHARS} characters")
    return text or None


def _raw_id(cells: dict[str, Any]) -> str | None:
    """What a reject shows of the row's id: printable text, at most 200 characters."""
    value = cells.get("product_id")
    if value is None or isinstance(value, (dict, list)):
        return None
    text = value if isinstance(value, str) else repr(value) if isinstance(value, float) else None
    if text is None:
        try:
            text = str(value)[:200]
        except ValueError:  # an int over Python's digit limit
            return None
    text = text[:200].encode("utf-8", "replace").decode("utf-8")
    return "".join(c if c.isprintable() else "?" for c in text) or None


def parse_row(row: int, cells: dict[str, Any], root: Path, limits: Limits,
              store: ImageStore | None = None) -> Product | Reject:
    """Validate and normalise one row (rules: docs/ingest.md)."""
    try:
        return _parse(row, cells, root, limits, store)
    except Bad as bad:
        return Reject(row, _raw_id(cells), bad.reason, bad.code)


def _parse(row: int, cells: dict[str, Any], root: Path, limits: Limits, store: ImageStore | None) -> Product | Reject:
    pid = _text(_integral(cells.get("product_id"), "product_id"), "product_id")
    if not pid:
        raise Bad("id_missing", "missing product_id")
    max_id = min(limits.max_id_length, ID_COLUMN_CHARS)
    if len(pid) > max_id:
        raise Bad("id_too_long", f"product_id longer than {max_id} characters")

    title = _text(cells.get("title"), "title")
    description = _text(cells.get("description"), "description")
    truncated = [name for name, value, limit in (("title", title, limits.max_title_chars),
                                                  ("description", description, limits.max_description_chars))
                 if len(value) > limit]
    title = title[: limits.max_title_chars]
    description = description[: limits.max_description_chars]
    label = _label(cells.get("category"), "category")
    group = _label(cells.get("group_id"), "group_id")
    attributes = _attributes(cells, limits, truncated)

    image_cell = _text(cells.get("image"), "image")
    image: str | None = None
    digest: str | None = None
    if image_cell:
        try:
            image = resolve_image_ref(image_cell, root, limits)
            if limits.verify_images:
                image, digest = verify_image(image, root, limits, store)
        except ImageError as exc:
            raise Bad(exc.code, str(exc)) from None

    if not (title or description or image):
        raise Bad("nothing_usable", "nothing usable: no title, no description, no image")
    return Product(product_id=pid, title=title, description=description, image=image, label=label,
                   group_id=group, attributes=attributes, row=row,
                   content_hash=content_hash(title, description, digest or image))


def read_feed(path: str | Path, limits: Limits = Limits()) -> Iterator[Product | Reject]:
    """Stream a feed: every data row yields exactly one Product or Reject, in file order.

    With limits.image_store set (and verify_images), each product's image is the snapshot of the
    bytes that were verified.
    """
    path = Path(path)
    root = path.parent
    store = ImageStore(limits.image_store) if limits.image_store and limits.verify_images else None
    seen: set[bytes] = set()
    for row, cells in raw_rows(path, limits):
        if isinstance(cells, Bad):
            yield Reject(row, None, cells.reason, cells.code)
            continue
        item = parse_row(row, cells, root, limits, store)
        if isinstance(item, Product):
            key = hashlib.blake2b(item.product_id.encode("utf-8"), digest_size=8).digest()
            if key in seen:
                item = Reject(row, item.product_id, "duplicate product_id within the feed", "id_duplicate")
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
