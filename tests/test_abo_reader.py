"""The ABO listings reader on the schema-built fixture in tests/fixtures/abo, and its ingest
through the real pipeline (local images, and URL images served from a loopback server)."""

from __future__ import annotations

import functools
import gzip
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sqlalchemy import select

from catalog.models import Product, ProductCategory, RejectionRow
from ingestion.abo import (
    AboSchemaError,
    find_images_csv,
    format_dimensions,
    humanise_product_type,
    is_abo_source,
    listing_to_data,
    node_leaf,
    pick_language,
    read_abo,
    read_image_index,
)
from ingestion.readers import open_source, parse_mapping

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "abo"
LISTINGS = FIXTURE / "listings" / "metadata" / "listings_0.json.gz"
SMALL = FIXTURE / "images" / "small"


def _by_line(records):
    return {r.position: r for r in records}


def test_fixture_is_small():
    total = sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file() and p.suffix != ".py")
    assert total < 50_000


def test_fixture_listings_map_to_mars_fields():
    rows = _by_line(read_abo(FIXTURE))
    assert sorted(rows) == list(range(1, 9)) and {r.source for r in rows.values()} == {str(LISTINGS)}
    chair = rows[1].data
    assert chair == {
        "id": "B0CHAIR001",
        "title": "Rivet upholstered accent chair, grey",
        "type": "Chair",
        "colour": "Slate Grey",
        "text": "A compact accent chair with a padded seat.\nSeat height 18 inches\nSolid beech legs",
        "size": "L 26 x W 24 x H 31.5 inches",
        "image": str(SMALL / "3f" / "3f9a0c12.jpg"),
        "attributes": chair["attributes"],
    }
    attrs = chair["attributes"]
    assert attrs["brand"] == "Rivet" and attrs["material"] == "Polyester" and attrs["style"] == "Modern"
    assert attrs["node_path"] == "/Categories/Furniture/Living Room Furniture/Chairs" and attrs["node_id"] == 1069412
    assert attrs["keywords"] == ["accent chair", "armchair"]  # en_US only, deduplicated
    assert attrs["colour_standardized"] == ["Grey"] and attrs["product_type"] == "CHAIR"
    assert attrs["main_image_id"] == "71chairMnL" and attrs["other_image_ids"] == ["81chairSdL"]
    assert attrs["model_number"] == "RV-100" and attrs["color_code"] == ["#708090"] and attrs["title_language"] == "en_US"
    assert attrs["item_weight"][0]["unit"] == "pounds"

    sofa, lamp, rug, table, shelf = (rows[i].data for i in range(2, 7))
    assert (sofa["title"], sofa["colour"], sofa["attributes"]["title_language"]) == ("Two-seater velvet sofa", "Green", "en_GB")
    assert lamp["title"] == "Tischleuchte aus Messing" and lamp["attributes"]["title_language"] == "de_DE"
    assert lamp["type"] == "Table Lamps" and lamp["attributes"]["material"] == "Messing"  # node leaf, no product_type
    assert rug["image"] is None and "main_image_id" not in rug["attributes"]
    assert table["type"] == "Home furniture and decor" and table["image"] is None
    assert table["attributes"]["image_note"] == "main image 71notInCsvL is not listed in images.csv"
    assert shelf["image"] == str(SMALL / "ee" / "ee0b5f66.jpg") and not Path(shelf["image"]).exists()
    assert rows[7].data is None and rows[7].error.startswith("invalid JSON: Unterminated string")
    assert "id" not in rows[8].data and rows[8].data["title"] == "Nameless stool"


def test_preferred_language_applies_to_every_multilingual_field():
    chair = next(read_abo(LISTINGS, language="de_DE")).data
    assert chair["title"] == "Rivet Sessel mit Polster, Grau" and chair["colour"] == "Schiefergrau"
    # chosen per field: no German description, so the en_US one; the German bullet point
    assert chair["text"] == "A compact accent chair with a padded seat.\nSitzhöhe 46 cm"
    assert chair["attributes"]["colour_standardized"] == ["Grau"] and chair["attributes"]["keywords"] == ["sessel"]


def test_images_base_url_gives_urls():
    rows = _by_line(read_abo(LISTINGS, images_base_url="https://cdn.example/abo/small/"))
    assert rows[1].data["image"] == "https://cdn.example/abo/small/3f/3f9a0c12.jpg"
    assert rows[4].data["image"] is None


