"""PCA whitening of image vectors: the fit, the checkpoint, `mars train whitening` and the
image list comparing whitened room regions with whitened product photos."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from indexing.whitening import Whitening, WhiteningError, WhiteningFile, whitening_path
from query.funnel import SearchQuery
from training.whitening import fit_whitening, judged_photos, room_photos


def _correlated(n=2000, d=6, seed=0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) * np.array([5.0, 3.0, 1.0, 0.5, 0.2, 0.1])
    return rng.normal(size=(n, d)) @ mixing.T + 3.0


def test_full_rank_whitening_without_ridge_gives_identity_covariance():
    x = _correlated()
    white = Whitening.fit(x, "enc", dim=6, eps=0.0)
    z = (x - white.mean) @ white.projection
    np.testing.assert_allclose(np.cov(z, rowvar=False), np.eye(6), atol=1e-3)
    out = white.apply(x[:5])
    assert out.shape == (5, 6) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    kept = Whitening.fit(x, "enc", dim=2, eps=1.0)
    assert kept.projection.shape == (6, 2) and 0.5 < kept.meta["variance_kept"] < 1.0
    # the ridge shrinks the small directions' gain: whitened variance < 1, smaller for smaller eigenvalues
    variances = np.var((x - kept.mean) @ kept.projection, axis=0)
    assert np.all(variances < 1.0) and variances[0] > variances[1]


def test_fit_and_apply_reject_bad_input():
    x = _correlated(n=10)
    with pytest.raises(ValueError, match="dim"):
        Whitening.fit(x, "enc", dim=7)
    with pytest.raises(ValueError, match="at least 2"):
        Whitening.fit(x[:1], "enc", dim=2)
    with pytest.raises(ValueError, match="eps"):
        Whitening.fit(x, "enc", dim=2, eps=-1.0)
    with pytest.raises(ValueError, match="dimension 6"):
        Whitening.fit(x, "enc", dim=2).apply(np.ones((1, 5)))
    with pytest.raises(WhiteningError, match="projection"):
        Whitening(np.zeros(3), np.zeros((4, 2)), "enc")


def test_checkpoint_round_trip_and_the_watched_file(tmp_path):
    white = Whitening.fit(_correlated(), "enc", dim=3, meta={"products": 7})
    path = tmp_path / "index" / "whitening.safetensors"
    white.save(path)
    loaded = Whitening.load(path)
    np.testing.assert_array_equal(loaded.projection, white.projection)
    assert loaded.meta["products"] == 7 and loaded.digest and loaded.image_encoder == "enc"
    assert WhiteningFile(path, "enc")() is not None
    assert WhiteningFile(path, "other-encoder")() is None  # fitted on another encoder: not used
    assert WhiteningFile(tmp_path / "missing.safetensors", "enc")() is None
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(WhiteningError, match="safetensors"):
        Whitening.load(tmp_path / "bad.safetensors")


def _pairs(n=400, d=12, seed=1):
    """Matching (region, product) pairs whose region side carries strong noise in half the
    directions (a 'room' nuisance: clutter, light), plus background vectors of both sides."""
    rng = np.random.default_rng(seed)
    products = rng.normal(size=(n, d))
    nuisance = np.zeros((n, d))
    nuisance[:, : d // 2] = rng.normal(size=(n, d // 2)) * 1.5
    regions = products + nuisance + rng.normal(size=(n, d)) * 0.05
    return regions, products, np.concatenate([regions, products])


def _recall_at_1(white, regions, products):
    scores = white.apply(regions) @ white.apply(products).T
    return float(np.mean(scores.argmax(axis=1) == np.arange(len(regions))))


def test_learned_stage_whitens_what_differs_between_matching_pairs():
    regions, products, background = _pairs()
    pca = Whitening.fit(background, "enc", dim=12, eps=0.1)
    learned = pca.learn(regions[:300], products[:300], background, dim=8, shrink=0.1)
    assert learned.output_dim == 8 and learned.learned_projection.shape == (12, 8) and learned.meta["learned"]["pairs"] == 300
    out = learned.apply(regions[:3])
    assert out.shape == (3, 8) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # on pairs it was not fitted on, the learned stage matches regions to their products better
    held_out = _recall_at_1(pca, regions[300:], products[300:]), _recall_at_1(learned, regions[300:], products[300:])
    assert held_out[1] >= 0.95 and held_out[1] > held_out[0] + 0.1, held_out


def test_learned_stage_rejects_bad_input_and_round_trips(tmp_path):
    regions, products, background = _pairs(n=40)
    pca = Whitening.fit(background, "enc", dim=12)
    with pytest.raises(ValueError, match="pairs"):
        pca.learn(regions[:1], products[:1], background)
    with pytest.raises(ValueError, match="pairs"):
        pca.learn(regions[:5], products[:4], background)
    with pytest.raises(ValueError, match="dim"):
        pca.learn(regions, products, background, dim=13)
    with pytest.raises(ValueError, match="shrink"):
        pca.learn(regions, products, background, dim=4, shrink=1.5)
    with pytest.raises(ValueError, match="singular"):
        pca.learn(regions[:3], products[:3], background, dim=4, shrink=0.0)  # 3 pairs cannot span 12 dims
    with pytest.raises(WhiteningError, match="both"):
        Whitening(pca.mean, pca.projection, "enc", learned_mean=np.zeros(12))
    learned = pca.learn(regions, products, background, dim=4, shrink=0.5)
    path = tmp_path / "whitening.safetensors"
    learned.save(path)
    loaded = Whitening.load(path)
    np.testing.assert_allclose(loaded.apply(regions[:5]), learned.apply(regions[:5]), atol=1e-6)
    assert loaded.output_dim == 4 and loaded.meta["learned"]["shrink"] == 0.5


def test_fitted_whitening_changes_the_image_list_to_whitened_scores(make_engine, ikea_slice, slice_home, tmp_path):
    home = shutil.copytree(slice_home, tmp_path / "mars")
    engine = make_engine(home)
    rooms = tmp_path / "rooms"
    rooms.mkdir()
    shutil.copy(ikea_slice["room"], rooms / "room.jpg")
    (rooms / "notes.txt").write_text("not a photo")
    query = SearchQuery(text="a rug for this bedroom", image=_room(ikea_slice), mode="vector", weights={"text": 0.0})
    raw = engine.search(query)

    white = fit_whitening(engine, room_photos(rooms), dim=64, region_step=3)
    n_regions = len(engine.funnel.query_vectors.region_vectors(_room(ikea_slice)))
    assert white.meta["room_photos"] == 1 and white.meta["regions"] == len(range(0, n_regions, 3))
    assert white.meta["products"] == sum(1 for r in ikea_slice["records"] if r["image"])
    engine.install_whitening(white)
    assert whitening_path(home).exists() and engine.artifacts.whitening() is not None

    whitened = engine.search(query)  # the cached raw image list is not reused
    store = engine.search_store()
    regions = white.apply(engine.funnel.query_vectors.region_vectors(_room(ikea_slice)))
    points = store.fetch([item.id for item in whitened.items])
    expected = {pid: float((regions @ white.apply(p.vectors["image"])[0]).max()) for pid, p in points.items()}
    assert [i.provenance.retrievers["image"].score for i in whitened.items] == pytest.approx([expected[i.id] for i in whitened.items], abs=1e-4)
    assert [i.provenance.retrievers["image"].score for i in whitened.items] != [i.provenance.retrievers["image"].score for i in raw.items]

    # the critic's pairs carry the whitened room regions and product image vectors
    pairs = engine.funnel.critic_pairs(query, engine.funnel.retrieve(query).fused[:3], engine.funnel.products(list(points)[:3]))
    assert pairs and pairs[0].room_regions.shape == regions.shape
    np.testing.assert_allclose(pairs[0].room_regions, regions, atol=1e-5)


def test_learned_stage_from_judged_room_queries_on_the_real_slice(make_engine, ikea_slice, slice_home, tmp_path):
    from evaluation.beir import load_queries

    home = shutil.copytree(slice_home, tmp_path / "mars")
    engine = make_engine(home)
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({**q, "image": str(ikea_slice["room"]) if q["image"] else None}) + "\n"
                               for q in ikea_slice["queries"]))
    judged = judged_photos(load_queries(queries), ikea_slice["qrels"])
    assert list(judged) == [ikea_slice["room"].resolve()] and judged[ikea_slice["room"].resolve()] == ikea_slice["room_products"]
    rooms = tmp_path / "rooms"
    rooms.mkdir()
    shutil.copy(ikea_slice["room"], rooms / "room.jpg")
    white = fit_whitening(engine, room_photos(rooms), judged=judged, dim=48, learned_dim=16, shrink=0.5, region_step=3)
    with_photo = sum(1 for r in ikea_slice["records"] if r["image"] and r["_id"] in ikea_slice["room_products"])
    assert white.meta["learned"] == {"pairs": with_photo, "dim": 16, "shrink": 0.5, "judged_photos": 1,
                                     "photos": [ikea_slice["room"].name]}
    engine.install_whitening(white)
    query = SearchQuery(text="a rug for this bedroom", image=_room(ikea_slice), mode="vector", weights={"text": 0.0})
    result = engine.search(query)
    regions = white.apply(engine.funnel.query_vectors.region_vectors(_room(ikea_slice)))
    assert regions.shape[1] == 16
    points = engine.search_store().fetch([item.id for item in result.items])
    expected = {pid: float((regions @ white.apply(p.vectors["image"])[0]).max()) for pid, p in points.items()}
    assert [i.provenance.retrievers["image"].score for i in result.items] == pytest.approx([expected[i.id] for i in result.items], abs=1e-4)
    with pytest.raises(RuntimeError, match="fewer than 2"):
        fit_whitening(engine, room_photos(rooms), judged={ikea_slice["room"]: {"not-a-product"}})


def test_whitening_refuses_an_empty_index_a_foreign_fit_and_a_folder_without_photos(make_engine, tmp_path):
    engine = make_engine(tmp_path / "empty")
    with pytest.raises(RuntimeError, match="mars ingest"):
        fit_whitening(engine, [])
    with pytest.raises(ValueError, match="fitted on"):
        engine.install_whitening(Whitening.fit(_correlated(), "other-encoder", dim=2))
    (tmp_path / "rooms").mkdir()
    with pytest.raises(FileNotFoundError, match="no room photos"):
        room_photos(tmp_path / "rooms")
    with pytest.raises(FileNotFoundError, match="no rooms folder"):
        room_photos(tmp_path / "missing")


def test_cli_reports_a_clear_error_for_a_missing_rooms_folder(tmp_path, monkeypatch):
    from mars.cli import app

    monkeypatch.setenv("MARS_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(app, ["train", "whitening", "--rooms", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "no rooms folder" in result.output
    result = CliRunner().invoke(app, ["train", "whitening", "--rooms", str(tmp_path), "--queries", str(tmp_path / "q.jsonl")])
    assert result.exit_code == 2 and "go together" in result.output


def _room(ikea_slice):
    from ingestion.images import decode_image, read_image_bytes

    return decode_image(read_image_bytes(ikea_slice["room"], max_bytes=10**8), max_pixels=10**8)
