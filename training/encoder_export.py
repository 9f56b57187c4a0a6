"""Writing a trained dual encoder (:mod:`training.dual_encoder`) and checking that it reloads.

The LoRA weights are merged (``merge_and_unload``) and the plain model, tokenizer and image
processor are written with ``save_pretrained`` (:func:`save_merged`), plus the training report
:data:`REPORT_FILE` (:func:`write_report`). The written directory is then loaded back through
:func:`mars.registry.load_encoders` and must reproduce the trained model's vectors
(:func:`reload_check`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from indexing.encoders import l2_normalize
from indexing.hf_encoder import HFDualEncoder
from mars.registry import load_encoders
from training.dual_model import PairEncoder
from training.pair_data import PairItem

#: The report written beside the saved model.
REPORT_FILE = "mars_training.json"


def save_merged(model: Any, base: HFDualEncoder, out: Path) -> Any:
    """Merge the LoRA adapters of ``model`` (a peft ``PeftModel``) into its weights
    (``merge_and_unload``), move the plain model to CPU in eval mode and write it with
    ``save_pretrained`` to ``out`` (created when missing), beside ``base``'s tokenizer and image
    processor: the directory ``MARS_*_ENCODER=hf:<out>`` loads.

    Returns:
        The merged (plain ``SiglipModel`` / ``CLIPModel``) model, on CPU.
    """
    merged = model.merge_and_unload().cpu().eval()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    base.tokenizer.save_pretrained(out)
    base.processor.save_pretrained(out)
    return merged


def reload_check(out: Path, merged: Any, base: HFDualEncoder, items: Sequence[PairItem]) -> dict[str, Any]:
    """Load ``out`` through :func:`mars.registry.load_encoders` (``hf:<out>`` on both sides)
    and compare its vectors of up to 4 of ``items`` with those of ``merged`` (the in-memory
    merged model, on CPU).

    Returns:
        ``{"spec": "hf:<out>", "dim": ..., "max_abs_diff": ...}``.

    Raises:
        RuntimeError: the reloaded model's vectors differ by more than 1e-4 (a broken save).
    """
    from PIL import Image

    probe = list(items[:4])
    image_enc, text_enc = load_encoders(f"hf:{out}", f"hf:{out}")
    images = []
    for it in probe:
        with Image.open(it.image) as img:
            images.append(img.convert("RGB"))
    loaded_t = text_enc.encode_texts([it.text for it in probe])
    loaded_x = image_enc.encode_images(images)
    enc = PairEncoder(merged, base, torch.device("cpu"))
    with torch.no_grad():
        ref_t, ref_x = enc.embed(probe, len(probe) or 1)
    diff = max(float(np.abs(loaded_t - l2_normalize(ref_t.numpy())).max(initial=0.0)),
               float(np.abs(loaded_x - l2_normalize(ref_x.numpy())).max(initial=0.0)))
    if diff > 1e-4:
        raise RuntimeError(f"the model saved to {out} does not reproduce the trained vectors (max |diff| {diff:.2e})")
    return {"spec": f"hf:{out}", "dim": int(text_enc.dim), "max_abs_diff": diff}


def write_report(out: Path, report: Mapping[str, Any]) -> None:
    """Write ``report`` as indented JSON to ``out /`` :data:`REPORT_FILE`."""
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))


__all__ = ["REPORT_FILE", "reload_check", "save_merged", "write_report"]
