"""INPUT arguments -> the images to annotate: folders, globs, image files and manifests.

- a folder is searched recursively (symlinked folders too, each real folder once; hidden files and
  folders, whose names start with a dot, are left out) for every extension PIL can decode;
- a glob (`photos/**/*.jpg`, quoted so the shell leaves it alone) takes the image files it matches and
  searches the folders it matches;
- an image file is taken whatever its extension (it is named, so it is meant);
- a `.txt` manifest names one image per line (blank lines and `#` comments skipped);
- a `.jsonl` manifest holds one object per line: `image` (required), and the image's own `phrases`
  (a list of strings) and `prompt`, which replace the command's for that image; other keys are ignored.

Paths in a manifest are relative to the manifest's folder. An image reached twice (a folder and a glob
over it) is annotated once, unless its two mentions ask for different phrases or prompts: that is an error.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from PIL import Image, ImageFile

from kosmos_serve.errors import InvalidRequestError

NOT_IMAGES = frozenset({"MPEG"})  # PIL identifies MPEG video but decodes no frame of it
ONTOLOGY_EXAMPLE = '{"a red car": "car", "a person on a bike": "cyclist"}'


@dataclass(frozen=True)
class ImageEntry:
    """One image to annotate: its path as given, where it really is, and its own inputs (from a JSONL manifest)."""

    path: str
    resolved: Path
    origin: str  # where it was named, for messages: the INPUT, or "list.jsonl line 3"
    phrases: tuple[str, ...] | None = None
    prompt: str | None = None


@cache
def image_extensions() -> frozenset[str]:
    """Lower-case extensions (with the dot) of every format PIL can decode, stubs of data formats left out.

    >>> {".png", ".jpg", ".jpeg", ".webp", ".tif", ".bmp", ".gif"} <= image_extensions()
    True
    >>> ".h5" in image_extensions() or ".mpg" in image_extensions()
    False
    """
    Image.init()
    decodable = {
        name for name, (factory, _accept) in Image.OPEN.items()
        if name not in NOT_IMAGES and not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))
    }
    return frozenset(ext for ext, name in Image.registered_extensions().items() if name in decodable)


def is_image_name(name: str) -> bool:
    """Whether a file name has an extension PIL decodes (any case).

    >>> is_image_name("cat.JPG"), is_image_name("notes.txt")
    (True, False)
    """
    return os.path.splitext(name)[1].lower() in image_extensions()


def collect_images(inputs: Sequence[str]) -> list[ImageEntry]:
    """Every image the INPUT arguments name, in order, each once; an INPUT that names nothing is an error."""
    entries: dict[Path, ImageEntry] = {}
    for given in inputs:
        for entry in expand_input(given):
            first = entries.setdefault(entry.resolved, entry)
            if (first.phrases, first.prompt) != (entry.phrases, entry.prompt):
                raise InvalidRequestError(
                    f"{entry.origin} names {entry.path} again (first in {first.origin}) with other phrases or prompt; "
                    "give each image once, with all its phrases."
                )
    if not entries:
        raise InvalidRequestError(
            f"No images found in {', '.join(inputs)}. Give folders (searched recursively for image files such as "
            ".jpg, .png, .webp, .tif), globs, image files, or manifests (.txt, .jsonl)."
        )
    return list(entries.values())


def expand_input(given: str) -> list[ImageEntry]:
    """The images one INPUT argument names."""
    expanded = os.path.expanduser(given)
    path = Path(expanded)
    if path.is_dir():
        return list(folder_images(expanded, given))
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".txt":
            return text_manifest(path, given)
        if suffix == ".jsonl":
            return jsonl_manifest(path, given)
        return [ImageEntry(given, path.resolve(), given)]
    if glob.has_magic(expanded):
        matches = sorted(glob.glob(expanded, recursive=True))
        if not matches:
            raise InvalidRequestError(f"{given!r} matches no files.")
        entries = []
        for match in matches:
            if os.path.isdir(match):
                entries.extend(folder_images(match, given))
            elif is_image_name(match):
                entries.append(ImageEntry(match, Path(match).resolve(), given))
        return entries
    raise InvalidRequestError(
        f"{given}: no such file or folder. INPUT is a folder, a glob, an image file or a manifest (.txt, .jsonl)."
    )


def folder_images(folder: str, origin: str) -> Iterator[ImageEntry]:
    """Image files under `folder`, recursively and sorted, as `folder/relative/path`."""
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a symlink loop, or a second link to a folder already searched
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and is_image_name(name):
                path = os.path.join(root, name)
                yield ImageEntry(path, Path(path).resolve(), origin)


def manifest_lines(manifest: Path, given: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line that is not a `#` comment; undecodable text names its line."""
    try:
        data = manifest.read_bytes()
    except OSError as error:
        raise InvalidRequestError(f"Manifest {given} cannot be read ({error.strerror}).") from None
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
        except UnicodeDecodeError:
            raise InvalidRequestError(f"{given} line {number} is not UTF-8 text.") from None
        if "\0" in line:
            raise InvalidRequestError(f"{given} line {number} holds a NUL byte; a manifest is text, one path a line.")
        if line and not line.startswith("#"):
            yield number, line


