"""Kosmos-2.5's readings -> text, and for `<ocr>` every line with its box in pixels of the original image.

Read with `<ocr>`, Kosmos-2.5 writes each line after its box, in pixels of the image as its processor
resized it: `<bbox><x_53><y_573><x_69><y_606></bbox>1\\n`. Lines and boxes are parsed and scaled as
transformers' model doc does it (`post_process` in docs/source/en/model_doc/kosmos2_5.md):
- the prompt is removed from the decoded text wherever it occurs;
- each box owns the text up to the next box (here without the line break that ends it); text before
  the first box belongs to no line;
- a box with x1 >= x2 or y1 >= y2 is dropped with its line;
- a coordinate is multiplied by original size / resized size, in float32 as the doc's tensors compute
  it (`scale_coordinate`), and truncated.
Read with `<md>`, it writes markdown, kept as written; so does Kosmos-2.5-chat's answer to a question (its prompt
begins with `<md>`).
"""

from __future__ import annotations

import math
import re
import struct

from kosmos_serve.grounding import GroundedText, TextLine

OCR_TAG = "<ocr>"  # the prompt that reads every line with its box
MARKDOWN_TAG = "<md>"  # the prompt that reads the page as markdown
# Kosmos-2.5-chat's prompt for a question about the page (transformers' model doc, "Chat version"); it answers in markdown
CHAT_TEMPLATE = ("<md>A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions. USER: {} ASSISTANT:")
BOX_PATTERN = re.compile(r"<bbox><x_\d+><y_\d+><x_\d+><y_\d+></bbox>")
MAX_PATCHES = 4096  # what Kosmos2_5Processor asks of its image processor unless told (the checkpoints' own)
PATCH_SIZE = 16


def resized_size(width: int, height: int, max_patches: int = MAX_PATCHES, patch_size: int = PATCH_SIZE) -> tuple[int, int]:
    """The size Kosmos-2.5's image processor resizes a `width` x `height` image to: the most whole patches that fit
    in `max_patches` at the image's aspect ratio (its `extract_flattened_patches`).

    >>> resized_size(300, 200), resized_size(1000, 1000), resized_size(4000, 10)
    ((1248, 832), (1024, 1024), (20480, 48))
    """
    scale = math.sqrt(max_patches * (patch_size / height) * (patch_size / width))
    rows = max(min(math.floor(scale * height / patch_size), max_patches), 1)
    columns = max(min(math.floor(scale * width / patch_size), max_patches), 1)
    return columns * patch_size, rows * patch_size


def scale_coordinate(coordinate: int, original: int, resized: int) -> int:
    """A coordinate on a side of `resized` pixels, on the original side of `original` pixels, as the doc computes it:
    `int(coordinate * (original / resized))` with `resized` a float32 tensor, so `original / resized` is torch's
    `resized.reciprocal() * original`, each step rounded to float32.

    >>> scale_coordinate(573, 1000, 1024), scale_coordinate(26, 480, 832), scale_coordinate(880, 480, 880)
    (559, 15, 479)

    (Exactly, the last two are 15 and 480; in float64, 14 and 480.)
    """
    factor = _float32(_float32(1 / resized) * original)
    return int(_float32(coordinate * factor))


def _float32(value: float) -> float:
    """`value` rounded to the nearest float32 (one float32 operation's result, from its exact float64 one)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def read_lines(text: str, width: int, height: int, max_patches: int = MAX_PATCHES) -> tuple[TextLine, ...]:
    """The lines of an `<ocr>` reading (`text`: its prompt removed) of a `width` x `height` image, boxes in its pixels
    (`max_patches`: the patches the processor cut the image into at most).

    >>> read_lines("<bbox><x_53><y_573><x_69><y_606></bbox>1\\n<bbox><x_79><y_573><x_464><y_612></bbox>[REG] BLACK SAKURA\\n",
    ...            1000, 1000)
    (TextLine(text='1', box=(51, 559, 67, 591), score=0.0), TextLine(text='[REG] BLACK SAKURA', box=(77, 559, 453, 597), score=0.0))
    >>> read_lines("a title<bbox><x_9><y_5><x_9><y_8></bbox>empty box\\n<bbox><x_100><y_200><x_300><y_400></bbox>last", 300, 200)
    (TextLine(text='last', box=(24, 48, 72, 96), score=0.0),)
    """
    resized_width, resized_height = resized_size(width, height, max_patches)
    boxes = [tuple(int(number) for number in re.findall(r"\d+", box)) for box in BOX_PATTERN.findall(text)]
    segments = BOX_PATTERN.split(text)[1:]
    lines = []
    for (x1, y1, x2, y2), segment in zip(boxes, segments):
        if x1 >= x2 or y1 >= y2:
            continue
        box = (scale_coordinate(x1, width, resized_width), scale_coordinate(y1, height, resized_height),
               scale_coordinate(x2, width, resized_width), scale_coordinate(y2, height, resized_height))
        lines.append(TextLine(segment.removesuffix("\n"), box))
    return tuple(lines)


def parse_reading(decoded_text: str, prompt: str, width: int, height: int, max_patches: int = MAX_PATCHES) -> GroundedText:
    """A Kosmos-2.5 reading of a `width` x `height` image cut into at most `max_patches` patches: `decoded_text` is the
    whole sequence decoded without special tokens (prompt included), as `processor.batch_decode(ids,
    skip_special_tokens=True)` gives it.

    For `<ocr>`, `text` is the reading without its boxes, `lines` each line with its box, and `markdown` each line
    linked to its box; for `<md>`, `text` and `markdown` are the markdown the model wrote. `raw_text` keeps the prompt.

    >>> reading = parse_reading("<ocr><bbox><x_79><y_573><x_464><y_612></bbox>SUB TOTAL\\n", "<ocr>", 1000, 1000)
    >>> reading.text, reading.lines, reading.markdown
    ('SUB TOTAL\\n', (TextLine(text='SUB TOTAL', box=(77, 559, 453, 597), score=0.0),), '[SUB TOTAL](#box=77,559,453,597)')
    >>> parse_reading("<md># Receipt\\n\\n**Total** 50,000", "<md>", 1000, 1000).markdown
    '# Receipt\\n\\n**Total** 50,000'
    """
    reading = decoded_text.replace(prompt, "")
    if not prompt.startswith(OCR_TAG):
        return GroundedText(text=reading, answer=reading, raw_text=decoded_text, entities=(), markdown=reading)
    lines = read_lines(reading, width, height, max_patches)
    text = BOX_PATTERN.sub("", reading)
    return GroundedText(text=text, answer=text, raw_text=decoded_text, entities=(), markdown=lines_markdown(lines),
                        lines=lines)


def lines_markdown(lines: tuple[TextLine, ...]) -> str:
    """An `<ocr>` reading's markdown: each line linked to its box, one per line.

    >>> lines_markdown((TextLine("SUB TOTAL", (77, 559, 453, 597)), TextLine("50,000", (500, 559, 640, 597))))
    '[SUB TOTAL](#box=77,559,453,597)\\n[50,000](#box=500,559,640,597)'
    """
    return "\n".join(f"[{line.text}](#box={','.join(map(str, line.box))})" for line in lines)
