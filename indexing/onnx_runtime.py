"""ONNX Runtime as the inference runtime of the encoders: export once, cache, run.

A network is exported from its packaged PyTorch weights with ``torch.onnx.export`` (the
TorchScript exporter, opset :data:`OPSET`, dynamic batch, height and width: PyTorch docs,
"torch.onnx") into a cache folder, under a file name that carries a key: the digest of the
weights file and of the export settings. A later process with the same weights and settings
loads the cached file and needs no PyTorch at all; other weights or settings give another key,
hence a fresh export. Exports are written beside their final name and renamed into place, under
a file lock, so concurrent processes (API replicas, workers) never read a half-written model.

Sessions use ONNX Runtime's CPU execution provider with all graph optimisations, one
inter-op thread and ``threads`` intra-op threads that do not spin between calls (ONNX Runtime
docs, "Thread management").
PyTorch stays the reference and the training path (``MARS_ENCODER_RUNTIME=torch``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

#: ONNX opset of the exports (supported by ONNX Runtime >= 1.12 and the TorchScript exporter).
OPSET = 17


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` where unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_cache_dir() -> Path:
    """Where exports go when no folder is given: ``$XDG_CACHE_HOME/mars/models`` (default
    ``~/.cache/mars/models``). The engine passes ``MARS_HOME/models`` instead."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mars" / "models"


@lru_cache(maxsize=16)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_digest(path: Path) -> str:
    """sha256 hex of a weights file (computed once per file version in a process)."""
    st = Path(path).stat()
    return _file_digest(str(path), st.st_mtime_ns, st.st_size)


def export_key(weights: Path, settings: Mapping[str, Any]) -> str:
    """The cache key of an export: the first 16 hex digits of the sha256 of the weights file's
    digest, the caller's export ``settings``, :data:`OPSET` and the installed torch version (the
    exporter), as sorted JSON: a change to any of them exports again."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        exporter = version("torch")
    except PackageNotFoundError:  # a cached export needs no torch; a new one will fail clearly in torch_export
        exporter = "absent"
    blob = json.dumps({"weights": weights_digest(weights), "settings": dict(settings), "opset": OPSET,
                       "exporter": exporter}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_export(name: str, key: str, cache_dir: Path, export: Callable[[Path], None]) -> Path:
    """The cached ONNX file ``<cache_dir>/<name>-<key>.onnx``, exported by ``export(path)`` when
    it is not there yet (written to a temporary name, then renamed; under a file lock).

    Raises:
        OSError: the folder or the file cannot be written. Whatever ``export`` raises (nothing
            is left under the final name).
    """
    from filelock import FileLock

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{name}-{key}.onnx"
    if path.exists():
        return path
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            staging = path.with_name(path.name + f".{os.getpid()}.tmp")
            try:
                export(staging)
                os.replace(staging, path)
            finally:
                staging.unlink(missing_ok=True)
    return path


def torch_export(module: Any, inputs: Mapping[str, np.ndarray], path: Path, output_name: str,
                 dynamic: Mapping[str, Mapping[int, str]]) -> None:
    """Export ``module`` (a ``torch.nn.Module`` whose ``forward`` takes ``inputs`` by position, in
    their order, and returns one tensor) to ``path`` with ``torch.onnx.export`` (TorchScript
    exporter, :data:`OPSET`), tracing it on the sample ``inputs`` (name -> array)."""
    import torch

    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(module.eval(), tuple(torch.from_numpy(a) for a in inputs.values()), str(path),
                          input_names=list(inputs), output_names=[output_name],
                          dynamic_axes={k: dict(v) for k, v in dynamic.items()}, opset_version=OPSET, dynamo=False)


class OnnxModel:
    """One ONNX Runtime session on the CPU execution provider.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (>= 1).

    Raises:
        ValueError: ``threads`` < 1. onnxruntime's errors for a file it cannot load.
    """

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        if threads < 1:
            raise ValueError(f"ONNX Runtime needs at least 1 thread, got {threads}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # no busy-waiting between calls: a server's idle threads must not burn the cores that
        # its other requests (and other processes) need; costs ~4% of a 1408 px feature map here
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path, self.threads = Path(path), threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The model's first output for its one float32 input ``x`` (thread-safe: ONNX Runtime
        runs concurrent calls on one session)."""
        return self.session.run(None, {self.input_names[0]: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def run(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """The model's first output for named ``inputs`` (those the model does not take are left out)."""
        return self.session.run(None, {k: np.ascontiguousarray(v) for k, v in inputs.items() if k in self.input_names})[0]
