"""Image files for the bad-input corpus: broken, hostile and merely unusual ones, all built here in memory.

Each builder returns `(bytes, mime type)`. Nothing large is ever decoded or allocated: the
decompression bombs are small files whose headers claim billions of pixels (their size fields patched).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image, ImageDraw

EXIF_ORIENTATION = 0x0112


def encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def scene(size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A small RGB scene of coloured shapes, the demo model's kind of image."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    width, height = size
    draw.ellipse((width * 0.1, height * 0.1, width * 0.45, height * 0.55), fill="red")
    draw.rectangle((width * 0.55, height * 0.4, width * 0.9, height * 0.9), fill="blue")
    return image


def valid_png() -> tuple[bytes, str]:
    return encode(scene(), "PNG"), "image/png"


def valid_jpeg() -> tuple[bytes, str]:
    return encode(scene(), "JPEG", quality=90), "image/jpeg"


def undecodable() -> tuple[bytes, str]:
    return b"this is not an image, just some text pretending to be one\n" * 4, "image/png"


def png_signature_then_garbage() -> tuple[bytes, str]:
    return b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2, "image/png"


def zero_bytes() -> tuple[bytes, str]:
    return b"", "image/png"


def truncated_png() -> tuple[bytes, str]:
    data = encode(Image.effect_noise((128, 96), 64).convert("RGB"), "PNG")
    return data[: len(data) // 2], "image/png"


def truncated_jpeg() -> tuple[bytes, str]:
    data = encode(Image.effect_noise((128, 96), 64).convert("RGB"), "JPEG", quality=95)
    return data[: len(data) // 2], "image/jpeg"


def png_with_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR chunk is patched to claim `width` x `height` (CRC recomputed)."""
    data = bytearray(encode(Image.new("1", (1, 1)), "PNG"))
    ihdr_start = 8  # after the signature: length (4), type (4), then width and height
    assert data[ihdr_start + 4 : ihdr_start + 8] == b"IHDR"
    data[ihdr_start + 8 : ihdr_start + 16] = struct.pack(">II", width, height)
    body = bytes(data[ihdr_start + 4 : ihdr_start + 8 + 13])  # type + the 13 bytes of IHDR data
    data[ihdr_start + 8 + 13 : ihdr_start + 8 + 17] = struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    return bytes(data)


def png_bomb_50000() -> tuple[bytes, str]:
    """2.5 gigapixels by header: past PIL's own bomb limit too."""
    return png_with_size(50_000, 50_000), "image/png"


def png_over_pixel_cap() -> tuple[bytes, str]:
    """50 megapixels by header: under PIL's limit, over the service's default 40 M cap."""
    return png_with_size(10_000, 5_000), "image/png"


def jpeg_bomb() -> tuple[bytes, str]:
    """A baseline JPEG whose SOF0 header claims 65000 x 65000 pixels."""
    data = bytearray(valid_jpeg()[0])
    sof = data.find(b"\xff\xc0")
    assert sof > 0
    data[sof + 5 : sof + 9] = struct.pack(">HH", 65_000, 65_000)  # height, width
    return bytes(data), "image/jpeg"


def png_16_bit() -> tuple[bytes, str]:
    levels = np.linspace(0, 65535, 64 * 48, dtype=np.uint16).reshape(48, 64)
    return encode(Image.fromarray(levels), "PNG"), "image/png"


def cmyk_jpeg() -> tuple[bytes, str]:
    return encode(scene().convert("CMYK"), "JPEG"), "image/jpeg"


def palette_png_with_transparency() -> tuple[bytes, str]:
    image = scene().convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    return encode(image, "PNG", transparency=0), "image/png"


def animated_gif() -> tuple[bytes, str]:
    frames = [scene(), scene().rotate(90), Image.new("RGB", (96, 72), "green")]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0), "image/gif"


def one_by_4000() -> tuple[bytes, str]:
    return encode(Image.new("RGB", (1, 4000), "red"), "PNG"), "image/png"


def four_thousand_by_one() -> tuple[bytes, str]:
    return encode(Image.new("RGB", (4000, 1), "blue"), "PNG"), "image/png"


def jpeg_with_bad_orientation() -> tuple[bytes, str]:
    """EXIF orientation 9: no such orientation (1..8 exist)."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 9
    return encode(scene(), "JPEG", exif=exif.tobytes()), "image/jpeg"


def jpeg_with_text_orientation() -> tuple[bytes, str]:
    """EXIF orientation stored as a string instead of a SHORT."""
    entry = struct.pack(">HHI4s", EXIF_ORIENTATION, 2, 4, b"up!\x00")  # tag, type ASCII, count, value
    exif = b"Exif\x00\x00" + b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1) + entry + b"\x00" * 4
    return encode(scene(), "JPEG", exif=exif), "image/jpeg"


def jpeg_with_garbage_exif() -> tuple[bytes, str]:
    """An APP1 EXIF segment whose TIFF structure points past its own end."""
    garbage = b"Exif\x00\x00MM\x00\x2a\x7f\xff\xff\xff" + b"\xff" * 32
    return encode(scene(), "JPEG", exif=garbage), "image/jpeg"


def webp() -> tuple[bytes, str]:
    return encode(scene(), "WEBP"), "image/webp"


def tiff_float() -> tuple[bytes, str]:
    """32-bit float grey TIFF with values far outside 0..255."""
    levels = np.linspace(-1e6, 1e6, 64 * 48, dtype=np.float32).reshape(48, 64)
    return encode(Image.fromarray(levels), "TIFF"), "image/tiff"
