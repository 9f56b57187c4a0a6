"""Random-init Qwen2-VL checkpoints of the real architecture, written to a directory (no hub).

Qwen2-VL: Wang et al., "Qwen2-VL: Enhancing Vision-Language Model's Perception of the World at
Any Resolution", arXiv:2409.12191. Two sizes:

* ``tiny`` (tests, CPU smoke runs): 2 text layers of width 64 and a 1-block vision tower of
  width 32 (:func:`tiny_config`);
* ``2b``: the layer shapes of ``Qwen/Qwen2-VL-2B-Instruct`` (:data:`QWEN2VL_2B_TEXT`,
  :data:`QWEN2VL_2B_VISION`), for timing: speed does not depend on the weight values.

:func:`save_random_qwen2vl` writes what :class:`critic.vlm.QwenVLCritic` loads with
``local_files_only=True``: the model, a byte-level BPE tokenizer trained here with the
Qwen2-VL special tokens (a few hundred to a few thousand tokens; for ``2b`` the model keeps
the real 151,936-row vocabulary and every tokenizer id is below it), and a
``Qwen2VLImageProcessorPil`` config. :func:`save_tiny_qwen2vl` is the fixed tiny checkpoint of
the test suite (``tests/tiny_qwen2vl.py`` re-exports it).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
)
_CORPUS = (
    "yes no Yes No yes. no. user assistant system",
    '{"score": 0.75, "rationale": "The oak sofa suits the bright living room."}',
    '{"score": 0.1, "rationale": "A desk lamp does not fit this bathroom."}',
    "Room photo: Request: Product photo: Product: Does this product fit this room and request? "
    "Answer yes or no. Answer with JSON only, where x is a number from 0 to 1 and the rationale is one sentence.",
    "0 1 2 3 4 5 6 7 8 9 0.5 0.25 chair table bed rug lamp shelf white black wood bedroom kitchen",
    "That answer is not valid: no JSON object found. Reply again with valid JSON only, exactly.",
)
SEED = 0
SIZES = ("tiny", "2b")

#: The text decoder of Qwen/Qwen2-VL-2B-Instruct, from its published ``config.json`` (Hugging
#: Face hub, model card of the Qwen2-VL paper arXiv:2409.12191; the same numbers are the
#: Qwen2-1.5B / Qwen2.5-1.5B decoder): 28 layers of width 1536, 12 query heads and 2 key/value
#: heads (grouped-query attention, head_dim 128), SwiGLU MLP of 8960, RMSNorm eps 1e-6, M-RoPE
#: (rope_theta 1e6, ``mrope_section`` [16, 24, 24] = head_dim / 2 split over temporal, height,
#: width), 151,936-token vocabulary with tied input / output embeddings, no sliding window.
QWEN2VL_2B_TEXT: dict[str, Any] = dict(
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
    num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
    use_sliding_window=False, max_window_layers=28, attention_dropout=0.0,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
)
#: The vision tower of Qwen/Qwen2-VL-2B-Instruct (``vision_config`` of the same ``config.json``;
#: also ``Qwen2VLVisionConfig``'s defaults in transformers except ``hidden_size``): a 675M-param
#: ViT of 32 blocks, width 1280, 16 heads, MLP ratio 4 (QuickGELU), 14-px patches over 2 frames
#: (temporal_patch_size 2), 2x2 patch merge into the text width 1536.
QWEN2VL_2B_VISION: dict[str, Any] = dict(
    depth=32, embed_dim=1280, hidden_size=1536, hidden_act="quick_gelu", mlp_ratio=4, num_heads=16, in_channels=3,
    patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
)
#: Qwen/Qwen2-VL-2B-Instruct's ``preprocessor_config.json`` bounds: images are resized so that
#: 56*56 <= h*w <= 28*28*16384 (sides multiples of 28); benchmarks usually cap ``max_pixels`` lower.
QWEN2VL_MIN_PIXELS = 56 * 56
QWEN2VL_MAX_PIXELS = 28 * 28 * 16384


def train_tokenizer(vocab_size: int = 400, texts: Iterable[str] = ()):
    """A ``PreTrainedTokenizerFast`` (byte-level BPE, ``vocab_size`` at most) with the
    Qwen2-VL special tokens as ids 0-6; eos ``<|im_end|>``, pad ``<|endoftext|>``.

    Trained on a small built-in corpus (the prompt and answer words) plus ``texts`` (e.g. the
    product texts of a benchmark, so that they tokenise into about as many tokens as with the
    real 151k-token Qwen2 tokenizer rather than into bytes).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(list(_CORPUS) * 20 + list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _special_ids(tokenizer) -> dict[str, int]:
    return dict(zip(SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))))


