"""The official Flickr30k Entities annotations (BryanPlummer/flickr30k_entities): sentences with typed phrases, boxes.

`Sentences/<image id>.txt` holds an image's five captions, each phrase written
`[/EN#<phrase id>/<type>[/<type>] words]`; `Annotations/<image id>.xml` holds the boxes of each phrase id
(`<object><name>id</name><bndbox>...`). The original
Kosmos-2 evaluation (`flickr_entities/flickr_entities_evaluate.py`) reads its ground truth and entity types from these
files (boxes kept apart, `merge_boxes=False`); MDETR's JSON has the boxes but not the types.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from kosmos_serve.evaluation.datasets import AnnotationFormatError

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Phrase:
    """One annotated phrase of a sentence: its words, its id (shared with its boxes) and its entity types."""

    text: str
    phrase_id: str
    types: tuple[str, ...]


def parse_sentence(line: str) -> list[Phrase]:
    """The phrases of one line of a Sentences file.

    >>> for phrase in parse_sentence("[/EN#18/people A man] in [/EN#19/clothing/other a blue shirt] smiles ."):
    ...     print(phrase)
    Phrase(text='A man', phrase_id='18', types=('people',))
    Phrase(text='a blue shirt', phrase_id='19', types=('clothing', 'other'))
    """
    phrases, words, head = [], [], None
    for token in line.split():
        if head is None and token.startswith("["):
            head = token.split("/")
            continue
        if head is not None and token.endswith("]"):
            words.append(token[:-1])
            phrases.append(Phrase(" ".join(words), head[1][3:], tuple(head[2:])))
            head, words = None, []
        elif head is not None:
            words.append(token)
    return phrases


def parse_boxes(path: Path) -> dict[str, list[Box]]:
    """Phrase id -> its boxes `(xmin, ymin, xmax, ymax)` from an Annotations XML file (no entry for boxless ones)."""
    boxes: dict[str, list[Box]] = {}
    for element in ET.parse(path).getroot().iter("object"):
        box = element.find("bndbox")
        if box is None:
            continue
        corners = tuple(float(box.findtext(name)) for name in ("xmin", "ymin", "xmax", "ymax"))
        for name in element.findall("name"):
            boxes.setdefault(name.text.strip(), []).append(corners)
    return boxes


class FlickrEntities:
    """The official annotations folder, read one image at a time as the evaluation needs it."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if not (self.folder / "Sentences").is_dir() or not (self.folder / "Annotations").is_dir():
            raise AnnotationFormatError(
                f"--flickr-entities {folder} has no Sentences/ and Annotations/ folders; give the folder of the "
                "official Flickr30k Entities annotations (github.com/BryanPlummer/flickr30k_entities, annotations.zip "
                "unpacked)."
            )
        self._image = lru_cache(maxsize=64)(self._read_image)

    def _read_image(self, image_id: str) -> tuple[list[list[Phrase]], dict[str, list[Box]]]:
        sentences = self.folder / "Sentences" / f"{image_id}.txt"
        annotations = self.folder / "Annotations" / f"{image_id}.xml"
        for path in (sentences, annotations):
            if not path.is_file():
                raise AnnotationFormatError(
                    f"--flickr-entities has no {path.relative_to(self.folder)} for image {image_id}.")
        lines = [line for line in sentences.read_text(encoding="utf-8").split("\n") if line]
        try:
            boxes = parse_boxes(annotations)
        except (ET.ParseError, TypeError, ValueError) as error:
            raise AnnotationFormatError(
                f"{annotations} is not a Flickr30k Entities annotation file ({error}).") from None
        return [parse_sentence(line) for line in lines], boxes

    def truth(self, image_id: str, sentence_id: int, phrase: str) -> tuple[list[Box], tuple[str, ...]]:
        """The true boxes and entity types of `phrase` in a caption: its first boxed phrase with these words."""
        sentences, boxes = self._image(str(image_id))
        if not 0 <= sentence_id < len(sentences):
            raise AnnotationFormatError(f"Sentences/{image_id}.txt has no sentence {sentence_id}.")
        for candidate in sentences[sentence_id]:
            if candidate.text == phrase and candidate.phrase_id in boxes:
                return boxes[candidate.phrase_id], candidate.types
        raise AnnotationFormatError(
            f"Sentences/{image_id}.txt sentence {sentence_id} has no boxed phrase {phrase!r}; do the MDETR file and "
            "the Flickr30k Entities folder belong together?"
        )
