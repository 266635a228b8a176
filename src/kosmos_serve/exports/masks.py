"""Masks (COCO run-length encoding, `grounding.Mask`) -> pixels, area, and the shapes other tools take them in.

- `mask_pixels`: the H x W boolean array, as pycocotools' `mask.decode` gives it;
- `encode_mask`: the other way, an H x W boolean array as the JSON of pycocotools' `mask.encode`, byte for byte
  (what `kosmos-serve data shapes` writes its true masks with, on an install without the `masks` extra);
- `mask_area`: its pixel count, as pycocotools' `mask.area` gives it, read from the runs alone;
- `mask_iou`: intersection over union of two masks, the figure `evaluate --segmenter` reports;
- `brush_rle`: Label Studio's own run-length encoding for `brushlabels` (label-studio-sdk's `brush.mask2rle`
  of the mask as 0/255, byte for byte);
- `outline`: the boundary of the mask's largest part as a polygon, for Label Studio's `polygonlabels`, which
  hold one ring without holes (what HumanSignal's SAM 2 backend sends: the largest outer contour).

Nothing here imports torch or transformers; contourpy (matplotlib's contour tracer) only in `outline`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from kosmos_serve.grounding import Mask

BRUSH_WORD_BITS = 8  # Label Studio's RLE header: 8-bit values, run-length fields of 3, 4, 8 and 16 bits
BRUSH_RUN_BITS = (3, 4, 8, 16)


def as_mask(value: Mask | Mapping) -> Mask:
    """A `Mask` from itself or from its JSON (`{"size": [h, w], "counts": "..."}`, as records hold it)."""
    if isinstance(value, Mask):
        return value
    return Mask(size=(value["size"][0], value["size"][1]), counts=value["counts"])


def mask_runs(mask: Mask | Mapping) -> np.ndarray:
    """The run lengths of the mask in column-major order, background first (pycocotools' `rleFrString`).

    Each run after the third is written as its difference from the run two before it, in 5-bit groups
    (6th bit: more groups follow; the last group's 5th bit: negative), each group plus 48 as a character.

    >>> mask_runs({"size": [3, 2], "counts": "141"}).tolist()
    [1, 4, 1]
    """
    mask = as_mask(mask)
    runs: list[int] = []
    value, shift = 0, 0
    for character in mask.counts.encode("ascii"):
        group = character - 48
        value |= (group & 0x1F) << shift
        shift += 5
        if group & 0x20:
            continue
        if group & 0x10:
            value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
        value, shift = 0, 0
    return np.array(runs, dtype=np.int64)


def mask_problem(value, height: int | None = None, width: int | None = None) -> str | None:
    """What keeps `value` from being a mask (of a `height` x `width` image, when given), or None.

    >>> mask_problem({"size": [3, 2], "counts": "141"}), mask_problem({"size": [3, 2], "counts": "142"})
    (None, 'its counts cover 7 pixels, not 3 x 2')
    """
    if not (isinstance(value, Mapping) and isinstance(value.get("counts"), str) and isinstance(value.get("size"), list)
            and len(value["size"]) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                for v in value["size"])):
        return 'must be {"size": [height, width], "counts": "<COCO run-length encoding>"}'
    mask_height, mask_width = value["size"]
    if height is not None and (mask_height, mask_width) != (height, width):
        return f"its size {mask_height} x {mask_width} is not the image's {height} x {width}"
    try:
        runs = mask_runs(value)
    except UnicodeEncodeError:
        runs = np.array([-1])
    if (runs < 0).any():
        return "its counts are not COCO run-length encoding"
    if runs.sum() != mask_height * mask_width:
        return f"its counts cover {runs.sum()} pixels, not {mask_height} x {mask_width}"
    return None


def mask_pixels(mask: Mask | Mapping) -> np.ndarray:
    """The mask as an H x W boolean array (pycocotools' `mask.decode`).

    >>> mask_pixels({"size": [3, 2], "counts": "141"}).astype(int).tolist()
    [[0, 1], [1, 1], [1, 0]]
    """
    mask = as_mask(mask)
    height, width = mask.size
    runs = mask_runs(mask)
    values = np.arange(len(runs)) % 2 == 1
    return np.repeat(values, runs).reshape(width, height).T


def encode_mask(pixels: np.ndarray) -> dict:
    """A boolean H x W mask as `{"size": [h, w], "counts": "..."}`, exactly what pycocotools' `mask.encode` writes:
    the runs of `mask_runs`, in column-major order, background first, each written as `mask_runs` reads it.

    >>> encode_mask(np.array([[0, 1], [1, 1], [1, 0]], dtype=bool))
    {'size': [3, 2], 'counts': '141'}
    """
    pixels = np.asarray(pixels, dtype=bool)
    height, width = pixels.shape
    values = pixels.T.ravel()
    changes = np.flatnonzero(values[1:] != values[:-1]) + 1
    runs = np.diff(np.concatenate(([0], changes, [values.size]))).tolist()
    if values[0]:
        runs.insert(0, 0)  # the first run is always the background's, here empty
    characters = []
    for index, run in enumerate(runs):
        value = run - runs[index - 2] if index > 2 else run
        more = True
        while more:
            group, value = value & 0x1F, value >> 5
            more = value != -1 if group & 0x10 else value != 0
            characters.append(chr(group + 48 + 0x20 * more))
    return {"size": [height, width], "counts": "".join(characters)}


def mask_iou(predicted: Mask | Mapping, truth: Mask | Mapping) -> float:
    """Intersection over union of two masks of one image (1.0 when both are empty).

    >>> mask_iou({"size": [3, 2], "counts": "141"}, {"size": [3, 2], "counts": "15"})  # 4 pixels of 5
    0.8
    """
    first, second = mask_pixels(predicted), mask_pixels(truth)
    union = np.logical_or(first, second).sum()
    return float(np.logical_and(first, second).sum() / union) if union else 1.0


def mask_area(mask: Mask | Mapping) -> int:
    """The mask's pixel count (pycocotools' `mask.area`): the sum of its foreground runs.

    >>> mask_area({"size": [3, 2], "counts": "141"})
    4
    """
    return int(mask_runs(mask)[1::2].sum())


def brush_rle(pixels: np.ndarray) -> list[int]:
    """A boolean H x W mask in Label Studio's brush encoding: the RGBA bytes (each pixel 0 or 255 in all four),
    row by row, run-length encoded as thi.ng's rle-pack, the format of `brushlabels`' `value.rle`.

    The header is the value count (32 bits), the word size less one (5 bits) and each run-length field's size
    less one (4 bits each); each run is `1`, the index of the smallest field that holds its length less one
    (2 bits), that length less one, and its value (8 bits). A run longer than 65,536 values is split. The
    bits are padded to whole bytes with 1 to 8 zeros, as label-studio-sdk's `brush.encode_rle` pads them.

    >>> brush_rle(np.array([[True, False]]))
    [0, 0, 0, 8, 57, 27, 252, 127, 241, 128, 0]
    """
    values = np.asarray(pixels, dtype=bool).ravel()  # each pixel is four equal bytes: runs four times as long
    bits = [f"{4 * len(values):032b}{BRUSH_WORD_BITS - 1:05b}", *(f"{size - 1:04b}" for size in BRUSH_RUN_BITS)]
    starts = np.concatenate(([0], np.flatnonzero(values[1:] != values[:-1]) + 1))
    lengths = 4 * np.diff(np.concatenate((starts, [len(values)])))
    for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
        word = "11111111" if values[start] else "00000000"
        while length > 0:
            part = min(length, 1 << BRUSH_RUN_BITS[-1])
            field = next(index for index, size in enumerate(BRUSH_RUN_BITS) if part <= 1 << size)
            bits.append(f"1{field:02b}{part - 1:0{BRUSH_RUN_BITS[field]}b}{word}")
            length -= part
    stream = "".join(bits)
    stream += "0" * (8 - len(stream) % 8)
    return list(int(stream, 2).to_bytes(len(stream) // 8, "big"))


def outline(pixels: np.ndarray) -> list[tuple[float, float]]:
    """The boundary of the mask's largest part (by area, holes ignored) as (x, y) pixel points, or [] when empty.

    The boundary is traced (contourpy's marching squares at 0.5) through the midpoints between the part's
    edge pixels and their neighbours, so it runs along pixel edges, cutting each corner by half a pixel;
    points on a straight run are dropped.

    >>> outline(np.pad(np.ones((2, 3), bool), 1))
    [(1.0, 1.5), (1.5, 1.0), (3.5, 1.0), (4.0, 1.5), (4.0, 2.5), (3.5, 3.0), (1.5, 3.0), (1.0, 2.5)]
    """
    import contourpy

    pixels = np.asarray(pixels, dtype=bool)
    rows, columns = np.flatnonzero(pixels.any(axis=1)), np.flatnonzero(pixels.any(axis=0))
    if not len(rows):
        return []
    cropped = pixels[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1]  # traced where the mask is, then moved back
    grid = np.pad(cropped.astype(np.float64), 1)  # closed rings where the mask meets the image's edge
    tracer = contourpy.contour_generator(z=grid, fill_type=contourpy.FillType.OuterOffset)
    points, offsets = tracer.filled(0.5, 1.5)
    rings = [part[:ring[1]] for part, ring in zip(points, offsets, strict=True)]  # each part's outer ring
    largest = max(rings, key=ring_area)[:-1] - 0.5 + [columns[0], rows[0]]  # open, on pixel edges, in the image
    before, after = largest - np.roll(largest, 1, axis=0), np.roll(largest, -1, axis=0) - largest
    turning = before[:, 0] * after[:, 1] != before[:, 1] * after[:, 0]
    return [(float(x), float(y)) for x, y in largest[turning]]


def ring_area(ring: np.ndarray) -> float:
    """The area a closed ring of points encloses (the shoelace formula)."""
    x, y = ring[:, 0], ring[:, 1]
    return abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))) / 2
