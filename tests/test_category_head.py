"""The category head: metrics by hand, the stratified split, training on a real IKEA slice's
stored image vectors, the checkpoint, suggestions for items ingested without a type, the CLI
and its errors."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from catalog.category_head import ATTRIBUTE, CategoryHead, CategoryHeadError, CategoryHeadFile, category_head_path
from catalog.models import Product
from ingestion.pipeline import Embedded, suggest_categories
from ingestion.readers import open_source
from ingestion.records import ProductRecord
from mars.engine import Engine
from mars.settings import Settings
from training.category_head import (
    LabelledVectors,
    collect,
    macro_f1,
    stratified_split,
    top_k_accuracy,
    train,
)


@pytest.fixture(scope="module")
def slice_home(slice_home, encoders, tmp_path_factory):
    """A copy of the session's ingested IKEA slice (tests/conftest.py; closed again: tests copy
    it before writing) and its collected image vectors."""
    home = shutil.copytree(slice_home, tmp_path_factory.mktemp("category-head") / "mars")
    with Engine(Settings(home=home), encoders=encoders) as engine:
        data = collect(engine)
    return {"home": home, "data": data}


def _cli(args, home, monkeypatch):
    from mars.cli import app
    from mars.settings import get_settings

    monkeypatch.setenv("MARS_HOME", str(home))
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        get_settings.cache_clear()


def test_metrics_by_hand():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4], [0.1, 0.3, 0.6]])
    y = np.array([0, 1, 2, 0])  # rows 0, 1 right at top-1; row 2's class is 2nd; row 3's is 3rd
    assert top_k_accuracy(scores, y, 1) == pytest.approx(0.5)
    assert top_k_accuracy(scores, y, 2) == pytest.approx(0.75)
    assert top_k_accuracy(scores, y, 5) == 1.0  # k >= classes: every row
    pred = scores.argmax(1)  # [0, 1, 0, 2]
    # class 0: TP 1, predicted 2, support 2 -> F1 0.5; class 1: F1 1; class 2: TP 0 -> 0
    assert macro_f1(pred, y) == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert macro_f1(np.array([3, 3]), np.array([0, 0])) == 0.0  # only an absent class predicted
    assert top_k_accuracy(scores[:0], y[:0], 1) == 0.0 and macro_f1(pred[:0], y[:0]) == 0.0


def test_stratified_split_holds_out_every_class_and_is_deterministic():
    labels = ["a"] * 10 + ["b"] * 2 + ["c"]
    train_idx, test_idx = stratified_split(labels, 0.2, seed=3)
    assert sorted([*train_idx, *test_idx]) == list(range(13)) and not set(train_idx) & set(test_idx)
    held = [labels[i] for i in test_idx]
    assert held.count("a") == 2 and held.count("b") == 1 and "c" not in held  # a class of one stays in training
    again = stratified_split(labels, 0.2, seed=3)
    assert (again[0] == train_idx).all() and (again[1] == test_idx).all()
    assert len(stratified_split(labels, 0.0)[1]) == 0
    with pytest.raises(ValueError, match="holdout"):
        stratified_split(labels, 1.0)


def test_train_on_real_slice_gives_metrics_and_a_checkpoint_that_round_trips(slice_home, tmp_path):
    data = slice_home["data"]
    assert data.x.shape == (len(data.ids), 1280) and data.x.dtype == np.float32
    assert np.allclose(np.linalg.norm(data.x, axis=1), 1.0, atol=1e-4)
    head, report = train(data, holdout=0.3, seed=0)
    m = report["held_out_metrics"]
    assert m["n"] == report["held_out"] > 0 and report["train"] + report["held_out"] == report["products"]
    for name in ("top1", "top5", "macro_f1"):
        assert 0.0 <= m[name] <= 1.0
    assert m["top5"] >= m["top1"]
    assert report["classes"] == len(head.classes) >= 2 and head.weight.shape == (len(head.classes), 1280)
    assert report["steps"]["held_out_fit"] > 0 and report["steps"]["final_fit"] > 0
    assert head.meta["held_out_metrics"] == m and head.meta["products"] == report["products"]

    path = tmp_path / "head.safetensors"
    head.save(path)
    loaded = CategoryHead.load(path)
    assert loaded.classes == head.classes and loaded.image_encoder == "efficientnet-lite0-gem"
    assert np.array_equal(loaded.weight, head.weight) and np.array_equal(loaded.bias, head.bias)
    assert loaded.meta == head.meta and loaded.digest and len(loaded.digest) == 12
    p = loaded.probabilities(data.x[:4])
    assert p.shape == (4, len(head.classes)) and np.allclose(p.sum(1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="dimension 1280"):
        loaded.probabilities(np.zeros((1, 384), np.float32))


def test_clear_errors(slice_home, tmp_path, monkeypatch):
    empty = LabelledVectors([], np.zeros((0, 1280), np.float32), [], "efficientnet-lite0")
    with pytest.raises(ValueError, match="no products with an image vector and a class"):
        train(empty)
    data = slice_home["data"]
    one = LabelledVectors(data.ids[:3], data.x[:3], ["lamp"] * 3, data.image_encoder)
    with pytest.raises(ValueError, match="at least 2 classes"):
        train(one)
    with pytest.raises(ValueError, match="at least 2 classes"):
        train(data, min_class_size=10_000)
    with pytest.raises(FileNotFoundError):
        CategoryHead.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CategoryHeadError, match="not a safetensors file"):
        CategoryHead.load(tmp_path / "junk.safetensors")
    result = _cli(["train", "category-head"], tmp_path / "fresh", monkeypatch)
    assert result.exit_code == 2 and "nothing is indexed" in result.output


def test_cli_trains_and_writes_the_default_checkpoint(slice_home, tmp_path, monkeypatch):
    home = tmp_path / "mars"
    shutil.copytree(slice_home["home"], home)
    result = _cli(["train", "category-head", "--holdout", "0.3", "--json"], home, monkeypatch)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    path = category_head_path(Settings(home=home))
    assert report["checkpoint"] == str(path) and path == home / "category_head.safetensors" and path.exists()
    assert CategoryHead.load(path).meta["held_out_metrics"] == report["held_out_metrics"]


def test_item_without_type_gets_a_suggested_category(slice_home, ikea_slice, ikea, encoders, tmp_path):
    home = tmp_path / "mars"
    shutil.copytree(slice_home["home"], home)
    data = slice_home["data"]
    head, _ = train(data, holdout=0.0)
    head.save(category_head_path(Settings(home=home)))
    known = next(r for r in ikea_slice["records"] if r["image"] and r["_id"] in data.ids
                 and data.labels[data.ids.index(r["_id"])] in head.classes)
    image = str(ikea / known["image"])  # the slice's records keep the catalog's relative paths
    untyped = {"id": "untyped-1", "title": known["title"], "text": known["text"], "image": image}
    typed = {"id": "typed-1", "title": known["title"], "type": known["type"], "image": image}
    source = tmp_path / "new.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in (untyped, typed)))
    with Engine(Settings(home=home), encoders=encoders) as engine:
        report = engine.ingest(open_source(source), "new")
        again = engine.ingest(open_source(source), "new")
        with engine.sessions() as session:
            products = {p.id: p for p in session.execute(select(Product).where(Product.id.in_(["untyped-1", "typed-1"]))).scalars()}
    assert report.ingested == 2 and again.unchanged == 2  # the suggestion does not change the content hash
    untyped_row, typed_row = products["untyped-1"], products["typed-1"]
    assert untyped_row.categories == [] and untyped_row.type == ""  # stored as before: no category
    suggestion = untyped_row.attributes[ATTRIBUTE]
    assert suggestion["key"] in head.classes and suggestion["key"] == suggestion["top"][0]["key"]
    assert len(suggestion["top"]) == min(3, len(head.classes)) and suggestion["head"] == CategoryHead.load(
        category_head_path(Settings(home=home))).digest
    probs = [t["probability"] for t in suggestion["top"]]
    assert probs == sorted(probs, reverse=True) and 0.0 < sum(probs) <= 1.0 + 1e-3
    true_class = data.labels[data.ids.index(known["_id"])]
    assert true_class in [t["key"] for t in suggestion["top"]]  # the same photo it was trained on
    assert ATTRIBUTE not in typed_row.attributes and typed_row.categories
    lines = [w for w in report.warnings if "suggests" in w]
    assert len(lines) == 1 and lines[0].startswith(f"untyped-1: no type; category head suggests {suggestion['key']} (")


def test_suggestions_from_plain_vectors_and_only_for_untyped_items_with_a_photo():
    head = CategoryHead(np.array([[4.0, 0.0], [0.0, 4.0], [0.0, 0.0]]), np.zeros(3), ["lamp", "rug", "sofa"], "enc")
    x = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    p = head.probabilities(x)
    first, second = head.suggest(x)
    assert first == {"key": "lamp", "probability": round(float(p[0, 0]), 4), "head": None,
                     "top": [{"key": "lamp", "probability": round(float(p[0, 0]), 4)},
                             {"key": "rug", "probability": round(float(p[0, 1]), 4)},  # tied with sofa: by key
                             {"key": "sofa", "probability": round(float(p[0, 2]), 4)}]}
    assert second["key"] == "rug" and [t["key"] for t in second["top"]] == ["rug", "lamp", "sofa"]
    assert [t["key"] for t in head.suggest(x[0], k=1)[0]["top"]] == ["lamp"]  # one (dim,) vector
    with pytest.raises(ValueError, match="dimension 2"):
        head.suggest(np.zeros((1, 3), np.float32))

    text = np.zeros(4, np.float32)
    items = [
        Embedded(ProductRecord(id="u1", title="Lamp", attributes={"brand": "B"}), "h1", {"text": text, "image": x[0]}, 1),
        Embedded(ProductRecord(id="t1", type="Rug"), "h2", {"text": text, "image": x[1]}, 2),
        Embedded(ProductRecord(id="u2", title="No photo"), "h3", {"text": text}, 3),
    ]
    assert suggest_categories(items, None) == [] and all(ATTRIBUTE not in it.record.attributes for it in items)
    warnings = suggest_categories(items, head)
    assert warnings == [f"u1: no type; category head suggests lamp ({p[0, 0]:.2f}), rug ({p[0, 1]:.2f}), "
                        f"sofa ({p[0, 2]:.2f}) (attributes.{ATTRIBUTE}; not applied)"]
    assert items[0].record.attributes == {"brand": "B", ATTRIBUTE: first} and items[0].hash == "h1"
    assert ATTRIBUTE not in items[1].record.attributes and ATTRIBUTE not in items[2].record.attributes


def test_head_file_is_reread_and_refuses_another_encoder(tmp_path):
    path = tmp_path / "head.safetensors"
    loader = CategoryHeadFile(path, "efficientnet-lite0")
    assert loader() is None  # no file: no suggestions
    rng = np.random.default_rng(0)
    CategoryHead(rng.normal(size=(2, 4)), np.zeros(2), ["lamp", "rug"], "efficientnet-lite0").save(path)
    first = loader()
    assert first is not None and first.classes == ["lamp", "rug"] and loader() is first  # cached
    CategoryHead(rng.normal(size=(3, 4)), np.zeros(3), ["lamp", "rug", "sofa"], "efficientnet-lite0").save(path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert loader().classes == ["lamp", "rug", "sofa"]  # a retrained head is picked up
    assert CategoryHeadFile(path, "hf:/models/siglip")() is None  # trained on other vectors: not used
    with pytest.raises(CategoryHeadError, match="disagree"):
        CategoryHead(np.zeros((2, 4)), np.zeros(3), ["a", "b"], "x")
