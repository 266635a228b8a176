"""images.load_image / image_digest: orientation, modes, bad uploads, pixel caps, digests."""

from __future__ import annotations

import io
import struct
import time
import zlib

import pytest
from PIL import Image, ImageFile

from kosmos_serve.errors import ImageTooLargeError, InvalidImageError
from kosmos_serve.images import DEFAULT_MAX_IMAGE_PIXELS, image_digest, load_image

RED = (255, 0, 0)
WHITE = (255, 255, 255)
EXIF_ORIENTATION_TAG = 0x0112

# Orientation -> how the camera stored a picture seen upright (the inverse of what a viewer applies).
STORED_AS = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def upright_scene() -> Image.Image:
    """40x20 white picture with a red 8x8 square in its upper-left corner, as a person sees it."""
    scene = Image.new("RGB", (40, 20), WHITE)
    scene.paste(RED, (0, 0, 8, 8))
    return scene


def as_camera_stored(orientation: int, fmt: str = "PNG") -> bytes:
    stored = upright_scene()
    if STORED_AS[orientation] is not None:
        stored = stored.transpose(STORED_AS[orientation])
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    return encode(stored, fmt, exif=exif)


def noise(mode: str, size: tuple[int, int]) -> Image.Image:
    return Image.frombytes(mode, size, bytes(range(256)) * (size[0] * size[1] * len(mode) // 256 + 1))


def blank_png_header_first(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of the given size whose all-zero pixels compress to a few kilobytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("orientation", sorted(STORED_AS))
def test_every_exif_orientation_comes_back_upright(orientation):
    image = load_image(as_camera_stored(orientation))
    assert image.mode == "RGB"
    assert image.size == (40, 20)
    assert image.getpixel((0, 0)) == RED
    assert image.getpixel((39, 19)) == WHITE


def test_exif_orientation_in_a_jpeg_is_applied():
    image = load_image(as_camera_stored(6, "JPEG"))
    assert image.size == (40, 20)
    red, green, blue = image.getpixel((2, 2))
    assert red > 200 and green < 60 and blue < 60


def test_a_pil_image_is_oriented_and_the_callers_image_is_left_alone():
    original = Image.open(io.BytesIO(as_camera_stored(8)))
    original.load()
    pixels_before = original.tobytes()
    image = load_image(original)
    assert image is not original
    assert image.size == (40, 20) and image.getpixel((0, 0)) == RED
    assert original.size == (20, 40)
    assert original.tobytes() == pixels_before
    assert original.getexif()[EXIF_ORIENTATION_TAG] == 8


def test_an_rgb_pil_image_is_copied_not_returned():
    original = upright_scene()
    image = load_image(original)
    image.putpixel((0, 0), WHITE)
    assert original.getpixel((0, 0)) == RED


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("L", (1, 1), 77), (77, 77, 77)),
        (Image.new("1", (1, 1), 1), WHITE),
        (Image.new("1", (1, 1), 0), (0, 0, 0)),
        (Image.new("LA", (1, 1), (77, 255)), (77, 77, 77)),
        (Image.new("LA", (1, 1), (0, 0)), WHITE),
        (Image.new("RGBA", (1, 1), (255, 0, 0, 255)), RED),
        (Image.new("RGBA", (1, 1), (0, 0, 0, 0)), WHITE),
        (Image.new("CMYK", (1, 1), (0, 255, 255, 0)), RED),
        (Image.new("CMYK", (1, 1), (0, 0, 0, 0)), WHITE),
        (Image.new("F", (1, 1), 300.0), WHITE),
        (Image.new("F", (1, 1), -5.0), (0, 0, 0)),
        (Image.new("F", (1, 1), 12.4), (12, 12, 12)),
        (Image.new("I", (1, 1), 65535), WHITE),
        (Image.new("I", (1, 1), 100_000), WHITE),
        (Image.new("I", (1, 1), -3), (0, 0, 0)),
        (Image.new("I;16", (1, 1), 32768), (128, 128, 128)),
        (Image.new("I;16B", (1, 1), 65535), WHITE),
        (Image.new("I;16B", (1, 1), 257), (1, 1, 1)),
    ],
    ids=lambda value: value.mode if isinstance(value, Image.Image) else None,
)
def test_every_mode_comes_back_as_rgb_with_the_viewers_colours(image, expected):
    loaded = load_image(image)
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == expected


def test_half_transparent_rgba_is_blended_with_white():
    loaded = load_image(Image.new("RGBA", (1, 1), (0, 0, 0, 128)))
    assert all(abs(channel - 127) <= 1 for channel in loaded.getpixel((0, 0)))


def test_ycbcr_converts_to_rgb():
    loaded = load_image(Image.new("YCbCr", (1, 1), (255, 128, 128)))
    assert loaded.mode == "RGB"
    assert all(channel >= 253 for channel in loaded.getpixel((0, 0)))


def test_a_mode_pil_cannot_convert_is_an_invalid_image():
    with pytest.raises(InvalidImageError, match="colour mode La"):
        load_image(Image.new("La", (1, 1)))


