"""Where the benchmark prompts run: the engine in this process, or a kosmos-serve service over HTTP; or, to measure a
segmenter alone, no Kosmos-2 at all (`TrueBoxBackend`: each phrase given its true boxes, masked by the segmenter).

Both send each example's task as it gives it (`Example.task_input()`: the grounding benchmarks' prompts exactly as
written, task `raw` with `grounding: false`; the detection benchmark's phrases, task `detection`; the ocr benchmark's
task `ocr`) and hand back the raw generation and the entities transformers' `post_process_generation` finds in it,
with their normalised boxes and, where the parameters set `min_score`, each box's score (and with `masks`, each box's
mask); for `ocr`, the lines read, each with its box in pixels. Images are read as their pixels are stored, without
applying an EXIF rotation: COCO's and Flickr30k's boxes are drawn on the stored pixels (the service is sent a PNG of
those pixels when a file carries a rotation, its bytes as they are otherwise).
"""

from __future__ import annotations

import base64
import io
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
from PIL import ExifTags, Image

from kosmos_serve.engine import Engine, Request, Segmenter
from kosmos_serve.errors import KosmosServeError
from kosmos_serve.generation import GenerationParams
from kosmos_serve.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    check_pixel_count,
    decode_fully,
    image_digest,
    open_lazily,
    viewable_rgb,
)
from kosmos_serve.tasks import Task, TaskInput

NormalisedBox = tuple[float, float, float, float]
PixelBox = tuple[int, int, int, int]
IMAGES_KEPT = 16  # decoded images kept: Flickr30k asks five captions' phrases of one image in a row
SERVICE_CONCURRENCY = 8  # requests in flight at once: the service batches them
BUSY_RETRIES = 30
TRUE_BOXES = "true boxes"  # the model of a run that gives the segmenter the true boxes: no Kosmos-2


class EvaluationError(KosmosServeError):
    """The evaluation cannot go on (the service is unreachable or refuses every request); the message says why."""

    status = 503
    code = "evaluation_failed"


@dataclass(frozen=True)
class Generation:
    """What the model wrote for one prompt: the text after `</image>` and its entities (phrase, normalised boxes)."""

    raw_text: str
    entities: tuple[tuple[str, tuple[NormalisedBox, ...]], ...]
    image_size: tuple[int, int]
    scores: tuple[tuple[float, ...], ...] = ()  # one tuple per entity, one score per box (asked with min_score)
    masks: tuple[tuple[dict, ...], ...] = ()  # one tuple per entity, one COCO RLE per box (asked with masks)
    lines: tuple[tuple[str, PixelBox], ...] = ()  # task ocr: each line's text and box (pixels), in the order read


@dataclass(frozen=True)
class Skipped:
    """An example that could not be run, and why (the image is missing or unreadable)."""

    reason: str


