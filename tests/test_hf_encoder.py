"""The transformers SigLIP/CLIP encoder path, with tiny random-init models of the real
architectures saved to a temp dir (no hub, no torchvision)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["a white armchair", "a lamp for this bedroom", "rug flatwoven"] * 10, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>", model_max_length=16
    )


TOWER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)


@pytest.fixture(params=["siglip", "clip"])
def model_dir(request, tmp_path):
    from transformers import (
        CLIPConfig, CLIPImageProcessorPil, CLIPModel, SiglipConfig, SiglipImageProcessorPil, SiglipModel,
    )

    text = dict(TOWER, vocab_size=300, max_position_embeddings=16)
    vision = dict(TOWER, image_size=32, patch_size=8)
    if request.param == "siglip":
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
        dim = 32
    else:
        text.update(bos_token_id=2, eos_token_id=3, pad_token_id=1)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
        processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        dim = 24
    model.save_pretrained(tmp_path)
    _tokenizer().save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    return tmp_path, dim


def test_hf_dual_encoder_loads_locally_and_normalises(model_dir):
    from mars.registry import load_encoders

    path, dim = model_dir
    image_enc, text_enc = load_encoders(f"hf:{path}", f"hf:{path}")
    assert image_enc is text_enc and image_enc.dim == dim  # one model serves both sides
    imgs = image_enc.encode_images([Image.new("RGB", (50, 40), "red"), Image.new("RGB", (64, 64), "blue")] * 5)
    txt = text_enc.encode_texts(["white armchair", "a lamp", "rug"])
    assert imgs.shape == (10, dim) and txt.shape == (3, dim) and imgs.dtype == np.float32
    assert np.allclose(np.linalg.norm(imgs, axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(txt, axis=1), 1, atol=1e-5)
    # batching does not change results
    single = image_enc.encode_images([Image.new("RGB", (50, 40), "red")])
    assert np.allclose(single[0], imgs[0], atol=1e-5)


def test_unknown_or_missing_encoders(tmp_path):
    from indexing.encoders import EncoderConfigError
    from mars.registry import load_encoders

    with pytest.raises(EncoderConfigError, match="unknown image encoder"):
        load_encoders("resnet", "all-minilm-l6-v2")
    with pytest.raises(EncoderConfigError, match="does not exist"):
        load_encoders(f"hf:{tmp_path / 'missing'}", "all-minilm-l6-v2")
