"""`mars train align`: LiT-style heads over the frozen offline encoders, the ``aligned`` named
vector, and the funnel's ``aligned`` list — on a real slice of the IKEA catalog."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from indexing.aligned import AlignHeads, AlignHeadsError, AlignHeadsFile, heads_path
from ingestion.readers import open_source
from query.funnel import SearchQuery
from training.align import AlignConfig, AlignData, fit_heads, train_align, validation_metrics, view_texts

SMALL = AlignConfig(dim=32, hidden=64, epochs=40, batch_size=32, lr=3e-3, holdout=0.2, seed=0)


def _synthetic(n_keys: int = 12, per_key: int = 4, seed: int = 0) -> AlignData:
    """Images and texts generated from a shared latent key, so a text can find its images."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n_keys, 8))
    to_image, to_text = rng.normal(size=(8, 20)), rng.normal(size=(8, 12))
    ids, images, views, texts, keys = [], [], [], [], []
    for k in range(n_keys):
        for j in range(per_key):
            ids.append(f"p{k}-{j}")
            images.append(latent[k] @ to_image + 0.1 * rng.normal(size=20))
            views.append(np.stack([latent[k] @ to_text + 0.05 * rng.normal(size=12) for _ in range(2)]))
            texts.append([f"key {k}", f"key {k} item {j}"])
            keys.append((f"type{k}", "white"))
    return AlignData(ids, np.asarray(images, np.float32), np.asarray(views, np.float32), texts, keys)


def test_view_texts_use_the_products_own_fields():
    assert view_texts("EKTORP", "Sofa", "Lofallet beige") == [
        "Lofallet beige Sofa", "EKTORP Sofa", "Sofa", "Lofallet beige EKTORP Sofa"]
    assert view_texts("", "Rug", "") == ["Rug", "Rug", "Rug", "Rug"]


def test_heads_learn_the_shared_key_and_numpy_inference_matches_torch(tmp_path):
    data = _synthetic()
    config = AlignConfig(dim=16, hidden=32, epochs=60, batch_size=16, lr=5e-3, seed=0)
    held = list(range(0, len(data.ids), 4))  # one product of each key
    untrained, *_ = fit_heads(data, range(len(data.ids)), AlignConfig(dim=16, hidden=32, epochs=1, lr=1e-9), ("img", "txt"))
    heads, loss, scale, bias = fit_heads(data, range(len(data.ids)), config, ("img", "txt"))
    before, after = validation_metrics(untrained, data, held), validation_metrics(heads, data, held)
    assert after["mrr@10"] > before["mrr@10"] + 0.5, (before, after)
    assert after["recall@5"] >= 0.9
    assert scale != pytest.approx(10.0) and bias != pytest.approx(-10.0)  # logit scale and bias are learned

    # the numpy heads equal the torch module they came from (tanh-GELU on both sides)
    t = heads.tensors
    mlp = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(32, 16))
    mlp.load_state_dict({k.removeprefix("image."): torch.from_numpy(v) for k, v in t.items() if k.startswith("image.")})
    expected = torch.nn.functional.normalize(mlp(torch.from_numpy(data.images)), dim=-1).detach().numpy()
    np.testing.assert_allclose(heads.image(data.images), expected, atol=1e-5)

    path = tmp_path / "aligned.safetensors"
    heads.save(path)
    loaded = AlignHeads.load(path)
    assert loaded.dim == 16 and loaded.digest and loaded.meta["logit_scale"] == pytest.approx(scale)
    np.testing.assert_allclose(loaded.text(data.views[:, 0]), heads.text(data.views[:, 0]), atol=1e-6)
    with pytest.raises(ValueError, match="dimension 12"):
        loaded.text(np.zeros((1, 5), np.float32))


def test_heads_file_ignores_bad_and_foreign_checkpoints(tmp_path):
    path = tmp_path / "aligned.safetensors"
    watch = AlignHeadsFile(path, "img", "txt")
    assert watch() is None  # no file yet
    path.write_bytes(b"not safetensors")
    assert watch() is None
    with pytest.raises(AlignHeadsError):
        AlignHeads.load(path)
    heads, *_ = fit_heads(_synthetic(), range(8), AlignConfig(dim=8, hidden=8, epochs=1), ("other-img", "txt"))
    heads.save(path)
    assert watch() is None  # trained on another image encoder
    heads.image_encoder = "img"
    heads.save(path)
    assert watch() is not None


