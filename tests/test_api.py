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


# ---------------------------------------------------------------- the critic line and the absent stages (issue 18)

def test_the_critic_line_is_for_mode_full_only_and_in_plain_words(client):
    """No critic is trained on the slice (the learned critic is the default): hybrid answers
    carry a bare "skipped"; full says in plain words how to set the critic up, with no path."""
    from mars.wiring import CRITIC_NOT_SET_UP

    hybrid = client.post("/v1/search", json={"text": "a lamp for this bedroom"}).json()
    assert hybrid["critic"] == {"backend": "none", "status": "skipped", "scored": 0, "detail": "", "result_url": None}
    full = client.post("/v1/search", json={"text": "a lamp for this bedroom", "mode": "full"}).json()
    assert full["critic"] == {"backend": "none", "status": "not configured", "scored": 0, "detail": CRITIC_NOT_SET_UP,
                              "result_url": None}
    assert CRITIC_NOT_SET_UP == "The critic is not set up: run `mars setup` on a folder with judged rooms to train it."
    assert [i["id"] for i in full["items"]] == [i["id"] for i in hybrid["items"]]  # the fused order stands
    health = client.get("/healthz").json()
    assert health["critic"] == "none" and health["critic_note"] == CRITIC_NOT_SET_UP
    assert str(client.engine.home) not in str(full["critic"]) + health["critic_note"]
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert "skipped" in schema["CriticStatus"]["description"] and "mode=full" in schema["CriticStatus"]["description"]
    assert set(schema["Stages"]["properties"]) == {"aligned", "whitening", "prior", "critic", "absent"}


def test_stages_name_what_an_untrained_home_lacks_and_what_trained_pieces_fill(client, ikea_slice, slice_home,
                                                                             make_engine, tmp_path):
    import numpy as np

    from indexing.staging_prior import StagingPrior
    from indexing.whitening import Whitening
    from query.funnel import ABSENT_NOTES

    room = base64.b64encode(ikea_slice["room"].read_bytes()).decode()
    photo = {"text": "a lamp for this bedroom", "image_base64": room, "room": "Bedroom", "auto_lock": False}
    words = {"text": "a cosy corner to read", "room": "Bedroom", "top_k": 100}
    untrained = client.post("/v1/search", json=photo).json()
    assert untrained["stages"] == {  # the prior weighs 0 with a photo (MARS_WEIGHTS_PHOTO): not missed there
        "aligned": "absent", "whitening": "absent", "prior": "absent", "critic": "absent",
        "absent": [ABSENT_NOTES["aligned"], ABSENT_NOTES["whitening"]],
    }
    assert untrained["items"]  # the untrained stages still search
    assert client.post("/v1/search", json=words).json()["stages"]["absent"] == [ABSENT_NOTES["aligned"], ABSENT_NOTES["prior"]]
    # Only the stages a query would use: its mode, its inputs, its weights.
    assert client.post("/v1/search", json={"text": "a lamp"}).json()["stages"]["absent"] == [ABSENT_NOTES["aligned"]]
    assert client.post("/v1/search", json={**words, "mode": "bm25"}).json()["stages"]["absent"] == []
    assert client.post("/v1/search", json={**words, "weights": {"aligned": 0, "prior": 0}}).json()["stages"]["absent"] == []
    assert client.post("/v1/search", json={"image_base64": room, "mode": "vector"}).json()["stages"]["absent"] == \
        [ABSENT_NOTES["whitening"]]

    # A home with a PCA whitening and a staging prior: those notes go, the learned calibration's comes.
    engine = make_engine(shutil.copytree(slice_home, tmp_path / "mars"), api_auth="open", rate_limit="")
    rng = np.random.default_rng(0)
    dims = engine.search_store().dims["image"]
    background = rng.standard_normal((64, dims)).astype(np.float32)
    pca = Whitening.fit(background, engine.settings.image_encoder, dim=16)
    engine.install_whitening(pca)
    engine.install_prior(StagingPrior.fit([("bedroom-1", "Bedroom", sorted(ikea_slice["room_products"]))]))
    with TestClient(create_app(engine=engine)) as trained:
        partly = trained.post("/v1/search", json=photo).json()
        assert partly["stages"] == {"aligned": "absent", "whitening": "PCA", "prior": "trained", "critic": "absent",
                                    "absent": [ABSENT_NOTES["aligned"], ABSENT_NOTES["learned"]]}
        by_room = trained.post("/v1/search", json=words).json()
        assert by_room["stages"]["absent"] == [ABSENT_NOTES["aligned"]]
        assert any("prior" in i["provenance"]["retrievers"] for i in by_room["items"])
        pairs = rng.standard_normal((2, 32, dims)).astype(np.float32)
        engine.install_whitening(pca.learn(pairs[0], pairs[1], background, dim=8))
        learned = trained.post("/v1/search", json=photo).json()["stages"]
        assert (learned["whitening"], learned["absent"]) == ("PCA + learned", [ABSENT_NOTES["aligned"]])


def test_the_critic_note_names_no_path_nor_endpoint(tmp_path):
    """mars/wiring.py: critic_note turns the registry's operator notes into plain words."""
    from types import SimpleNamespace

    from mars.settings import Settings
    from mars.wiring import CRITIC_NOT_SET_UP, CRITIC_SWITCHED_OFF, critic_note

    def note(built, **settings) -> str:
        return critic_note(Settings(home=tmp_path, _env_file=None, **settings), built, f"operator note {tmp_path}")

    assert note(None, critic="learned") == CRITIC_NOT_SET_UP
    assert note(None, critic="none") == CRITIC_SWITCHED_OFF
    learned = SimpleNamespace(name="learned", meta={"pairs": 1234})
    assert note(learned, critic="learned") == "learned critic, trained on 1234 pairs from judged rooms"
    assert note(SimpleNamespace(name="qwen2-vl"), critic="vlm", critic_model=str(tmp_path),
                critic_adapter=tmp_path / "lora") == "Qwen2-VL critic with a fine-tuned adapter"
    assert note(SimpleNamespace(name="openai"), critic="openai", critic_endpoint="http://10.0.0.7:8000/v1",
                critic_api_model="qwen-vl") == "OpenAI-compatible critic (qwen-vl)"