def test_helpers():
    assert humanise_product_type("CHAIR") == "Chair"
    assert humanise_product_type("HOME_FURNITURE_AND_DECOR") == "Home furniture and decor"
    assert humanise_product_type(" ") == ""
    assert node_leaf("/Categories/Furniture/Chairs/") == "Chairs" and node_leaf("") == ""
    entries = [{"language_tag": "fr_FR", "value": "a"}, {"language_tag": "en_CA", "value": "b"}, {"language_tag": "en_CA", "value": "c"}]
    assert pick_language(entries, "en_US") == ("en_CA", ["b", "c"])
    assert pick_language(entries, "fr_FR") == ("fr_FR", ["a"])
    assert pick_language(entries[:1], "en_US") == ("fr_FR", ["a"])
    assert pick_language(None, "en_US") == (None, []) and pick_language([], "en_US") == (None, [])
    with pytest.raises(AboSchemaError, match="item_name: expected a list"):
        pick_language("Chair", "en_US", "item_name")
    dims = {k: {"unit": "cm", "value": v} for k, v in (("length", 50), ("width", 40.5), ("height", 90))}
    assert format_dimensions(dims) == "L 50 x W 40.5 x H 90 cm"
    dims["height"]["unit"] = "inches"
    assert format_dimensions(dims) == "L 50 cm x W 40.5 cm x H 90 inches"
    assert format_dimensions({"length": {"value": 1}}) == "" and format_dimensions(None) == ""
    assert read_image_index(FIXTURE / "images" / "metadata" / "images.csv.gz")["71sofaMnL"] == "5c/5c7e1d20.jpg"
    assert find_images_csv(LISTINGS) == FIXTURE / "images" / "metadata" / "images.csv.gz"


def test_image_path_must_stay_under_the_images_root(tmp_path):
    row = {"item_id": "A", "main_image_id": "x"}
    ok = listing_to_data(row, image_paths={"x": "ab/x.jpg"}, images_root=tmp_path)
    assert ok["image"] == str(tmp_path.resolve() / "ab" / "x.jpg")
    escaped = listing_to_data(row, image_paths={"x": "../../etc/passwd"}, images_root=tmp_path)
    assert escaped["image"] is None and escaped["attributes"]["image_note"].endswith("outside the images root")


def test_plain_json_bad_lines_and_schema_errors(tmp_path):
    lines = [
        json.dumps({"item_id": "A1", "item_name": [{"language_tag": "en_US", "value": "Stool"}], "main_image_id": "x"}).encode(),
        b"[1, 2]",
        json.dumps({"item_id": "A2", "item_name": "Stool"}).encode(),
        json.dumps({"item_id": "A3", "node": [{"node_id": 1, "node_name": "/Categories/Decor/Vases"}], "brand": [{"value": "B"}]}).encode(),
        b"\xff\xfe not utf-8",
        b"",
        json.dumps({"item_id": 42, "item_name": [{"language_tag": "en_US", "value": "Numeric id"}]}).encode(),
    ]
    path = tmp_path / "catalog.json"  # not named listings_*: recognised by its first record
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert is_abo_source(path)
    rows = _by_line(open_source(path))
    assert sorted(rows) == [1, 2, 3, 4, 5, 7]
    assert rows[1].data["image"] is None
    assert rows[1].data["attributes"]["image_note"] == "main image x not resolved: no images.csv given or found"
    assert rows[2].error == "a record must be a JSON object"
    assert rows[3].error.startswith("item A2: item_name: expected a list of {language_tag, value} objects")
    assert rows[3].raw == {"item_id": "A2", "item_name": "Stool"}
    assert rows[4].data == {"id": "A3", "type": "Vases", "image": None, "attributes": {"node_path": "/Categories/Decor/Vases", "node_id": 1, "brand": "B"}}
    assert rows[5].error.startswith("invalid UTF-8")
    assert rows[7].data["id"] == 42  # passed through: validation rejects it with its reason

    gz = tmp_path / "listings_1.json.gz"
    gz.write_bytes(gzip.compress(lines[0] + b"\n"))
    assert [r.data["id"] for r in read_abo(gz)] == ["A1"]


def test_a_field_mapping_is_refused_for_abo_listings(tmp_path):
    sniffed = tmp_path / "catalog.json"  # recognised by its first record, not its name
    sniffed.write_text(json.dumps({"item_id": "A1", "item_name": [{"language_tag": "en_US", "value": "Stool"}]}) + "\n")
    for path in (FIXTURE, LISTINGS.parent, LISTINGS, sniffed):
        with pytest.raises(ValueError, match=r"^--map does not apply to ABO listings: their fields are read by name; ") as err:
            open_source(path, parse_mapping(["title=item_name"]))
        assert "\n" not in str(err.value) and "title=item_name" in str(err.value)
    assert len(list(open_source(FIXTURE, {}))) == len(list(open_source(FIXTURE))) == 8  # no --map: an empty mapping


