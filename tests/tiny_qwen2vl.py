"""A tiny random-init Qwen2-VL of the real architecture, saved to a directory, for tests.

The builder lives in :mod:`critic.random_qwen2vl` (the critic speed benchmark,
``evaluation/critic_speed.py``, uses it too); this module keeps the tests' import path.
``save_tiny_qwen2vl(path)`` writes the model (2 text layers of width 64, a 1-block vision tower
of width 32), a byte-level BPE tokenizer trained here (~400 tokens) with the Qwen2-VL special
tokens, and an image processor config that turns a photo into 4 to 32 patches (1 to 8 image
tokens). No hub access.
"""

from __future__ import annotations

from critic.random_qwen2vl import SEED, SPECIAL_TOKENS, save_tiny_qwen2vl, tiny_config, train_tokenizer

__all__ = ["SEED", "SPECIAL_TOKENS", "save_tiny_qwen2vl", "tiny_config", "train_tokenizer"]
