"""Hostile feeds, as real files on SQLite and PostgreSQL: every bad row is rejected (with the code of
the rule it broke) or sanitised, every good row of the same feed is stored, nothing hangs, and
memory stays bounded."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sqlalchemy import select

from db import models as m
from db.engine import connect
from db.runs import create_run
from jobs.ingest import _store, ingest_feed
from pipeline.feed import FeedError, read_feed
from pipeline.images import ImageError, load_image
from pipeline.preprocess import ImagesUnreadable, encode_products
from pipeline.records import Limits, Product
from pipeline.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def shapstack(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "shapstack", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=timeout)


def stored(db_url: str, run_id: int) -> tuple[dict[str, m.Product], dict[int, m.RejectRow]]:
    with connect(db_url)() as s:
        products = {p.product_id: p for p in s.scalars(select(m.Product).where(m.Product.run_id == run_id))}
        rejects = {r.row: r for r in s.scalars(select(m.RejectRow).where(m.RejectRow.run_id == run_id))}
    return products, rejects


def png(color=(200, 10, 10), size=(24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def test_csv_unclosed_quote_and_oversized_values_through_the_cli(db_url: str, tmp_path: Path):
    """20,000 rows, an unclosed quote in row 2: only that record is rejected. The same feed holds a
    huge quoted field, a 10 MB extra column, a 5,000-digit id, a BOM and values over every column
    size of the database; each is rejected or truncated, and every other row is stored."""
    header = "product_id,title,description,image,category,group_id,notes\n"
    lines = [f"p{i},title {i},description {i},,cat{i % 5},g{i % 50},n{i}\n" for i in range(20_000)]
    lines[1] = 'p1,"unclosed quote title,description,,cat,g,n\n'
    bad = {  # row -> (line, what must happen)
        101: ('p100,"' + "h" * 1_500_000 + '",d,,c,g,n\n', "csv_record_too_large"),  # huge field
        201: ("p200,t,d,,c,g," + "N" * 10_000_000 + "\n", "csv_record_too_large"),  # 10 MB extra column
        301: ("9" * 5000 + ",t,d,,c,g,n\n", "id_too_long"),
        401: ("p400,t,d,,c" + "C" * 300 + ",g,n\n", "category_too_long"),
        501: ("p500,t,d,,c,g" + "G" * 300 + ",n\n", "group_id_too_long"),
        601: ("q" * 129 + ",t,d,,c,g,n\n", "id_too_long"),
        701: ("p700,t\x00nul,d,,c,g,n\n", "text_nul"),
    }
    for row, (line, _) in bad.items():
        lines[row - 1] = line
    lines[800] = "p800,t,d,,c,g," + "a" * 5000 + "\n"  # an extra column over max_attribute_chars: truncated
    feed = tmp_path / "feed.csv"
    with open(feed, "w", encoding="utf-8") as fh:
        fh.write("\ufeff" + header)  # a BOM before the header
        fh.writelines(lines)

    r = shapstack("--db", db_url, "ingest", str(feed), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    products, rejects = stored(db_url, 1)
    assert rejects[2].code == "csv_record_too_large" and rejects[2].row == 2
    for row, (_, code) in bad.items():
        assert rejects[row].code == code, (row, rejects[row].reason)
    assert set(rejects) == {2, *bad}
    assert len(products) == 20_000 - 1 - len(bad)
    assert products["p0"].label == "cat0" and products["p2"].title == "title 2"  # the row after the broken one
    assert products["p19999"].attributes == {"notes": "n19999"}
    assert len(products["p800"].attributes["notes"]) == 1000
    assert products["p800"].attributes["_truncated"] == ["notes"]
    assert "20000" not in r.stdout or f"{len(products)} products accepted" in r.stdout
    assert f"{len(products)} products accepted, {len(rejects)} rejected" in r.stdout


def test_jsonl_hostile_lines(db_url: str, tmp_path: Path):
    lines = [
        b'\xef\xbb\xbf{"product_id": "bom", "title": "first line after a BOM"}',
        b'{"product_id": "deep", "title": "t", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"product_id": "nested-ok", "title": "t", "x": [[1, 2], {"a": [3]}]}',
        b'{"product_id": ' + b"7" * 5000 + b', "title": "t"}',
        b'{"product_id": "big", "title": "t", "n": ' + b"1" * 30 + b"}",
        b'{"product_id": "nan", "title": "t", "a": NaN, "b": Infinity, "c": -Infinity, "d": 1e999, "e": [NaN]}',
        b'{"product_id": "longcat", "title": "t", "category": "' + b"c" * 257 + b'"}',
        b'{"product_id": "longline", "title": "' + b"x" * 1_200_000 + b'"}',
        b'["not", "an", "object"]',
        b'{"product_id": "listtitle", "title": ["a"]}',
        b'{"product_id": 12345, "title": "a numeric id"}',
        b'{"product_id": "many", "title": "t", ' + b", ".join(b'"k%d": %d' % (i, i) for i in range(100)) + b"}",
        b'{"product_id": "surrogate", "title": "\\ud800"}',
        b'{"product_id": "fine", "title": "the last good row"}',
    ]
    feed = tmp_path / "feed.jsonl"
    feed.write_bytes(b"\n".join(lines) + b"\n")
    run = ingest_feed(connect(db_url), str(feed), Limits())
    products, rejects = stored(db_url, run)
    codes = {row: r.code for row, r in rejects.items()}
    assert codes == {2: "json_too_deep", 4: "json_number_out_of_range", 5: "json_number_out_of_range",
                     7: "category_too_long", 8: "jsonl_line_too_long", 9: "json_not_object", 10: "field_type",
                     13: "text_not_utf8"}
    assert set(products) == {"bom", "nested-ok", "nan", "12345", "many", "fine"}
    assert products["nan"].attributes == {"a": None, "b": None, "c": None, "d": None, "e": [None]}
    assert products["nested-ok"].attributes == {"x": [[1, 2], {"a": [3]}]}
    assert len(products["many"].attributes) == 64 + 1 and products["many"].attributes["_truncated"] == ["_attributes"]


def test_parquet_types_checked_up_front_and_cells_cut(db_url: str, tmp_path: Path):
    """Float ids with nulls become integer text, list and binary columns are not read, and a
    dictionary-encoded 10 MB value repeated in 4,096 rows does not expand in memory."""
    n = 4096
    big = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array(["x" * 10_000_000]))
    table = pa.table({
        "product_id": pa.array([None if i % 7 == 0 else float(12345 + i) for i in range(n - 1)] + [0.5]),
        "title": pa.array([f"title {i}" for i in range(n)]),
        "notes": big,
        "tags": pa.array([["a", "b"]] * n),
        "blob": pa.array([b"\x00\x01"] * n),
    })
    feed = tmp_path / "feed.parquet"
    pq.write_table(table, feed, dictionary_pagesize_limit=64 << 20, row_group_size=n)
    assert feed.stat().st_size < 2_000_000
    run = ingest_feed(connect(db_url), str(feed), Limits())
    products, rejects = stored(db_url, run)
    assert "12346" in products and "12346.0" not in products
    assert products["12346"].attributes == {"notes": "x" * 1000, "_truncated": ["notes"]}
    assert {r.code for r in rejects.values()} == {"id_missing", "product_id_not_integer"}
    assert rejects[n].code == "product_id_not_integer"
    assert len(products) + len(rejects) == n

    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"product_id": ["a"], "title": pa.array([["a list"]])}), wrong)
    with pytest.raises(FeedError, match="column 'title' has type list"):
        list(read_feed(wrong))


def test_parquet_memory_stays_bounded(tmp_path: Path):
    """Reading a 4,096 x 10 MB dictionary-encoded feed (40 GB as plain strings) in a fresh process."""
    big = pa.DictionaryArray.from_arrays(pa.array(np.zeros(4096, np.int32)), pa.array(["x" * 10_000_000]))
    pq.write_table(pa.table({"product_id": [str(i) for i in range(4096)], "description": big}),
                   tmp_path / "f.parquet", dictionary_pagesize_limit=64 << 20)
    code = ("import sys\nfrom pipeline.feed import read_feed\n"
            "n = sum(1 for _ in read_feed(sys.argv[1]))\n"  # VmHWM: this process's peak (ru_maxrss counts the parent's)
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
            "print(n, int(hwm) // 1024)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "f.parquet")], capture_output=True, text=True,
                       cwd=ROOT, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    n, peak_mb = map(int, r.stdout.split())
    assert n == 4096 and peak_mb < 400


def test_images_pipe_symlink_and_swap_after_ingest(db_url: str, tmp_path: Path):
    """A named pipe named like an image does not hang, a link out of the folder is refused, and a
    file swapped for a link to /dev/zero after ingest changes nothing: inference reads the snapshot."""
    folder = tmp_path / "feed"
    (folder / "img").mkdir(parents=True)
    (folder / "img" / "ok.png").write_bytes(png())
    (folder / "img" / "swap.png").write_bytes(png((1, 200, 3)))
    os.mkfifo(folder / "img" / "pipe.jpg")
    (tmp_path / "secret.png").write_bytes(png())
    (folder / "img" / "out.png").symlink_to(tmp_path / "secret.png")
    (folder / "img" / "zero.png").symlink_to("/dev/zero")
    (folder / "img" / "inside.png").symlink_to(folder / "img" / "ok.png")
    (folder / "img" / "fake.png").write_bytes(b"<svg xmlns='http://www.w3.org/2000/svg'/>")
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, "TIFF")
    (folder / "img" / "pic.png").write_bytes(tiff.getvalue())  # a format outside the whitelist
    rows = [("ok", "img/ok.png"), ("pipe", "img/pipe.jpg"), ("out", "img/out.png"), ("zero", "img/zero.png"),
            ("inside", "img/inside.png"), ("fake", "img/fake.png"), ("tiff", "img/pic.png"), ("swap", "img/swap.png"),
            ("dir", "img")]
    feed = folder / "feed.csv"
    feed.write_text("product_id,title,image\n" + "".join(f"{p},T {p},{i}\n" for p, i in rows))
    store = tmp_path / "store"
    done = threading.Event()
    result = {}

    def run():
        result["run"] = ingest_feed(connect(db_url), str(feed), Limits(image_store=str(store)))
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(60), "ingest hung on a named pipe"
    products, rejects = stored(db_url, result["run"])
    codes = {r.raw_id: r.code for r in rejects.values()}
    assert codes == {"pipe": "image_not_regular_file", "out": "image_path_escapes", "zero": "image_path_escapes",
                     "fake": "image_format", "tiff": "image_format", "dir": "image_not_regular_file"}
    assert set(products) == {"ok", "inside", "swap"}
    snap = Path(products["swap"].image)
    assert snap.is_relative_to(store) and products["ok"].image == products["inside"].image

    (folder / "img" / "swap.png").unlink()
    (folder / "img" / "swap.png").symlink_to("/dev/zero")
    assert load_image(str(snap)).getpixel((0, 0)) == (1, 200, 3)

    tok = train_tokenizer(["T ok", "T swap"], 50, min_frequency=1)
    records = [Product(p.product_id, p.title, "", p.image) for p in products.values()]
    enc = encode_products(records, tok, "tiny", workers=1)
    assert enc.has_image.all()
    snap.write_bytes(png((9, 9, 9)))  # the snapshot changed behind our back: an error, not text-only
    with pytest.raises(ImagesUnreadable) as err:
        encode_products(records, tok, "tiny", workers=1)
    assert set(err.value.failures) == {"swap"} and err.value.failures["swap"].code == "image_snapshot_changed"
    snap.unlink()
    with pytest.raises(ImageError, match="not found"):
        load_image(str(snap))


def test_pillow_limits_without_global_state(tmp_path: Path):
    """A decompression bomb is refused by the row's own limit, and Pillow's global limit is untouched."""
    before = Image.MAX_IMAGE_PIXELS
    Image.new("L", (5000, 5000)).save(tmp_path / "bomb.png", optimize=True)
    (tmp_path / "f.csv").write_text("product_id,title,image\nb,T,bomb.png\nk,T,\n")
    items = list(read_feed(tmp_path / "f.csv", Limits(max_image_pixels=10_000_000)))
    assert items[0].code == "image_pixels" and isinstance(items[1], Product)
    assert Image.MAX_IMAGE_PIXELS == before


def test_a_batch_the_database_refuses_is_stored_row_by_row(db_url: str, tmp_path: Path):
    """A row that passed every check of the reader but that the database still refuses becomes a
    reject; the other rows of its batch are stored (here: a limit raised past the column size)."""
    feed = tmp_path / "f.csv"
    feed.write_text("product_id,title\n" + "".join(f"p{i},t\n" for i in range(5)) + "\n")
    items = list(read_feed(feed, Limits()))
    bad = Product("x" * 300, "t", "", None, row=6, content_hash="0" * 64)  # over the 128-character column
    factory = connect(db_url)
    with factory() as s, s.begin():
        run = create_run(s, str(feed), "embedded")
    pks = _store(factory, run, [*items, bad], resume=False)
    products, rejects = stored(db_url, run)
    if db_url.startswith("sqlite"):  # SQLite does not enforce VARCHAR sizes: stored as is
        assert len(pks) == 6 and not rejects
    else:
        assert len(pks) == 5 and rejects[6].code == "db_refused" and "x" * 300 not in rejects[6].reason
    assert {f"p{i}" for i in range(5)} <= set(products)
