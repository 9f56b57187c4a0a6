"""ONNX Runtime as the encoders' runtime: the exported EfficientNet-Lite0 agrees with PyTorch eager
on real IKEA photos, and its cached export is rebuilt when its key changes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import indexing.efficientnet as efficientnet
from indexing.efficientnet import GEM_REGION_SIDE, EfficientNetLite0Encoder
from indexing.encoders import EncoderConfigError
import indexing.onnx_runtime as onnx_runtime
from indexing.onnx_runtime import cached_export, export_key

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def torch_encoder():
    return EfficientNetLite0Encoder(runtime="torch", threads=1)


def test_onnx_and_pytorch_agree_on_real_ikea_photos(ikea, ikea_slice, torch_encoder, tmp_path):
    onnx = EfficientNetLite0Encoder(runtime="onnx", cache_dir=tmp_path, threads=1)
    room = Image.open(ikea_slice["room"]).convert("RGB")
    a, b = onnx.feature_map(room, GEM_REGION_SIDE), torch_encoder.feature_map(room, GEM_REGION_SIDE)
    assert a.shape == b.shape == (1280, GEM_REGION_SIDE // 32, round(room.width * GEM_REGION_SIDE / room.height / 32))
    assert float(np.abs(a - b).max()) <= 1e-3
    photos = [Image.open(ikea / r["image"]) for r in ikea_slice["records"][:12] if r["image"]]
    va, vb = onnx.encode_images(photos), torch_encoder.encode_images(photos)
    assert va.shape == vb.shape == (len(photos), 1280) and float(np.abs(va - vb).max()) <= 1e-3
    assert (np.einsum("ij,ij->i", va, vb) > 0.9999).all()  # the same directions, photo by photo


def test_the_export_is_cached_and_rebuilt_when_its_key_changes(tmp_path, monkeypatch):
    first = EfficientNetLite0Encoder(runtime="onnx", cache_dir=tmp_path, threads=1)
    path = first._trunk.path
    assert path.parent == tmp_path and path.name.startswith("efficientnet-lite0-") and path.suffix == ".onnx"
    stamp = path.stat().st_mtime_ns
    again = EfficientNetLite0Encoder(runtime="onnx", cache_dir=tmp_path, threads=1)
    assert again._trunk.path == path and path.stat().st_mtime_ns == stamp  # loaded, not exported again

    monkeypatch.setattr(efficientnet, "EXPORT", {**efficientnet.EXPORT, "graph": "efficientnet-lite0.v2"})  # other export settings
    other = EfficientNetLite0Encoder(runtime="onnx", cache_dir=tmp_path, threads=1)
    assert other._trunk.path != path and other._trunk.path.exists() and path.exists()
    room = Image.new("RGB", (96, 64), (200, 120, 40))
    np.testing.assert_allclose(other.feature_map(room, 64), first.feature_map(room, 64), atol=1e-5)


def test_the_key_follows_the_weights_and_a_failed_export_leaves_nothing(tmp_path, monkeypatch):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"weights v1")
    key = export_key(weights, {"opset": 17})
    assert key == export_key(weights, {"opset": 17}) and key != export_key(weights, {"opset": 18})
    monkeypatch.setattr(onnx_runtime, "OPSET", onnx_runtime.OPSET + 1)  # the module's own opset is in the key too
    assert export_key(weights, {"opset": 17}) != key
    monkeypatch.undo()
    weights.write_bytes(b"weights v2, another size")
    assert export_key(weights, {"opset": 17}) != key

    def broken(path):  # noqa: ANN001, ANN202 - an exporter that dies half-way
        path.write_bytes(b"half a model")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError, match="exporter crashed"):
        cached_export("model", key, tmp_path / "cache", broken)
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
    made = cached_export("model", key, tmp_path / "cache", lambda path: path.write_bytes(b"a model"))
    assert made.read_bytes() == b"a model" and made.name == f"model-{key}.onnx"


def test_an_unknown_runtime_is_a_clear_error():
    with pytest.raises(EncoderConfigError, match="unknown encoder runtime 'tensorrt': use onnx or torch"):
        EfficientNetLite0Encoder(runtime="tensorrt")


def test_the_text_encoder_on_onnx_agrees_with_sentence_transformers(ikea_slice, tmp_path):
    from indexing.sentence_encoder import SentenceTransformerEncoder

    onnx = SentenceTransformerEncoder(runtime="onnx", cache_dir=tmp_path, threads=1)
    torch = SentenceTransformerEncoder(runtime="torch")
    assert onnx.name == torch.name == "all-minilm-l6-v2" and onnx.dim == torch.dim == 384
    texts = [q["text"] for q in ikea_slice["queries"] if q.get("text")][:40]
    texts += [". ".join(p for p in (r["type"], r.get("color"), r["title"], r["text"]) if p) for r in ikea_slice["records"][:40]]
    a, b = onnx.encode_texts(texts), torch.encode_texts(texts)
    assert a.shape == b.shape == (len(texts), 384) and float(np.abs(a - b).max()) <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-6)
    assert onnx.encode_texts([]).shape == (0, 384)
    assert len(list(tmp_path.glob("text-*.onnx"))) == 1  # exported once, beside nothing else


def test_a_query_text_runs_on_the_int8_copy_and_catalog_texts_stay_fp32(ikea_slice, tmp_path):
    from indexing.sentence_encoder import SentenceTransformerEncoder

    encoder = SentenceTransformerEncoder(runtime="onnx", cache_dir=tmp_path, threads=2)
    texts = [q["text"] for q in ikea_slice["queries"] if q.get("text")][:12]
    batch = encoder.encode_texts(texts)
    one_by_one = np.vstack([encoder.encode_texts([t]) for t in texts])  # a single catalog text: fp32 too
    assert float(np.abs(one_by_one - batch).max()) <= 1e-5
    assert encoder._onnx._single is None and len(list(tmp_path.glob("text-*.onnx"))) == 1  # no query model yet

    queries = np.vstack([encoder.encode_query(t) for t in texts])
    model = encoder._onnx._single
    assert model is not None and model.threads == 1 and "-int8-" in model.path.name and model.path.parent == tmp_path
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-5)
    cosine = (queries * batch).sum(axis=1)
    assert cosine.min() >= 0.98 and not np.allclose(queries, batch, atol=1e-5)  # close, and really the int8 model
    # a second encoder on the same cache reuses the int8 file
    again = SentenceTransformerEncoder(runtime="onnx", cache_dir=tmp_path, threads=2)
    mtime = model.path.stat().st_mtime_ns
    np.testing.assert_allclose(again.encode_query(texts[0]), queries[:1], atol=1e-6)
    assert again._onnx._single.path == model.path and model.path.stat().st_mtime_ns == mtime

def test_a_folder_the_onnx_text_path_cannot_read_says_which_runtime_to_use(tmp_path):
    from indexing.sentence_encoder import SentenceTransformerEncoder

    (tmp_path / "model").mkdir()
    with pytest.raises(EncoderConfigError, match="use MARS_ENCODER_RUNTIME=torch"):
        SentenceTransformerEncoder(str(tmp_path / "model"), runtime="onnx", cache_dir=tmp_path)
