"""API tests through FastAPI's TestClient on a real slice (open mode, no rate limit: keys, roles
and limits are tests/test_api_auth.py's)."""

from __future__ import annotations

import base64
import shutil

import pytest
from fastapi.testclient import TestClient

from query.app import create_app


@pytest.fixture(scope="module")
def client(slice_home, encoders, tmp_path_factory):
    """The app on a copy of the session's ingested slice (no slice photo is over 2 Mpx)."""
    from mars.engine import Engine
    from mars.settings import Settings

    home = shutil.copytree(slice_home, tmp_path_factory.mktemp("api") / "mars")
    settings = Settings(home=home, max_image_pixels=2_000_000, api_auth="open", rate_limit="")
    engine = Engine(settings, encoders=encoders)
    with TestClient(create_app(engine=engine)) as c:
        c.engine = engine
        yield c
    engine.close()


def test_health_categories_items(client, ikea_slice):
    health = client.get("/healthz").json()
    n = len(ikea_slice["records"])
    assert health["status"] == "ok" and health["products"] == health["bm25_docs"] == health["vectors"] == n
    cats = client.get("/v1/categories").json()
    assert cats[0]["level"] == "class" and sum(c["products"] for c in cats if c["level"] == "class") == n
    pid = ikea_slice["records"][0]["_id"]
    item = client.get(f"/v1/items/{pid}").json()
    assert item["id"] == pid and len(item["categories"]) == 2
    assert client.get("/v1/items/does-not-exist").status_code == 404
    assert client.get("/openapi.json").status_code == 200 and client.get("/docs").status_code == 200


def test_search_json_and_multipart(client, ikea_slice):
    room = ikea_slice["room"].read_bytes()
    r = client.post("/v1/search", json={"text": "a lamp for this bedroom", "image_base64": base64.b64encode(room).decode()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["lock"]["key"] == "lamp" and body["has_image"] and body["critic"]["status"] == "skipped"
    assert body["items"][0]["provenance"]["fused"]["rank"] == 1
    m = client.post(
        "/v1/search", data={"text": "a lamp for this bedroom", "top_k": "5"}, files={"image": ("room.jpg", room, "image/jpeg")}
    )
    assert m.status_code == 200, m.text
    assert [i["id"] for i in m.json()["items"]] == [i["id"] for i in body["items"]][:5]
    whole_room = client.post("/v1/search", json={"text": "a lamp for reading", "room": "Bedroom", "auto_lock": False})
    assert whole_room.status_code == 200, whole_room.text
    assert not whole_room.json()["lock"]["applied"] and "off" in whole_room.json()["lock"]["reason"]


def test_retrievers_name_the_lists_that_key_weights_and_provenance(client, ikea_slice):
    from query.retrievers import RETRIEVERS

    listed = client.get("/v1/retrievers").json()
    assert [r["name"] for r in listed] == list(RETRIEVERS)
    assert all(r["label"] and r["kind"] in ("lexical", "vector", "prior") and r["needs"] in ("text", "image", "room")
               for r in listed)
    room = base64.b64encode(ikea_slice["room"].read_bytes()).decode()
    body = client.post("/v1/search", json={"text": "a lamp for this bedroom", "image_base64": room,
                                           "weights": {"text": 0}}).json()
    used = [name for name in body["fusion"] if name != "k"]
    assert used == ["bm25", "image"]  # the slice has no aligned vector and no prior; text weighed 0 is not run
    assert set().union(*(i["provenance"]["retrievers"] for i in body["items"])) <= set(used)
    assert all(set(hit) == {"rank", "score"} for i in body["items"] for hit in i["provenance"]["retrievers"].values())


def test_bad_uploads_are_clear_4xx_and_store_nothing(client):
    before = client.get("/healthz").json()
    not_image = client.post("/v1/search", data={"text": "lamp"}, files={"image": ("x.jpg", b"GIF89a-not-really", "image/jpeg")})
    assert not_image.status_code == 422 and "not a readable image" in not_image.json()["detail"]
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.new("RGB", (2000, 1500)).save(buf, "PNG")  # 3 Mpx, over this app's 2 Mpx limit
    huge = client.post("/v1/search", data={"text": "lamp"}, files={"image": ("big.png", buf.getvalue(), "image/png")})
    assert huge.status_code == 422 and "over the limit" in huge.json()["detail"]
    assert client.post("/v1/search", json={"text": "lamp", "image_base64": "%%%"}).status_code == 422
    assert client.post("/v1/search", json={"image_base64": None}).status_code == 422  # nothing to search with
    assert client.post("/v1/search", json={"text": "lamp", "mode": "psychic"}).status_code == 422
    assert client.post("/v1/search", json={"text": "lamp", "unknown": 1}).status_code == 422
    assert client.post("/v1/search", content=b"text", headers={"content-type": "text/plain"}).status_code == 415
    assert client.get("/healthz").json() == before


def test_repeat_photo_is_keyed_on_its_bytes_and_answers_the_same(client, ikea_slice):
    import hashlib

    from ingestion.images import decode_image

    room = ikea_slice["room"].read_bytes()
    body = {"text": "a lamp for this bedroom", "image_base64": base64.b64encode(room).decode()}
    first = client.post("/v1/search", json=body).json()
    assert client.engine.has_region_vectors("sha256:" + hashlib.sha256(room).hexdigest())
    second = client.post("/v1/search", json=body).json()
    assert [(i["id"], i["score"]) for i in second["items"]] == [(i["id"], i["score"]) for i in first["items"]]
    lazy = decode_image(room, max_pixels=10**8, lazy=True)
    assert lazy.convert("RGB").tobytes() == decode_image(room, max_pixels=10**8).tobytes()


def test_importing_the_app_loads_neither_the_engine_nor_a_heavy_library():
    """``query.app`` (and so ``query.deps`` and the routes) imports ``mars.engine`` only in the
    lifespan, and no model or index library at all."""
    import subprocess
    import sys

    heavy = ("mars.engine", "torch", "faiss", "transformers", "sentence_transformers", "qdrant_edge", "tantivy")
    code = f"import sys, query.app; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
