"""A run's predictions as a file: CSV, JSONL or Parquet (by the file's suffix), one row per product.

Rows stream from the database (db.results.iter_output_rows) and are written in chunks, so a run
of any size exports in bounded memory. In CSV, a text cell that a spreadsheet would run as a
formula (it begins with = + - @, a tab or a carriage return) gets a leading apostrophe.

Top-k categories are not exported: a prediction stores the stacker's winning category and its
probability only, and recomputing the full distribution would mean running the stacker again.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterable

from db.results import OUTPUT_COLUMNS, iter_output_rows
from pipeline.errors import UserError
from pipeline.feed import batched

FORMATS = (".csv", ".jsonl", ".parquet")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
CHUNK = 2000


def check_output_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise UserError(f"output must end in {', '.join(FORMATS)}, not {path.name!r}")
    if path.is_dir():
        raise UserError(f"output {path} is a folder: name a file")
    return path


def neutralise(value):
    """A CSV cell a spreadsheet will not evaluate: text beginning like a formula gets a leading '."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def _parquet_schema():
    import pyarrow as pa

    types = {"confidence": pa.float64(), "t_shap": pa.float64(), "v_shap": pa.float64(),
             "t_shap_stderr": pa.float64(), "mmshap_evaluations": pa.int64()}
    return pa.schema([(c, types.get(c, pa.string())) for c in OUTPUT_COLUMNS])


def write_rows(rows: Iterable[dict], path: Path) -> int:
    """Write rows (dicts with OUTPUT_COLUMNS) to path in its suffix's format; returns how many."""
    suffix = path.suffix.lower()
    n = 0
    tmp = path.with_name(path.name + ".partial")
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = _parquet_schema()
        with pq.ParquetWriter(tmp, schema) as writer:
            for chunk in batched(rows, CHUNK):
                writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
                n += len(chunk)
            if n == 0:
                writer.write_table(schema.empty_table())
    else:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            if suffix == ".jsonl":
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                    n += 1
            else:
                w = csv.DictWriter(fh, fieldnames=OUTPUT_COLUMNS)
                w.writeheader()
                for row in rows:
                    w.writerow({k: neutralise(v) for k, v in row.items()})
                    n += 1
    tmp.replace(path)  # a reader never sees half a file
    return n


def export(factory, run_id: int, path: str | Path) -> int:
    """Write the run's output rows to path; returns how many."""
    path = check_output_path(path)
    with factory() as s:
        return write_rows(iter_output_rows(s, run_id, chunk=CHUNK), path)
