"""The load benchmark's cold mode (evaluation/load_test.py, evaluation/cold_queries.py): its
pools of never-sent texts and photos, and a short cold run through ``main`` against a real
``mars serve`` on the IKEA slice."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil

import pytest
from PIL import Image

import evaluation.load_test as load_test
from evaluation.cold_queries import cold_photo_pool, cold_text_pool, text_words, warm_inputs
from workers.local import served_api


def test_cold_text_pool_is_large_distinct_and_new(ikea):
    """Enough distinct texts for 20 clients x 60 s at any plausible rate, none a text to exclude."""
    exclude = ["white 1 section", "Rug, flatwoven for this Bedroom"]
    pool = cold_text_pool(ikea, exclude, seed=0, limit=60 * load_test.MAX_COLD_TEXTS_PER_S)
    assert len(pool) == 60 * load_test.MAX_COLD_TEXTS_PER_S
    words = [text_words(t) for t in pool]
    assert len(set(words)) == len(pool)
    assert not set(words) & {text_words(t) for t in exclude}
    assert "rug flatwoven for this bedroom" == text_words(exclude[1])  # compared by words, not bytes
    assert cold_text_pool(ikea, exclude, seed=0, limit=500) == pool[:500]  # reproducible


def test_cold_photos_differ_from_each_other_and_the_originals(ikea):
    room = sorted((ikea / "rooms").glob("*.jpg"))[0]
    original = "sha256:" + hashlib.sha256(room.read_bytes()).hexdigest()
    photos = cold_photo_pool(ikea, 6, seed=1, exclude_digests=[original])
    assert len({p.digest for p in photos}) == len({p.variant for p in photos}) == 6
    assert original not in {p.digest for p in photos}
    for p in photos[:2]:
        body = json.loads(p.body)
        data = base64.b64decode(body["image_base64"])
        assert "sha256:" + hashlib.sha256(data).hexdigest() == p.digest and body["text"] == p.text
        with Image.open(io.BytesIO(data)) as image, Image.open(ikea / "rooms" / p.room) as source:
            assert image.format == "JPEG" and 0.89 * source.width <= image.width <= source.width


@pytest.mark.slow
def test_cold_mode_sends_only_new_queries(slice_home, ikea, tmp_path, tmp_path_factory, monkeypatch, capsys):
    """2 clients, 1.5 s warm then 1.5 s cold: 0 errors, cold text and cold photo rows beside the
    warm ones, every cold text and photo sent once and never in the warm phase, and a new photo
    costs the server more than a cached one (so the perturbed photos miss its caches)."""
    home = tmp_path / "mars"
    shutil.copytree(slice_home, home)
    # the session's ONNX exports (conftest's real_encoders), so the server does not export again (~15 s)
    for exported in tmp_path_factory.getbasetemp().glob("onnx-cache*/*.onnx"):
        (home / "models").mkdir(exist_ok=True)
        shutil.copy2(exported, home / "models" / exported.name)
    made = []

    def capture(*args, **kwargs):
        made.append(make(*args, **kwargs))
        return made[-1]

    make = load_test.make_cold_pools
    monkeypatch.setattr(load_test, "make_cold_pools", capture)
    bodies = load_test.load_bodies(ikea, False, 2)  # one room photo, one text: a quick warm-up
    assert any("image_base64" in b for b in bodies) and any("image_base64" not in b for b in bodies)
    env = {"MARS_HOME": str(home), "MARS_RATE_LIMIT": "", "MARS_LOG_LEVEL": "WARNING"}
    with served_api(env, tmp_path / "serve.log", "--open") as url:
        load_test.main(["--url", url, "--ikea", str(ikea), "--queries", "2", "--clients", "2", "--seconds", "1.5",
                        "--cold"])
    out, err = capsys.readouterr()
    report = json.loads(out)
    cold, (load,) = report["cold"], made
    assert report["errors"] == 0 and cold["errors"] == 0, (report["first_errors"], cold["first_errors"])
    assert cold["clients"] == {"text": 1, "photo": 1}
    rows = cold["side_by_side"]
    assert list(rows) == ["warm text", "warm photo", "cold text", "cold photo"]
    assert all(row["errors"] == 0 for row in rows.values())
    assert rows["cold text"]["n"] >= 3 and rows["cold photo"]["n"] >= 1
    assert cold["text_only"] == rows["cold text"] and cold["with_room_photo"] == rows["cold photo"]
    for name in rows:
        assert name in err  # the table on stderr

    # every cold request was new: each text and photo once, none sent in the warm phase
    warm_texts, warm_digests = warm_inputs(bodies)
    texts = [text_words(t) for t in load.texts.sent]
    digests = [p.digest for p in load.photos.sent]
    assert len(texts) == rows["cold text"]["n"] and len(digests) == rows["cold photo"]["n"]
    assert len(set(texts)) == len(texts) and not set(texts) & warm_texts
    assert not set(texts) & {text_words(p.text) for p in load.photos.items}
    assert len(set(digests)) == len(digests) and not set(digests) & warm_digests
    assert len({p.variant + (p.room,) for p in load.photos.sent}) == len(digests)
    proof = cold["never_sent_before"]
    assert proof["texts_new"] == proof["texts_sent"] == len(texts)
    assert proof["photos_new"] == proof["photos_sent"] == len(digests)
    # a cached room photo (warm) is answered from the region cache; a new one is encoded
    assert rows["cold photo"]["p50_ms"] > 2 * rows["warm photo"]["p50_ms"]