def test_sixteen_bit_png_spans_the_full_eight_bit_range():
    sixteen_bit = Image.new("I;16", (3, 1))
    for x, value in enumerate((65535, 32768, 0)):
        sixteen_bit.putpixel((x, 0), value)
    loaded = load_image(encode(sixteen_bit))
    assert loaded.getpixel((0, 0)) == WHITE
    assert abs(loaded.getpixel((1, 0))[0] - 128) <= 1
    assert loaded.getpixel((2, 0)) == (0, 0, 0)


def test_palette_png_with_a_transparent_index_shows_white_there():
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50])
    palette.putpixel((1, 0), 1)
    loaded = load_image(encode(palette, transparency=0))
    assert loaded.getpixel((0, 0)) == WHITE
    assert loaded.getpixel((1, 0)) == (200, 100, 50)


def test_palette_without_transparency_keeps_its_colours():
    palette = Image.new("P", (1, 1))
    palette.putpalette([10, 20, 30])
    assert load_image(encode(palette)).getpixel((0, 0)) == (10, 20, 30)


def test_cmyk_tiff_bytes_convert_to_rgb():
    loaded = load_image(encode(Image.new("CMYK", (2, 2), (0, 255, 255, 0)), "TIFF"))
    assert loaded.mode == "RGB" and loaded.getpixel((1, 1)) == RED


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (4, 4), RED), Image.new("RGB", (4, 4), (0, 0, 255))]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(gif)).n_frames == 2
    assert load_image(gif).getpixel((0, 0)) == RED


def test_zero_bytes_say_the_image_is_empty():
    with pytest.raises(InvalidImageError, match="empty"):
        load_image(b"")


def test_garbage_bytes_say_they_cannot_be_decoded_and_name_the_formats():
    with pytest.raises(InvalidImageError) as caught:
        load_image(b"this is certainly not an image")
    assert "cannot be decoded" in caught.value.message
    assert "PNG" in caught.value.message and "JPEG" in caught.value.message
    assert "identify" not in caught.value.message  # PIL's own wording stays internal
    assert caught.value.__cause__ is not None


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_file_cut_in_half_is_reported_as_truncated(fmt):
    whole = encode(noise("RGB", (64, 64)), fmt)
    assert load_image(whole).size == (64, 64)
    with pytest.raises(InvalidImageError, match="truncated or corrupt") as caught:
        load_image(whole[: len(whole) // 2])
    assert caught.value.__cause__ is not None
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_too_many_pixels_is_refused_from_the_header_without_decoding(monkeypatch):
    png = blank_png_header_first(8000, 8000)  # 64 M pixels: over our cap, under PIL's own bomb limit
    assert len(png) < 100_000

    def decode_should_not_happen(self):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decode_should_not_happen)
    started = time.perf_counter()
    with pytest.raises(ImageTooLargeError) as caught:
        load_image(png)
    assert time.perf_counter() - started < 1.0
    assert "8000x8000" in caught.value.message
    assert f"{DEFAULT_MAX_IMAGE_PIXELS:,}" in caught.value.message


def test_the_pixel_cap_is_configurable_and_applies_to_pil_images():
    small = Image.new("RGB", (100, 100))
    with pytest.raises(ImageTooLargeError, match="100x100"):
        load_image(encode(small), max_pixels=9_999)
    with pytest.raises(ImageTooLargeError):
        load_image(small, max_pixels=9_999)
    assert load_image(small, max_pixels=10_000).size == (100, 100)


def test_pils_own_decompression_bomb_refusal_becomes_image_too_large():
    with pytest.raises(ImageTooLargeError, match="safety limit") as caught:  # PIL refuses past ~179 M pixels
        load_image(blank_png_header_first(20_000, 20_000), max_pixels=10**10)
    assert isinstance(caught.value.__cause__, Image.DecompressionBombError)


def test_a_missing_path_says_no_such_file(tmp_path):
    missing = tmp_path / "nowhere.png"
    with pytest.raises(InvalidImageError, match="no such file") as caught:
        load_image(missing)
    assert str(missing) in caught.value.message


def test_a_directory_is_not_an_image(tmp_path):
    with pytest.raises(InvalidImageError, match="directory"):
        load_image(str(tmp_path))


def test_a_path_to_an_image_loads_it(tmp_path):
    path = tmp_path / "scene.png"
    path.write_bytes(as_camera_stored(3))
    image = load_image(str(path))
    assert image.size == (40, 20) and image.getpixel((0, 0)) == RED


def test_digest_is_equal_for_equal_pixels_and_changes_with_one_pixel():
    scene = upright_scene()
    from_bytes = load_image(encode(scene))
    from_pil = load_image(scene)
    assert image_digest(from_bytes) == image_digest(from_pil)
    assert len(image_digest(from_pil)) == 64
    changed = from_pil.copy()
    changed.putpixel((39, 19), (254, 255, 255))
    assert image_digest(changed) != image_digest(from_pil)


def test_digest_tells_apart_shapes_with_the_same_bytes():
    assert image_digest(Image.new("RGB", (2, 1))) != image_digest(Image.new("RGB", (1, 2)))