def load_stored_pixels(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """An image file's pixels as stored, in RGB: every mode handled as `load_image` does, but no EXIF rotation."""
    with open_lazily(path) as image:
        check_pixel_count(image.size, max_pixels)
        decode_fully(image)
        image.getexif().pop(ExifTags.Base.Orientation, None)  # `viewable_rgb` reads this same (cached) Exif
        return viewable_rgb(image)


def has_rotation(path: Path) -> bool:
    """Whether an image file asks viewers to rotate or mirror it (an EXIF orientation other than 1)."""
    with open_lazily(path) as image:
        return image.getexif().get(ExifTags.Base.Orientation, 1) != 1


class ImageStore:
    """The last few images read, so the phrases of one image read its file once; a failure is kept as a Skipped."""

    def __init__(self, read, capacity: int = IMAGES_KEPT):
        self.read, self.capacity = read, capacity
        self._kept: OrderedDict[Path, object] = OrderedDict()

    def get(self, path: Path):
        """`read(path)`, or a Skipped saying why it failed."""
        if path not in self._kept:
            if not path.is_file():
                value = Skipped(f"image not found: {path}")
            else:
                try:
                    value = self.read(path)
                except KosmosServeError as error:
                    value = Skipped(f"{path}: {error.message}")
            self._kept[path] = value
            while len(self._kept) > self.capacity:
                self._kept.popitem(last=False)
        self._kept.move_to_end(path)
        return self._kept[path]


class LocalBackend:
    """The engine in this process: prompts run in batches, each image encoded once (the engine's feature cache)."""

    def __init__(self, engine: Engine, params: GenerationParams):
        self.engine, self.params = engine, params
        self.model = engine.settings.model
        self.family, self.tasks = engine.family.name, tuple(task.value for task in engine.family.tasks)
        self.images = ImageStore(lambda path: load_stored_pixels(path, engine.settings.max_image_pixels))

    def generate(self, examples: Sequence) -> list[Generation | Skipped]:
        """Each example's generation (one `Engine.run` for the whole batch), or why it was skipped."""
        outcomes: list[Generation | Skipped | None] = []
        requests, positions = [], []
        for position, example in enumerate(examples):
            image = self.images.get(example.image_path)
            outcomes.append(image if isinstance(image, Skipped) else None)
            if not isinstance(image, Skipped):
                requests.append(Request(image, example.task_input(), self.params))
                positions.append(position)
        for position, result in zip(positions, self.engine.run(requests) if requests else []):
            entities = tuple((e.phrase, tuple(e.boxes)) for e in result.entities)
            scores = tuple(tuple(e.scores) for e in result.entities) if self.params.min_score is not None else ()
            masks = tuple(tuple(m.to_dict() for m in e.masks) for e in result.entities) if self.params.masks else ()
            lines = tuple((line.text, line.box) for line in result.lines)
            outcomes[position] = Generation(result.raw_text, entities, tuple(result.image_size), scores, masks, lines)
        return outcomes

    def close(self) -> None:
        """Nothing to release: the engine belongs to the caller."""


class TrueBoxBackend:
    """No Kosmos-2: each phrase asked of an image "finds" its true boxes, each masked by the segmenter and scored by
    the segmenter's own score (detection examples; `evaluate --masks-from-true-boxes`, the segmenter alone)."""

    def __init__(self, segmenter: Segmenter, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.segmenter, self.model = segmenter, TRUE_BOXES
        self.images = ImageStore(lambda path: load_stored_pixels(path, max_pixels))

    def generate(self, examples: Sequence) -> list[Generation | Skipped]:
        """Each example's true boxes as its generation, with their masks (one decoder call per image)."""
        return [self._one(example) for example in examples]

    def _one(self, example) -> Generation | Skipped:
        image = self.images.get(example.image_path)
        if isinstance(image, Skipped):
            return image
        asked = [item for item in example.asked if item.truth]
        segmented = iter(self.segmenter.segment(image, image_digest(image), [b for item in asked for b in item.truth]))
        width, height = image.size
        entities, scores, masks = [], [], []
        for item in asked:
            mine = [next(segmented) for _ in item.truth]
            entities.append((item.phrase, tuple((x1 / width, y1 / height, x2 / width, y2 / height)
                                                for x1, y1, x2, y2 in item.truth)))
            scores.append(tuple(score for _, score in mine))
            masks.append(tuple(mask.to_dict() for mask, _ in mine))
        return Generation("", tuple(entities), (width, height), tuple(scores), tuple(masks))

    def close(self) -> None:
        """Nothing to release."""


class ServiceBackend:
    """A running kosmos-serve service: a `POST /v1/generate` per prompt, several in flight for the service to batch."""

    def __init__(self, url: str, params: GenerationParams, concurrency: int = SERVICE_CONCURRENCY,
                 timeout: float = 600, api_key: str | None = None):
        self.url, self.params, self.concurrency = url.rstrip("/"), params, concurrency
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        info = self._call("GET", "/info")
        self.model = info.json().get("model", self.url)
        self.family, self.tasks = info.json().get("family"), info.json().get("tasks")  # None from older services
        self.images = ImageStore(self._payload)

    def _call(self, method: str, route: str, **kwargs):
        """One HTTP call; a service busy or still loading is waited for, one that cannot be reached is an error."""
        for _ in range(BUSY_RETRIES):
            try:
                response = self.client.request(method, route, **kwargs)
            except httpx.TransportError as error:
                raise EvaluationError(f"The service at {self.url} cannot be reached ({type(error).__name__}); is "
                                      "`kosmos-serve serve` running there?") from None
            if response.status_code != 503:
                break
            time.sleep(min(float(response.headers.get("Retry-After", 1)), 10.0))
        if response.status_code in (401, 404, 405):
            raise EvaluationError(f"{self.url}{route} answered {response.status_code}: {_message(response)} (an API "
                                  "key goes in KOSMOS_API_KEY; --url is a kosmos-serve service's address).")
        return response

    @staticmethod
    def _payload(path: Path) -> str:
        """The image as base64: the file's bytes, or a PNG of its stored pixels when the file carries a rotation."""
        if not has_rotation(path):
            return base64.b64encode(path.read_bytes()).decode("ascii")
        buffer = io.BytesIO()
        load_stored_pixels(path).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    def generate(self, examples: Sequence) -> list[Generation | Skipped]:
        """Each example's generation, `concurrency` requests in flight at a time, or why it was skipped."""
        payloads = [self.images.get(example.image_path) for example in examples]
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="evaluate-http") as pool:
            return list(pool.map(self._one, examples, payloads))

    def _one(self, example, payload) -> Generation | Skipped:
        if isinstance(payload, Skipped):
            return payload
        body = {"image": payload, **task_body(example.task_input()), "max_new_tokens": self.params.max_new_tokens,
                "no_repeat_ngram_size": self.params.no_repeat_ngram_size}
        if self.params.min_score is not None:
            body["min_score"] = self.params.min_score
        response = self._call("POST", "/v1/generate", json=body)
        if response.status_code in (400, 413):  # this image: not decodable or too large for the service
            return Skipped(f"{example.image_path}: the service refused it: {_message(response)}")
        if response.status_code != 200:
            raise EvaluationError(f"The service answered {response.status_code} to /v1/generate: {_message(response)}")
        answer = response.json()
        entities = tuple((e["phrase"], tuple(tuple(b) for b in e["boxes"])) for e in answer["entities"])
        scores = () if self.params.min_score is None else tuple(tuple(e.get("scores", ())) for e in answer["entities"])
        lines = tuple((line["text"], tuple(line["box"])) for line in answer.get("lines") or ())
        return Generation(answer["raw_text"], entities, tuple(answer["image_size"]), scores, lines=lines)

    def close(self) -> None:
        """Close the HTTP connections."""
        self.client.close()


def task_body(task: TaskInput) -> dict:
    """The fields of a `/v1/generate` body that say what to do: a raw prompt as written, a detection's phrases, or
    task ocr.

    >>> task_body(TaskInput(Task.DETECTION, phrases=("the red circle",))), task_body(TaskInput(Task.OCR))
    ({'task': 'detection', 'phrases': ['the red circle']}, {'task': 'ocr'})
    """
    if task.task == Task.DETECTION:
        return {"task": "detection", "phrases": list(task.phrases)}
    if task.task == Task.OCR:
        return {"task": "ocr"}
    return {"task": "raw", "prompt": task.prompt, "grounding": task.grounding}


def _message(response) -> str:
    """The service's own error message, else the start of the body."""
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:200]