def _config(tokenizer, text: dict[str, Any], vision: dict[str, Any], **top: Any):
    from transformers import Qwen2VLConfig

    ids = _special_ids(tokenizer)
    if max(ids.values()) >= text["vocab_size"] or len(tokenizer) > text["vocab_size"]:
        raise ValueError(f"tokenizer of {len(tokenizer)} tokens does not fit a vocabulary of {text['vocab_size']}")
    text = dict(text, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    return Qwen2VLConfig(
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], **top,
    )


def tiny_config(tokenizer):
    """A ``Qwen2VLConfig`` whose special-token ids and vocabulary match ``tokenizer``.

    Text: hidden 64, 2 layers, 4 heads (head_dim 16), 2 kv heads, M-RoPE sections [2, 3, 3]
    (sum = head_dim / 2). Vision: 1 block, embed_dim 32, 2 heads, 14-px patches, 2x2 merge,
    temporal patch 2, output width 64 (= text hidden).
    """
    text = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    return _config(tokenizer, text, vision)


def qwen2vl_2b_config(tokenizer):
    """The ``Qwen2VLConfig`` of Qwen2-VL-2B-Instruct's architecture (:data:`QWEN2VL_2B_TEXT`,
    :data:`QWEN2VL_2B_VISION`, tied word embeddings) with the special-token ids of ``tokenizer``
    (which must fit in the 151,936-row vocabulary)."""
    return _config(tokenizer, QWEN2VL_2B_TEXT, QWEN2VL_2B_VISION, tie_word_embeddings=True)


def save_random_qwen2vl(
    path: Path, size: str = "tiny", *, min_pixels: int = QWEN2VL_MIN_PIXELS, max_pixels: int = 448 * 448,
    tokenizer_vocab: int = 400, texts: Iterable[str] = (), save_dtype: Any = None, seed: int = SEED,
) -> Path:
    """Write a random-init Qwen2-VL of ``size`` (``"tiny"`` or ``"2b"``), its tokenizer and an
    image-processor config (images resized to ``min_pixels`` .. ``max_pixels`` pixels, sides
    multiples of 28) to ``path``; return ``path``.

    Args:
        tokenizer_vocab / texts: see :func:`train_tokenizer`.
        save_dtype: torch dtype the weights are created and saved in; default float32 for
            ``tiny`` and bfloat16 for ``2b`` (4.4 GB on disk instead of 8.8; the critic casts to
            its own dtype when loading).
        seed: ``torch.manual_seed`` before the weights are drawn.

    Raises:
        ValueError: an unknown ``size``.
    """
    import torch
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    if size not in SIZES:
        raise ValueError(f"unknown Qwen2-VL size {size!r}; choose one of {SIZES}")
    tokenizer = train_tokenizer(tokenizer_vocab, texts)
    config = tiny_config(tokenizer) if size == "tiny" else qwen2vl_2b_config(tokenizer)
    dtype = save_dtype or (torch.float32 if size == "tiny" else torch.bfloat16)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # draw the weights directly in the saved dtype (half the memory for bf16)
    try:
        model = Qwen2VLForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(path)
    del model
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels).save_pretrained(path)
    return Path(path)


def save_tiny_qwen2vl(path: Path) -> Path:
    """Write the tests' tiny model, tokenizer and image-processor config to ``path``; return ``path``.

    Weights are random with ``torch.manual_seed(SEED)``, so two calls give the same model.
    Images are resized to 28*28 .. 56*56*2 pixels (sides multiples of 28): 4 to 32 patches of
    14 px, i.e. 1 to 8 tokens after the 2x2 merge.
    """
    return save_random_qwen2vl(path, "tiny", min_pixels=28 * 28, max_pixels=56 * 56 * 2)
