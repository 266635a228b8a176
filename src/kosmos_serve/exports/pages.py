"""Annotated images -> one text or markdown file per image: the record's `text` or `markdown` (for task ocr, the
reading without its boxes, or each line linked to its box; for markdown, the page as the model wrote it)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from kosmos_serve.errors import InvalidRequestError
from kosmos_serve.exports.records import AnnotatedImage

PAGE_SUFFIXES = {"text": ".txt", "markdown": ".md"}  # the formats, and the suffix each gives an image's name


def page_name(image_name: str, format_name: str) -> str:
    """The file of an image (its name relative to the export's folder) in a format: the suffix replaced.

    >>> page_name("scans/page 1.png", "markdown"), page_name("receipt", "text")
    ('scans/page 1.md', 'receipt.txt')
    """
    return PurePosixPath(image_name).with_suffix(PAGE_SUFFIXES[format_name]).as_posix()


def page_text(image: AnnotatedImage, format_name: str) -> str:
    """What an image's file holds: its text or markdown, ended by a line break (none when it is empty).

    >>> page_text(AnnotatedImage("a.png", "/a.png", 9, 9, "demo", "none", (), text="SUB TOTAL\\nTOTAL"), "text")
    'SUB TOTAL\\nTOTAL\\n'
    """
    text = image.text if format_name == "text" else image.markdown
    return text if not text or text.endswith("\n") else text + "\n"


def page_files(images: Sequence[AnnotatedImage], format_name: str, folder: Path) -> dict[Path, str]:
    """Each image's file under `folder` (its name, relative to the export's folder, with the format's suffix) and
    what it holds; two images whose names differ only in their suffix are an InvalidRequestError."""
    files: dict[Path, str] = {}
    named: dict[str, str] = {}
    for image in images:
        name = page_name(image.name, format_name)
        if name in named:
            raise InvalidRequestError(f"{named[name]} and {image.name} would both be written to {name}; rename one, "
                                      "or export them apart.")
        named[name] = image.name
        files[folder / name] = page_text(image, format_name)
    return files
