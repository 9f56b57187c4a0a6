"""The console's server side without a browser: the static files, the ``/`` redirect and
``GET /v1/items/{id}/image`` (tests/test_console_browser.py drives the console itself)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from catalog.models import Product
from ingestion.readers import open_source
from query.app import create_app


@pytest.fixture(scope="module")
def client(encoders, ikea, tmp_path_factory):
    from mars.engine import Engine
    from mars.settings import Settings

    tmp_path = tmp_path_factory.mktemp("console-api")
    photos = sorted((ikea / "images").glob("*.jpg"))[:1]
    png, gone, swapped = tmp_path / "red.png", tmp_path / "gone.png", tmp_path / "swapped.png"
    for path in (png, gone, swapped):
        Image.new("RGB", (40, 30), "red").save(path)
    records = [
        {"id": "jpeg", "title": "Oak chair", "type": "Chair", "image": str(photos[0])},
        {"id": "png", "title": "Red stool", "type": "Stool", "image": str(png)},
        {"id": "text-only", "title": "Blue rug", "type": "Rug"},
        {"id": "gone", "title": "Gone lamp", "type": "Lamp", "image": str(gone)},
        {"id": "swapped", "title": "Swapped lamp", "type": "Lamp", "image": str(swapped)},
    ]
    corpus = tmp_path / "items.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    engine = Engine(Settings(home=tmp_path / "mars", api_auth="open"), encoders=encoders)
    report = engine.ingest(open_source(corpus), "console")
    assert report.ingested == len(records)
    gone.unlink()
    swapped.write_text("not an image any more")
    with engine.sessions() as session:
        session.add(Product(id="remote", title="Remote", text="", type="Lamp", colour="", size="",
                            image="https://images.example/remote.jpg", attributes={}, content_hash="x"))
        session.commit()
    with TestClient(create_app(engine=engine), follow_redirects=False) as c:
        c.photo = photos[0]
        yield c
    engine.close()


def test_item_image_serves_the_catalogued_file_with_its_type(client):
    jpeg = client.get("/v1/items/jpeg/image")
    assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
    assert jpeg.content == client.photo.read_bytes()
    etag = jpeg.headers["etag"]
    assert client.get("/v1/items/jpeg/image", headers={"If-None-Match": etag}).status_code == 304
    png = client.get("/v1/items/png/image")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content.startswith(b"\x89PNG")
    remote = client.get("/v1/items/remote/image")
    assert remote.status_code == 307 and remote.headers["location"] == "https://images.example/remote.jpg"


@pytest.mark.parametrize(("item", "why"), [("nope", "no item"), ("text-only", "has no photo"),
                                           ("gone", "does not exist"), ("swapped", "not a readable image")])
def test_item_image_is_404_with_the_reason(client, item, why):
    r = client.get(f"/v1/items/{item}/image")
    assert r.status_code == 404 and why in r.json()["detail"]


def test_console_is_served_at_the_root_with_its_own_files_only(client):
    root = client.get("/")
    assert root.status_code == 307 and root.headers["location"] == "/console/"
    page = client.get("/console/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    html = page.text
    assert 'src="app.js"' in html and 'href="app.css"' in html
    assert "http://" not in html and "https://" not in html  # no CDN, nothing external
    for name, kind in (("app.js", "javascript"), ("app.css", "text/css")):
        r = client.get(f"/console/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
        assert "https://" not in r.text and "http://" not in r.text
    assert client.get("/console/../catalog.db").status_code == 404
    assert "/v1/items/{item_id}/image" in client.get("/openapi.json").json()["paths"]
