"""Bytes, path or PIL image -> an RGB image as a person sees it (EXIF orientation, every mode, pixel cap).

Kosmos-2's boxes are returned in the pixels of this image, so orientation is applied first; the pixel
cap is checked from the header, before the pixels are decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from kosmos_serve.errors import ImageTooLargeError, InvalidImageError

DEFAULT_MAX_IMAGE_PIXELS = 40_000_000

READABLE_FORMATS = "PNG, JPEG, GIF, WebP, BMP or TIFF"
WHITE = (255, 255, 255)
HIGH_BIT_DEPTH_GRAY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
UINT16_TO_UINT8 = 257  # 65535 / 255: maps the full 16-bit range onto 0..255


def load_image(
    source: bytes | str | os.PathLike | Image.Image, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> Image.Image:
    """Decode `source` into an RGB image oriented as a viewer shows it.

    >>> load_image(Image.new("LA", (2, 1), (0, 0))).getpixel((0, 0))  # transparent -> white page
    (255, 255, 255)
    """
    if isinstance(source, Image.Image):
        check_pixel_count(source.size, max_pixels)
        decode_fully(source)
        return viewable_rgb(source)
    with open_lazily(source) as image:
        check_pixel_count(image.size, max_pixels)
        decode_fully(image)
        return viewable_rgb(image)


def image_digest(image: Image.Image) -> str:
    """A content hash of an already-loaded image (hex sha256 over mode, size and pixel bytes): equal pixels, equal digest.

    >>> image_digest(Image.new("RGB", (2, 1))) == image_digest(Image.new("RGB", (1, 2)))
    False
    """
    digest = hashlib.sha256(f"{image.mode} {image.width}x{image.height}\n".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def open_lazily(source: bytes | str | os.PathLike) -> Image.Image:
    """Open `source` reading only its header; PIL's own decompression-bomb refusal counts as too large."""
    stream = readable_stream(source)
    try:
        return Image.open(stream)
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(
            f"The image has more pixels than the decoder's safety limit ({Image.MAX_IMAGE_PIXELS:,}); "
            "send a smaller image."
        ) from error
    except (UnidentifiedImageError, SyntaxError, ValueError, EOFError) as error:
        raise InvalidImageError(f"The image cannot be decoded; send a {READABLE_FORMATS} file.") from error
    except OSError as error:
        raise InvalidImageError("The image file cannot be read; check that it is readable.") from error


def readable_stream(source: bytes | str | os.PathLike) -> io.BytesIO | Path:
    """What `Image.open` should read: the bytes as a stream, or a path checked to be a file."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise InvalidImageError("The image is empty (0 bytes).")
        return io.BytesIO(source)
    path = Path(source)
    if not path.exists():
        raise InvalidImageError(f"The image cannot be read: no such file: {path}")
    if path.is_dir():
        raise InvalidImageError(f"The image cannot be read: {path} is a directory, not a file.")
    if path.stat().st_size == 0:
        raise InvalidImageError("The image is empty (0 bytes).")
    return path


def check_pixel_count(size: tuple[int, int], max_pixels: int) -> None:
    """Refuse an image whose width x height exceeds `max_pixels` (EXIF rotation keeps the count)."""
    width, height = size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"The image is {width}x{height} = {width * height:,} pixels, over the cap of {max_pixels:,}; "
            "send a smaller image."
        )


def decode_fully(image: Image.Image) -> None:
    """Decode every pixel of the current (first) frame now, so a cut-off file fails here."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise InvalidImageError("The image is truncated or corrupt; send the complete file.") from error


def viewable_rgb(image: Image.Image) -> Image.Image:
    """A new RGB image: EXIF orientation applied, transparency on white, any bit depth in 8 bits."""
    try:
        oriented = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError) as error:
        raise InvalidImageError("The image's EXIF orientation data is corrupt.") from error
    if oriented.mode in HIGH_BIT_DEPTH_GRAY_MODES:  # convert() would turn every level above 255 white
        return eight_bit_rgb(oriented)
    try:
        if oriented.has_transparency_data:  # an alpha band, or a transparent palette index or colour
            return on_white(oriented.convert("RGBA"))
        return oriented.convert("RGB")  # F (float) grey is clipped to 0..255 here
    except ValueError as error:
        raise InvalidImageError(f"The image's colour mode {oriented.mode} cannot be shown as RGB.") from error


def eight_bit_rgb(gray: Image.Image) -> Image.Image:
    """RGB from 16- or 32-bit grey, 0..65535 mapped onto 0..255 (32-bit levels clipped to that range)."""
    levels = np.clip(np.asarray(gray), 0, 65535) / UINT16_TO_UINT8
    return Image.fromarray(np.rint(levels).astype(np.uint8)).convert("RGB")


def on_white(rgba: Image.Image) -> Image.Image:
    """Composite `rgba` over a white page, as a viewer shows it."""
    page = Image.new("RGBA", rgba.size, (*WHITE, 255))
    return Image.alpha_composite(page, rgba).convert("RGB")
