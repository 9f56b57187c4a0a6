"""A tiny random-init Qwen2-VL of the real architecture, saved to a directory, for tests.

``save_tiny_qwen2vl(path)`` writes what ``Qwen2VLForConditionalGeneration``,
``AutoTokenizer`` and ``Qwen2VLImageProcessorPil`` load with ``local_files_only=True``:
the model (2 text layers of width 64, a 1-block vision tower of width 32), a byte-level BPE
tokenizer trained here (~400 tokens) with the Qwen2-VL special tokens, and an image
processor config that turns a photo into 4 to 32 patches (1 to 8 image tokens). No hub access.
"""

from __future__ import annotations

from pathlib import Path

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


def train_tokenizer(vocab_size: int = 400):
    """A ``PreTrainedTokenizerFast`` (byte-level BPE, ``vocab_size`` at most) with the
    Qwen2-VL special tokens as ids 0-6; eos ``<|im_end|>``, pad ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(list(_CORPUS) * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def tiny_config(tokenizer):
    """A ``Qwen2VLConfig`` whose special-token ids and vocabulary match ``tokenizer``.

    Text: hidden 64, 2 layers, 4 heads (head_dim 16), 2 kv heads, M-RoPE sections [2, 3, 3]
    (sum = head_dim / 2). Vision: 1 block, embed_dim 32, 2 heads, 14-px patches, 2x2 merge,
    temporal patch 2, output width 64 (= text hidden).
    """
    from transformers import Qwen2VLConfig

    ids = dict(zip(SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))))
    text = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


def save_tiny_qwen2vl(path: Path) -> Path:
    """Write the tiny model, tokenizer and image-processor config to ``path``; return ``path``.

    Weights are random with ``torch.manual_seed(SEED)``, so two calls give the same model.
    Images are resized to 28*28 .. 56*56*2 pixels (sides multiples of 28): 4 to 32 patches of
    14 px, i.e. 1 to 8 tokens after the 2x2 merge.
    """
    import torch
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    tokenizer = train_tokenizer()
    torch.manual_seed(SEED)
    model = Qwen2VLForConditionalGeneration(tiny_config(tokenizer)).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56 * 2).save_pretrained(path)
    return path