def test_train_align_installs_the_aligned_vector_and_the_funnel_searches_it(make_engine, ikea, ikea_slice, slice_home,
                                                                            tmp_path):
    home = shutil.copytree(slice_home, tmp_path / "home")  # the session's ingested slice
    engine = make_engine(home)
    n_points = engine.vector_store().count()
    before = engine.search(SearchQuery(text="white lamp", mode="vector"))
    assert "aligned" not in {name for name in ("bm25", "image", "text", "aligned") if name in before.fusion}

    report = train_align(engine, SMALL)
    assert report.products == n_points - sum(1 for r in ikea_slice["records"] if not r["image"])
    assert report.points == n_points and report.held_out > 0
    assert set(report.validation) >= {"recall@1", "recall@5", "recall@10", "mrr@10"}
    store = engine.vector_store()
    assert store.dims["aligned"] == 32 and store.count() == n_points
    assert json.loads((home / "index" / "manifest.json").read_text())["dims"]["aligned"] == 32
    assert heads_path(home).exists()

    # every product with a photo has the image head's output as its aligned vector
    heads = engine.artifacts.aligned()
    with_photo = [r["_id"] for r in ikea_slice["records"] if r["image"]][:5]
    for pid, point in store.fetch(with_photo).items():
        np.testing.assert_allclose(point.vectors["aligned"], heads.image(point.vectors["image"])[0], atol=1e-5)
    no_photo = [r["_id"] for r in ikea_slice["records"] if not r["image"]]
    assert all("aligned" not in p.vectors for p in store.fetch(no_photo).values())

    # a text query gets the aligned list: text head on the query's MiniLM vector, within the lock
    response = engine.search(SearchQuery(text="white lamp", mode="vector", weights={"text": 0.0}))
    assert response.fusion["aligned"] == engine.settings.weights_text["aligned"] > 0
    assert response.items and all(item.provenance.retrievers.get("aligned") is not None for item in response.items)
    q = heads.text(engine.funnel.query_vectors.text_vector("white lamp"))
    scored = {pid: float(q[0] @ p.vectors["aligned"]) for pid, p in store.fetch([i.id for i in response.items]).items()}
    assert [i.provenance.retrievers["aligned"].score for i in response.items] == pytest.approx([scored[i.id] for i in response.items], abs=1e-4)

    # a product ingested after alignment gets its aligned vector at ingest
    record = dict(next(r for r in ikea_slice["records"] if r["image"]), _id="new.item.01", title="NEWLAMP")
    record["image"] = str(ikea / record["image"])
    (tmp_path / "corpus.jsonl").write_text(json.dumps(record) + "\n")
    assert engine.ingest(open_source(tmp_path / "corpus.jsonl"), source="new").ingested == 1
    new_point = engine.vector_store().fetch(["new.item.01"])["new.item.01"]
    np.testing.assert_allclose(new_point.vectors["aligned"], heads.image(new_point.vectors["image"])[0], atol=1e-5)
    engine.close()

    # the collection and the heads survive a restart
    again = make_engine(home)
    assert again.vector_store().dims["aligned"] == 32
    assert again.search(SearchQuery(text="white lamp", mode="vector")).fusion.get("aligned") is not None


def test_install_refuses_heads_of_other_encoders(make_engine, ikea_slice, tmp_path):
    engine = make_engine(tmp_path / "h2")
    heads, *_ = fit_heads(_synthetic(), range(8), AlignConfig(dim=8, hidden=8, epochs=1), (engine.settings.image_encoder, "other-text"))
    with pytest.raises(ValueError, match="encoders"):
        engine.install_aligned(heads)
    heads.text_encoder = engine.settings.text_encoder
    with pytest.raises(RuntimeError, match="mars ingest"):
        engine.install_aligned(heads)
