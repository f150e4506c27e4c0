"""Reading a source image for a shard: checked by decoding it, kept as it is or re-encoded smaller."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from xmodal.data.convert.base import SkipSample

KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # written as they are; others become JPEG
JPEG_QUALITY = 95
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def read_image(path: Path, max_size: int | None = None) -> tuple[str, bytes]:
    """The shard field (``jpg``, ``png`` or ``webp``) and bytes of the image at ``path``.

    The image is decoded in full, so a truncated or corrupt file is caught here rather than in training. A JPEG,
    PNG or WebP within ``max_size`` is written as its original bytes; a larger one (shorter side resized to
    ``max_size``) or another format is re-encoded as JPEG.

    Raises:
        SkipSample: when the file is missing or cannot be decoded.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SkipSample(path, "missing image") from None
    except OSError as error:
        raise SkipSample(path, f"unreadable image ({error.strerror})") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            source_format = image.format or ""
            picture = image.convert("RGB")  # decodes every pixel
    except Image.DecompressionBombError:
        raise SkipSample(path, f"image over PIL's {Image.MAX_IMAGE_PIXELS} pixel limit") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise SkipSample(path, "corrupt image") from None
    too_large = max_size is not None and min(picture.size) > max_size
    if source_format in KEPT_FORMATS and not too_large:
        return KEPT_FORMATS[source_format], data
    if too_large:
        assert max_size is not None
        scale = max_size / min(picture.size)
        picture = picture.resize((max(max_size, round(picture.width * scale)),
                                  max(max_size, round(picture.height * scale))), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return "jpg", buffer.getvalue()