def test_detection_dispatch_and_errors(tmp_path):
    assert is_abo_source(FIXTURE) and is_abo_source(LISTINGS.parent) and is_abo_source(LISTINGS)
    assert len(list(open_source(FIXTURE))) == 8
    (tmp_path / "items.jsonl").write_text(json.dumps({"item_id": "1", "item_name": []}) + "\n")
    (tmp_path / "other.json").write_text(json.dumps({"id": "1", "title": "x"}) + "\n")
    assert not is_abo_source(tmp_path / "items.jsonl") and not is_abo_source(tmp_path / "other.json")
    assert not is_abo_source(tmp_path) and not is_abo_source(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="unsupported"):
        open_source(tmp_path / "other.json")
    with pytest.raises(FileNotFoundError):
        read_abo(tmp_path / "missing.json.gz")
    with pytest.raises(FileNotFoundError, match="no listings"):
        read_abo(tmp_path)
    with pytest.raises(FileNotFoundError, match="images.csv"):
        read_abo(LISTINGS, images_csv=tmp_path / "images.csv")
    bad_csv = tmp_path / "images.csv"
    bad_csv.write_text("image_id,height,width\nx,1,1\n")
    with pytest.raises(ValueError, match="lacks path"):
        read_abo(LISTINGS, images_csv=bad_csv)


# --- through the real pipeline (real encoders, shared by the session) -----------------------


def _reasons(report) -> dict[int, str]:
    return {r.position: r.reason for r in report.rejections}


@pytest.mark.slow
def test_ingest_abo_fixture_end_to_end(make_engine):
    from query.funnel import SearchQuery

    engine = make_engine()
    report = engine.ingest(open_source(FIXTURE), "abo")
    assert (report.total, report.ingested, report.rejected, report.without_image) == (8, 5, 3, 2)
    reasons = _reasons(report)
    assert reasons[6].startswith("image file") and reasons[6].endswith("ee0b5f66.jpg does not exist")
    assert reasons[7].startswith("invalid JSON") and reasons[8] == "id: Field required"
    assert "B0RUG00004: no image; indexed by text" in report.warnings
    assert "B0TABL0005: no image; indexed by text" in report.warnings
    with engine.sessions() as s:
        chair = s.get(Product, "B0CHAIR001")
        assert chair.type == "Chair" and chair.colour == "Slate Grey" and chair.size == "L 26 x W 24 x H 31.5 inches"
        assert chair.attributes["brand"] == "Rivet" and chair.attributes["keywords"] == ["accent chair", "armchair"]
        assert chair.attributes["node_path"].endswith("/Chairs")
        assert s.get(Product, "B0TABL0005").attributes["image_note"].startswith("main image 71notInCsvL")
        assert s.execute(select(ProductCategory).where(ProductCategory.product_id == "B0CHAIR001")).first() is not None
        stored = {(r.position, r.record_id) for r in s.execute(select(RejectionRow)).scalars()}
        assert stored == {(6, "B0SHLF0006"), (7, None), (8, None)}
    points = engine.vector_store().fetch(["B0CHAIR001", "B0RUG00004"])
    assert "image" in points["B0CHAIR001"].vectors and "image" not in points["B0RUG00004"].vectors
    hits = engine.search(SearchQuery(text="velvet sofa", mode="bm25", top_k=3))
    assert hits.items[0].id == "B0SOFA0002"


@pytest.fixture
def image_server():
    """Serves tests/fixtures/abo/images/small over http on 127.0.0.1 (a missing file is a 404)."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(SMALL)))
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.mark.slow
def test_url_images_are_fetched_and_a_failed_fetch_is_indexed_by_text(make_engine, image_server, tmp_path):
    engine = make_engine(home=tmp_path / "url-home", image_fetch_timeout_s=2, image_fetch_retries=1)
    report = engine.ingest(read_abo(FIXTURE, images_base_url=image_server + "/"), "abo-urls")
    again = engine.ingest(read_abo(FIXTURE, images_base_url=image_server + "/"), "abo-urls")
    assert (report.total, report.ingested, report.rejected, report.without_image) == (8, 6, 2, 3)
    assert sorted(_reasons(report)) == [7, 8]
    shelf_url = f"{image_server}/ee/ee0b5f66.jpg"
    assert f"B0SHLF0006: HTTP 404 from {shelf_url}; indexed by text" in report.warnings
    with engine.sessions() as s:
        assert s.get(Product, "B0SHLF0006").image == shelf_url
        assert s.get(Product, "B0CHAIR001").image == f"{image_server}/3f/3f9a0c12.jpg"
    points = engine.vector_store().fetch(["B0CHAIR001", "B0SHLF0006"])
    assert "image" in points["B0CHAIR001"].vectors and "image" not in points["B0SHLF0006"].vectors
    # a second run fetches again, finds the same bytes (and the same 404), and re-embeds nothing
    assert (again.ingested, again.unchanged, again.rejected) == (0, 6, 2)
