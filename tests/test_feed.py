"""Feed parsing: every unusable row becomes a reject with a reason and the rest of the feed goes on."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.feed import FeedError, read_feed
from pipeline.records import Limits, Product, Reject

HEADER = ["product_id", "title", "description", "image", "category", "group_id", "brand"]


@pytest.fixture
def feed_dir(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "img" / "ok.jpg")
    (tmp_path / "img" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.new("L", (5000, 5000)).save(tmp_path / "img" / "bomb.png", optimize=True)  # tiny file, 25 MP
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, "JPEG")
    (tmp_path / "img" / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (tmp_path.parent / "outside.jpg").write_bytes((tmp_path / "img" / "ok.jpg").read_bytes())
    return tmp_path


def write_csv(path: Path, rows: list[list[str]], raw_lines: dict[int, bytes] | None = None) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(HEADER)
    for row in rows:
        w.writerow(row)
    lines = buf.getvalue().encode().splitlines(keepends=True)
    for index, raw in (raw_lines or {}).items():
        lines.insert(index, raw)
    path.write_bytes(b"".join(lines))
    return path


def parse(path: Path, **limits) -> dict[str, Product | Reject]:
    out = {}
    for item in read_feed(path, Limits(**limits)):
        key = item.product_id if isinstance(item, Product) else f"row{item.row}"
        out[key] = item
    return out


def reason(items, row: int) -> str:
    item = items[f"row{row}"]
    assert isinstance(item, Reject), item
    return item.reason


def test_every_bad_row_is_rejected_with_a_reason_and_the_rest_goes_on(feed_dir: Path):
    rows = [
        ["p1", "Red shirt", "Cotton", "img/ok.jpg", "Shirts", "g1", "acme"],  # row 1 fine
        ["", "No id", "", "img/ok.jpg", "", "", ""],  # 2 missing id
        ["x" * 200, "Long id", "", "", "", "", ""],  # 3 over-long id
        ["p1", "Duplicate", "", "", "", "", ""],  # 4 duplicate id
        ["p5", "", "", "", "", "", ""],  # 5 nothing usable
        ["p6", "Corrupt", "", "img/corrupt.jpg", "", "", ""],  # 6 corrupt image
        ["p7", "Bomb", "", "img/bomb.png", "", "", ""],  # 7 decompression bomb
        ["p8", "Escape", "", "../outside.jpg", "", "", ""],  # 8 escapes the folder
        ["p9", "Absolute", "", str(feed_dir / "img" / "ok.jpg"), "", "", ""],  # 9 absolute path
        ["p10", "Url", "", "https://example.com/a.jpg", "", "", ""],  # 10 URL not allowed
        ["p11", "Nul\x00byte", "", "", "", "", ""],  # 11 NUL byte
        ["p12", "Missing file", "", "img/nope.jpg", "", "", ""],  # 12 image not found
        ["p13", "Truncated", "", "img/truncated.jpg", "", "", ""],  # 13 truncated image
        ["p14", "", "", "img/ok.jpg", "", "", ""],  # 14 image only: accepted
        ["p15", "Text only", "", "", "Shirts", "", ""],  # 15 text only: accepted
        ["p16", "T" * 50, "D" * 50, "", "", "", ""],  # 16 truncated text, accepted
    ]
    bad_bytes = b"p17,Caf\xe9 latin-1,desc,,,,\n"  # row 17: undecodable
    short = b"p18,too,few\n"  # row 18: wrong column count
    path = write_csv(feed_dir / "feed.csv", rows, {17: bad_bytes, 18: short})
    rows.append(["p19", "After the bad rows", "", "img/ok.jpg", "", "", ""])
    with open(path, "a", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerow(rows[-1])

    items = parse(path, max_image_pixels=10_000_000, max_title_chars=20, max_description_chars=30)
    assert reason(items, 2) == "missing product_id"
    assert "longer than" in reason(items, 3)
    assert "duplicate" in reason(items, 4)
    assert "nothing usable" in reason(items, 5)
    assert "corrupt" in reason(items, 6)
    assert "pixels" in reason(items, 7) or "bomb" in reason(items, 7)
    assert "escapes" in reason(items, 8)
    assert "absolute" in reason(items, 9)
    assert "URL not allowed" in reason(items, 10)
    assert "NUL" in reason(items, 11)
    assert "not found" in reason(items, 12)
    assert "corrupt" in reason(items, 13)
    assert "undecodable" in reason(items, 17)
    assert "malformed" in reason(items, 18)

    p1 = items["p1"]
    assert p1.label == "Shirts" and p1.group_id == "g1" and p1.attributes == {"brand": "acme"}
    assert p1.image == str((feed_dir / "img" / "ok.jpg").resolve())
    assert items["p14"].has_image and not items["p14"].has_text
    assert items["p15"].has_text and not items["p15"].has_image
    p16 = items["p16"]
    assert len(p16.title) == 20 and len(p16.description) == 30
    assert p16.attributes["_truncated"] == ["title", "description"]
    assert items["p19"].has_image  # the feed went on after the bad rows
    assert len(items) == 19


def test_urls_need_the_setting(feed_dir: Path):
    path = write_csv(feed_dir / "feed.csv", [["u1", "T", "", "http://127.0.0.1:9/x.jpg", "", "", ""]])
    [item] = read_feed(path, Limits(allow_image_urls=True, verify_images=False))
    assert isinstance(item, Product) and item.image == "http://127.0.0.1:9/x.jpg"
    [item] = read_feed(path, Limits(allow_image_urls=True, url_timeout_s=2))
    assert isinstance(item, Reject) and item.code == "url_not_global"
    [item] = read_feed(path, Limits(allow_image_urls=True, url_timeout_s=2, url_allow_networks=("127.0.0.0/8",)))
    assert isinstance(item, Reject) and item.code == "url_unreadable" and "could not be fetched" in item.reason


def test_jsonl_and_parquet_give_the_same_products(feed_dir: Path):
    records = [
        {"product_id": "a", "title": "Shirt", "description": "cotton", "image": "img/ok.jpg", "category": "S"},
        {"product_id": "b", "title": "", "description": "only words", "image": None, "category": "T"},
    ]
    jsonl = feed_dir / "feed.jsonl"
    jsonl.write_bytes(
        b"\n".join(json.dumps(r).encode() for r in records) + b"\n{broken json\n" + b'"not an object"\n'
    )
    parquet = feed_dir / "feed.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    j = list(read_feed(jsonl))
    p = list(read_feed(parquet))
    assert [x.product_id for x in j[:2]] == ["a", "b"] == [x.product_id for x in p]
    assert j[0].content_hash == p[0].content_hash and j[0].image == p[0].image
    assert [r.reason.split(":")[0] for r in j[2:]] == ["malformed row", "malformed row"]


def test_whole_feed_errors(tmp_path: Path):
    with pytest.raises(FeedError, match="not found"):
        list(read_feed(tmp_path / "missing.csv"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(FeedError, match="unknown feed format"):
        list(read_feed(tmp_path / "f.txt"))
    (tmp_path / "noid.csv").write_text("title,image\na,b\n")
    with pytest.raises(FeedError, match="no product_id column"):
        list(read_feed(tmp_path / "noid.csv"))


def test_reading_is_lazy(tmp_path: Path):
    """The first product is available before the rest of the file is read: memory stays bounded."""
    path = tmp_path / "big.csv"
    with open(path, "w") as fh:
        fh.write("product_id,title\n")
        for i in range(50_000):
            fh.write(f"p{i},title {i}\n")
    it = read_feed(path, Limits(verify_images=False))
    first = next(it)
    assert first.product_id == "p0"
    assert sum(1 for _ in it) == 49_999