def text_manifest(manifest: Path, given: str) -> list[ImageEntry]:
    """A `.txt` manifest: one image path per line, relative to the manifest's folder."""
    return [ImageEntry(line, _beside(manifest, line), f"{given} line {number}")
            for number, line in manifest_lines(manifest, given)]


def jsonl_manifest(manifest: Path, given: str) -> list[ImageEntry]:
    """A `.jsonl` manifest: `{"image": path, "phrases": [...], "prompt": "..."}` per line, the last two optional."""
    entries = []
    for number, line in manifest_lines(manifest, given):
        where = f"{given} line {number}"
        try:
            item = json.loads(line)
        except ValueError as error:
            raise InvalidRequestError(f"{where} is not valid JSON ({error}).") from None
        if not isinstance(item, dict):
            raise InvalidRequestError(f'{where} is not a JSON object; write {{"image": "path/to/image.jpg"}}.')
        image, phrases, prompt = item.get("image"), item.get("phrases"), item.get("prompt")
        if not isinstance(image, str) or not image.strip():
            raise InvalidRequestError(f'{where} has no "image" (the path of the image, a string).')
        if phrases is not None and not (isinstance(phrases, list) and all(isinstance(p, str) for p in phrases)):
            raise InvalidRequestError(f'{where}: "phrases" must be a list of strings, e.g. ["a red car", "a dog"].')
        if prompt is not None and not isinstance(prompt, str):
            raise InvalidRequestError(f'{where}: "prompt" must be a string.')
        entries.append(ImageEntry(image, _beside(manifest, image.strip()), where,
                                  phrases=tuple(phrases) if phrases else None, prompt=prompt or None))
    return entries


def _beside(manifest: Path, name: str) -> Path:
    """A manifest's path `name`, absolute: relative ones start from the manifest's folder."""
    return (manifest.parent / os.path.expanduser(name)).resolve()


def read_ontology(path: Path) -> dict[str, str]:
    """An ontology file: a JSON object mapping each prompt phrase to a class name, as autodistill's CaptionOntology.

    Keys and class names are stripped of surrounding spaces; several phrases may share a class.
    """
    shape = f"--ontology {path} must be a JSON object mapping each prompt phrase to a class name, e.g. {ONTOLOGY_EXAMPLE}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise InvalidRequestError(f"--ontology {path} cannot be read ({error.strerror}).") from None
    except ValueError as error:  # UnicodeDecodeError included
        raise InvalidRequestError(f"{shape}; it is not JSON ({error}).") from None
    if not isinstance(data, dict):
        raise InvalidRequestError(f"{shape}; it holds a {type(data).__name__}.")
    if not data:
        raise InvalidRequestError(f"{shape}; it is empty.")
    for phrase, name in data.items():
        if not phrase.strip():
            raise InvalidRequestError(f"{shape}; one of its phrases is empty.")
        if not isinstance(name, str) or not name.strip():
            raise InvalidRequestError(f"{shape}; the class of {phrase!r} is not a non-empty string.")
    return {phrase.strip(): name.strip() for phrase, name in data.items()}
