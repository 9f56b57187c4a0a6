"""Both towers of a local transformers SigLIP or CLIP checkpoint (``hf:<dir>`` for either
encoder side); image and text vectors share one space. Loaded with ``local_files_only``: no hub."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from indexing.encoders import EncoderConfigError, l2_normalize


class HFDualEncoder:
    """Both towers of a transformers ``SiglipModel`` or ``CLIPModel`` loaded from a local directory.

    The directory holds the model (``config.json`` + weights), its tokenizer and its image
    processor, as written by ``save_pretrained``. Image and text vectors share one space.

    Raises:
        EncoderConfigError: the directory does not exist, has no readable ``config.json``, holds
            another architecture (``config.model_type``), or holds a SigLIP tokenizer whose
            ``model_max_length`` exceeds the text tower's positions (SigLIP pads every text to
            it; real SigLIP tokenizers say 64).
    """

    def __init__(self, path: str, batch_size: int = 16) -> None:
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

        if not Path(path).is_dir():
            raise EncoderConfigError(f"hf encoder directory {path} does not exist")
        if not (Path(path) / "config.json").is_file():
            raise EncoderConfigError(f"{path} has no config.json: expected a transformers SigLIP or CLIP model "
                                     "written by save_pretrained (model, tokenizer and image processor)")
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise EncoderConfigError(f"cannot read the model config in {path}: {exc}") from exc
        if config.model_type not in ("siglip", "clip"):
            raise EncoderConfigError(f"{path} holds a {config.model_type!r} model; expected siglip or clip")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        limit = config.text_config.max_position_embeddings
        if config.model_type == "siglip" and self.tokenizer.model_max_length > limit:
            raise EncoderConfigError(f"the SigLIP tokenizer in {path} has model_max_length {self.tokenizer.model_max_length}, "
                                     f"more than the text tower's {limit} positions; set model_max_length (SigLIP pads every text to it)")
        self.name = f"hf:{path}"
        self.batch_size = batch_size
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True, backend="pil")
        self.padding = "max_length" if config.model_type == "siglip" else True
        self.dim = 0
        self.dim = int(self.encode_texts(["dimension probe"]).shape[1])

    @staticmethod
    def _features(output) -> torch.Tensor:  # noqa: ANN001 - a tensor or a ModelOutput
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Encode images with the vision tower; float32 (n, dim), unit rows."""
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = self.processor(images=list(images[start : start + self.batch_size]), return_tensors="pt")
                chunks.append(self._features(self.model.get_image_features(pixel_values=batch["pixel_values"])).numpy())
        return l2_normalize(np.concatenate(chunks)) if chunks else np.zeros((0, self.dim), np.float32)

    def encode_query(self, text: str) -> np.ndarray:
        """One search's text, as :meth:`encode_texts` encodes it: float32 (1, dim), a unit row."""
        return self.encode_texts([text])

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Encode texts with the text tower; float32 (n, dim), unit rows."""
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    list(texts[start : start + self.batch_size]), padding=self.padding, truncation=True, return_tensors="pt"
                )
                kwargs = {"input_ids": batch["input_ids"]}
                if "attention_mask" in batch and self.padding is True:
                    kwargs["attention_mask"] = batch["attention_mask"]
                chunks.append(self._features(self.model.get_text_features(**kwargs)).numpy())
        return l2_normalize(np.concatenate(chunks)) if chunks else np.zeros((0, self.dim), np.float32)
