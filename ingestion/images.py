"""Image loading with limits: size on disk, pixel count (decompression bombs), real image content."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError


class InvalidImage(ValueError):
    """The image cannot be used; the message is the reason shown to the user."""


def decode_image(
    data: bytes, *, max_pixels: int, what: str = "image", formats: tuple[str, ...] | None = None, lazy: bool = False
) -> Image.Image:
    """Decode image bytes into an RGB :class:`PIL.Image.Image`.

    With ``lazy`` the header is checked as below but no pixel is decoded: PIL decodes them on
    first use, in the image's own mode (for bytes known to decode, e.g. a room photo whose
    region vectors are already cached, so that a repeat search costs no decoding).

    The content is sniffed, never trusted from a file name or a Content-Type: with
    ``formats`` (PIL format names, e.g. ``("JPEG", "PNG", "WEBP")``) only those decoders may
    read the bytes. The header is read first and the pixel count (width*height) checked
    against ``max_pixels`` before any pixel is decoded, so a decompression bomb (a small file
    declaring huge dimensions) costs nothing; PIL's own guard (``Image.MAX_IMAGE_PIXELS``:
    a warning past it, ``DecompressionBombError`` past twice it, raised by ``Image.open``)
    is turned into the same rejection.

    Raises:
        InvalidImage: not an image (of ``formats``), truncated, or more than ``max_pixels`` pixels.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=formats)
            width, height = img.size
            if width * height > max_pixels:
                raise InvalidImage(f"{what} has {width}x{height} pixels, over the limit of {max_pixels}")
            if lazy:
                return img
            img.load()
    except InvalidImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImage(f"{what} has too many pixels, over the limit of {max_pixels} ({exc})") from exc
    except UnidentifiedImageError as exc:
        accepted = f", accepted: {', '.join(formats)}" if formats else ""
        raise InvalidImage(f"{what} is not a readable image ({exc.__class__.__name__}{accepted})") from exc
    except OSError as exc:
        raise InvalidImage(f"{what} is not a readable image ({exc})") from exc
    return img.convert("RGB")


def read_image_bytes(path: str | Path, *, max_bytes: int) -> bytes:
    """Read an image file's bytes, refusing missing, non-regular or oversized files.

    Raises:
        InvalidImage: the file is missing, not a file, or larger than ``max_bytes``.
    """
    p = Path(path)
    if not p.is_file():
        raise InvalidImage(f"image file {p} does not exist")
    size = p.stat().st_size
    if size > max_bytes:
        raise InvalidImage(f"image file {p} is {size} bytes, over the limit of {max_bytes}")
    return p.read_bytes()
