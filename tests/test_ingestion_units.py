from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from ingestion.images import InvalidImage, decode_image, read_image_bytes
from ingestion.pipeline import IngestReport, IngestTargets, Prepared, Rejection, embed, prepare, record_rejections
from ingestion.raw_records import RawRecord
from ingestion.readers import open_source, parse_mapping, read_jsonl
from ingestion.records import ProductRecord, content_hash
from pydantic import ValidationError


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), "white").save(buf, "PNG")
    return buf.getvalue()


def test_record_validation():
    ok = ProductRecord.model_validate({"id": "1", "title": " A ", "type": "Chair"})
    assert ok.title == "A" and ok.image is None
    for bad in ({"title": "no id"}, {"id": ""}, {"id": 5}, {"id": "1", "title": 3}, {"id": "a/b"}, {"id": "1", "x": 1},
                {"id": "1", "text": "nul\x00byte"}, {"id": "1", "image": "http://x/" + "a" * 2048}):
        with pytest.raises(ValidationError):
            ProductRecord.model_validate(bad)


def test_content_hash_tracks_fields_and_image_bytes():
    r = ProductRecord(id="1", title="A")
    assert content_hash(r, b"x") == content_hash(ProductRecord(id="1", title="A"), b"x")
    assert content_hash(r, b"x") != content_hash(r, b"y")
    assert content_hash(r, None) != content_hash(ProductRecord(id="1", title="B"), None)


def test_image_limits(tmp_path):
    assert decode_image(_png(10, 10), max_pixels=100).size == (10, 10)
    with pytest.raises(InvalidImage, match="over the limit"):
        decode_image(_png(20, 20), max_pixels=399)
    with pytest.raises(InvalidImage, match="not a readable image"):
        decode_image(b"this is text, not a picture", max_pixels=10**6)
    with pytest.raises(InvalidImage, match="not a readable image"):
        decode_image(_png(50, 50)[:60], max_pixels=10**6)  # truncated
    with pytest.raises(InvalidImage, match="does not exist"):
        read_image_bytes(tmp_path / "missing.jpg", max_bytes=10)
    (tmp_path / "big.bin").write_bytes(b"0" * 100)
    with pytest.raises(InvalidImage, match="bytes, over the limit"):
        read_image_bytes(tmp_path / "big.bin", max_bytes=99)


def test_readers_jsonl_csv_and_beir(tmp_path):
    (tmp_path / "img.png").write_bytes(_png(4, 4))
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text(json.dumps({"sku": "1", "name": "A", "img": "img.png", "brand": "X"}) + "\n{not json\n[1]\n")
    rows = list(open_source(jsonl, parse_mapping(["id=sku", "title=name", "image=img"])))
    assert rows[0].data == {"id": "1", "title": "A", "image": str(tmp_path / "img.png"), "attributes": {"brand": "X"}}
    assert rows[1].error.startswith("invalid JSON") and rows[1].position == 2
    assert rows[2].error == "a record must be a JSON object"

    csv_path = tmp_path / "items.csv"
    csv_path.write_text("id,title,color\n7,Lamp,white\n8,,\n")
    rows = list(open_source(csv_path, parse_mapping(["colour=color"])))
    assert rows[0].data == {"id": "7", "title": "Lamp", "colour": "white"} and rows[1].data == {"id": "8"}

    beir = tmp_path / "beir"
    beir.mkdir()
    (beir / "corpus.jsonl").write_text(json.dumps({"_id": "9", "title": "T", "color": "red", "image": None}) + "\n")
    assert list(open_source(beir))[0].data == {"id": "9", "title": "T", "colour": "red", "image": None}


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_source(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="corpus.jsonl"):
        open_source(tmp_path)
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(ValueError, match="unsupported"):
        open_source(tmp_path / "x.xml")
    for bad in (["id"], ["nofield=x"], ["id="]):
        with pytest.raises(ValueError):
            parse_mapping(bad)


def test_jsonl_bad_lines_become_rejectable_records_and_reading_goes_on(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"id": "1"}\n\xff\xfe broken\n[1, 2]\n{nope\n\n{"id": "2"}\n')
    records = list(read_jsonl(path))
    assert [r.position for r in records] == [1, 2, 3, 4, 6]
    assert [r.data["id"] for r in records if r.data] == ["1", "2"]
    errors = [r.error for r in records if r.error]
    assert errors[0].startswith("invalid UTF-8") and "JSON object" in errors[1] and errors[2].startswith("invalid JSON")


def _no_stores(max_bytes: int = 10**6) -> IngestTargets:
    """Targets for the stages that touch no store: every store and encoder callable fails if called."""

    def unused():
        raise AssertionError("a store or encoder was opened")

    return IngestTargets(sessions=unused, lexical=None, vectors=unused, existing_vectors=unused, encoders=unused,
                         max_image_pixels=10**6, max_image_bytes=max_bytes)


class _AddOnlySession:
    def __init__(self):
        self.added = []

    def add(self, row):
        self.added.append(row)


def test_one_rejection_value_carries_the_raw_record_through_the_stages_storage_and_report(tmp_path):
    src = "s.jsonl"
    records = [
        RawRecord(src, 1, None, raw="{bad", error="invalid JSON: Expecting value"),
        RawRecord(src, 2, {"id": "a", "title": 3}, raw={"id": "a", "title": 3}),
        RawRecord(src, 3, {"id": "b"}, raw={"id": "b"}),
        RawRecord(src, 4, {"id": "b", "title": "again"}, raw={"id": "b", "title": "again"}),
        RawRecord(src, 5, {"id": "c", "image": str(tmp_path / "missing.jpg")}, raw={"id": "c"}),
    ]
    prepared, rejected = prepare(records, _no_stores(), {})
    assert [p.record.id for p in prepared] == ["b"]
    assert all(isinstance(r, Rejection) for r in rejected)
    assert [(r.raw, r.position, r.record_id) for r in rejected] == [
        (records[0], 1, None), (records[1], 2, "a"), (records[3], 4, "b"), (records[4], 5, "c")]
    reasons = [r.reason for r in rejected]
    assert reasons[0] == "invalid JSON: Expecting value" and reasons[1].startswith("title: ")
    assert reasons[2] == "duplicate id 'b' (first at record 3)" and "does not exist" in reasons[3]

    (tmp_path / "bad.png").write_bytes(b"not a picture")
    bad = RawRecord(src, 6, {"id": "d", "image": str(tmp_path / "bad.png")}, raw={"id": "d"})
    (todo,), _ = prepare([bad], _no_stores(), {})
    assert isinstance(todo, Prepared) and todo.image_bytes == b"not a picture"
    assert embed([todo], _no_stores(), rejected) == ([], [])  # nothing left: the encoders are not loaded
    assert rejected[-1].raw is bad and rejected[-1].record_id == "d" and "not a readable image" in rejected[-1].reason

    session = _AddOnlySession()
    record_rejections(session, 7, rejected)
    stored = [(row.job_id, row.source, row.position, row.record_id, row.reason, row.raw) for row in session.added]
    assert stored == [(7, src, r.position, r.record_id, r.reason, r.raw.raw) for r in rejected]
    assert stored[0][5] == "{bad" and stored[1][5] == {"id": "a", "title": 3}

    summary = IngestReport(job_id=7, source=src, rejected=len(rejected), rejections=rejected).as_dict()
    assert summary["rejections"][:2] == [{"position": 1, "record_id": None, "reason": "invalid JSON: Expecting value"},
                                         {"position": 2, "record_id": "a", "reason": reasons[1]}]
    assert json.loads(json.dumps(summary)) == summary  # JSON-ready: the raw input is left out
