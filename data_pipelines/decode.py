"""Image bytes in and out: what the shard writers store and how the loader decodes it."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image

from vlp.data_pipelines.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# Shard member extensions the loader takes as the image, in order of preference.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def image_member(path: Path) -> tuple[str, bytes, int, int]:
    """(extension, bytes, width, height) of an image file, as stored in a shard.

    JPEG and PNG bytes are stored unchanged ("jpg"/"png", the img2dataset convention); WebP is
    re-encoded losslessly as PNG. Raises DataError naming the file when it is not a readable image.
    """
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            width, height = image.size
            fmt = image.format
            if fmt not in ("JPEG", "PNG"):
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                data, fmt = buffer.getvalue(), "PNG"
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: not a readable image ({error})") from None
    return ("jpg" if fmt == "JPEG" else "png"), data, width, height


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode image bytes to an RGB PIL image.

    Raises `Image.DecompressionBombError` when the declared size is over `max_pixels` (checked
    from the header, before decoding), `OSError`/`ValueError` when the bytes are corrupt.
    """
    with Image.open(io.BytesIO(data)) as image:
        check_pixels(image, max_pixels)
        if image.mode == "RGB":  # convert() would copy: load the pixels and hand them over as they are
            image.load()
            return image
        return image.convert("RGB")


def peek_image(data: bytes, max_pixels: int) -> None:
    """The cheap part of `decode_image`: parse the header and check the size, decode nothing."""
    with Image.open(io.BytesIO(data)) as image:
        check_pixels(image, max_pixels)


def check_pixels(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise Image.DecompressionBombError(f"{width}x{height} image is over the {max_pixels}-pixel limit")


# PIL's own default decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`, 1024**3 // 4 // 3: a
# quarter GiB of 3-byte pixels), the default of `data.max_image_pixels`. Written out, not read
# from PIL, because `allow_pixels` raises PIL's value process-wide.
PIL_MAX_IMAGE_PIXELS = 89_478_485


def allow_pixels(max_pixels: int) -> None:
    """Let PIL open images up to `max_pixels` (the loader applies that limit itself) and silence
    PIL's per-image warning for sizes near its own limit. Changes PIL's process-wide setting."""
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels
