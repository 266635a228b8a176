"""The inference core: prepared prompts -> batched `generate` -> grounded results.

One `Engine.run` call takes any mix of tasks, prompts, images and generation parameters. Vision
features are computed once per distinct image (and kept in an LRU across calls); prompts with
the same generation parameters share left-padded batches; every result equals the request run
alone through transformers' own `generate` + `post_process_generation`.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from kosmos_serve.config import EngineSettings
from kosmos_serve.errors import InvalidRequestError
from kosmos_serve.generation import (
    GenerationParams,
    ModelDefaults,
    generation_kwargs,
    read_model_defaults,
    resolve_defaults,
)
from kosmos_serve.grounding import Entity, GroundedText, parse_generation, render_markdown
from kosmos_serve.images import image_digest
from kosmos_serve.loading import load_model, resolve_source
from kosmos_serve.tasks import PromptSpec, Task, TaskInput, build_prompts, parse_task

# Token ids do not depend on pixels: tokenising against this placeholder runs the processor's own
# text path (tags, location tokens, image slots) without preprocessing the real image per prompt.
_TOKENISATION_PLACEHOLDER = Image.new("RGB", (1, 1))


def tokenise(processor, text: str, bboxes=None) -> tuple[list[int], list[int]]:
    """Token ids and image-position mask of a prompt, exactly as the processor makes them with an image."""
    encoded = processor(text=text, images=_TOKENISATION_PLACEHOLDER, bboxes=bboxes)
    return encoded["input_ids"], encoded["image_embeds_position_mask"]


@dataclass(frozen=True)
class Request:
    """One image, what to do with it, and how to decode."""

    image: Image.Image
    task: TaskInput = field(default_factory=TaskInput)
    params: GenerationParams = field(default_factory=GenerationParams)


@dataclass(frozen=True)
class Timings:
    """Seconds spent on this request's image features and on the generate call(s) it was part of."""

    vision: float = 0.0
    generation: float = 0.0


@dataclass(frozen=True)
class Result:
    """A grounded answer: reference text and entities, pixel boxes, markdown, sizes and timings."""

    task: Task
    prompt: str
    text: str
    answer: str
    raw_text: str
    entities: tuple[Entity, ...]
    markdown: str
    image_size: tuple[int, int]
    generated_tokens: int
    image_cached: bool
    timings: Timings

    def to_dict(self) -> dict:
        """A JSON-ready dict: entities as objects with normalised and pixel boxes."""
        return {
            "task": self.task.value,
            "prompt": self.prompt,
            "text": self.text,
            "answer": self.answer,
            "raw_text": self.raw_text,
            "entities": [
                {"phrase": e.phrase, "span": list(e.span), "boxes": [list(b) for b in e.boxes],
                 "pixel_boxes": [list(b) for b in e.pixel_boxes]}
                for e in self.entities
            ],
            "markdown": self.markdown,
            "image_size": list(self.image_size),
            "generated_tokens": self.generated_tokens,
            "image_cached": self.image_cached,
            "timings": {"vision_seconds": self.timings.vision, "generation_seconds": self.timings.generation},
        }


@dataclass
class _Row:
    """One prompt to generate: which request it belongs to and its tokenised inputs."""

    request_index: int
    spec: PromptSpec
    image_key: str
    input_ids: list[int]
    image_mask: list[int]
    output: GroundedText | None = None
    generated_tokens: int = 0
    generation_seconds: float = 0.0


class ImageFeatureCache:
    """A bounded LRU of image features (`image_embeds`) keyed by image content digest."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        """The features for `key`, marked as recently used, or None."""
        features = self._entries.get(key)
        if features is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return features

    def put(self, key: str, features: torch.Tensor) -> None:
        """Keep `features`, evicting the least recently used entries beyond capacity."""
        if self.capacity == 0:
            return
        self._entries[key] = features
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every entry and reset the hit and miss counts."""
        self._entries.clear()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)


class Engine:
    """A loaded Kosmos-2 that runs batches of grounded requests."""

    def __init__(self, settings: EngineSettings | None = None):
        self.settings = settings or EngineSettings()
        self.model, self.processor = load_model(self.settings)
        operator = ModelDefaults(max_new_tokens=self.settings.max_new_tokens,
                                 no_repeat_ngram_size=self.settings.no_repeat_ngram_size)
        self.defaults = resolve_defaults(operator, read_model_defaults(resolve_source(self.settings.model)))
        self.device = self.model.device
        self.dtype = self.model.dtype
        self.cache = ImageFeatureCache(self.settings.image_cache_size)
        self.pad_token_id = self.processor.tokenizer.pad_token_id

    def predict(self, image: Image.Image, task: TaskInput | None = None, params: GenerationParams | None = None) -> Result:
        """Run one request."""
        return self.run([Request(image, task or TaskInput(), params or GenerationParams())])[0]

    def run(self, requests: Sequence[Request]) -> list[Result]:
        """Run many requests together; each result equals that request run alone (greedy decoding)."""
        rows = [row for index, request in enumerate(requests) for row in self._prepare(index, request)]
        features, vision_seconds, cached_keys = self._image_features(requests, rows)
        for params, group in self._groups(requests, rows):
            for start in range(0, len(group), self.settings.max_batch_size):
                self._generate(group[start : start + self.settings.max_batch_size], features, params, requests)
        rows_by_request: dict[int, list[_Row]] = {}
        for row in rows:
            rows_by_request.setdefault(row.request_index, []).append(row)
        return [_result(request, rows_by_request[index], vision_seconds, cached_keys)
                for index, request in enumerate(requests)]

    def stream(self, request: Request, on_text: Callable[[str], None], should_stop: Callable[[], bool] | None = None) -> Result:
        """Run one request alone, passing each piece of generated text to `on_text` as it is decoded.

        Its prompts run one at a time (a detection's phrases one after another), so the result
        equals `run([request])[0]` for greedy decoding. `should_stop` is polled after every token:
        when it answers True (the client left), generation ends early.
        """
        rows = self._prepare(0, request)
        features, vision_seconds, cached_keys = self._image_features([request], rows)
        streamer = _TextCallbackStreamer(self.processor.tokenizer, on_text)
        stopping = StoppingCriteriaList([_StopWhen(should_stop)] if should_stop else [])
        for params, group in self._groups([request], rows):
            for row in group:
                self._generate([row], features, params, [request], streamer=streamer, stopping_criteria=stopping)
        return _result(request, rows, vision_seconds, cached_keys)

    def _prepare(self, index: int, request: Request) -> list[_Row]:
        key = image_digest(request.image)
        rows = []
        for spec in check_request(request, self.settings):
            input_ids, image_mask = tokenise(self.processor, spec.text, list(spec.bboxes) if spec.bboxes else None)
            rows.append(_Row(index, spec, key, input_ids, image_mask))
        return rows

    @torch.inference_mode()
    def _image_features(self, requests: Sequence[Request], rows: list[_Row]):
        """Features per image key: from the cache, else encoded in batches; vision seconds per key."""
        features: dict[str, torch.Tensor] = {}
        cached_keys = set()
        missing: dict[str, Image.Image] = {}
        for row in rows:
            if row.image_key in features or row.image_key in missing:
                continue
            cached = self.cache.get(row.image_key)
            if cached is not None:
                features[row.image_key] = cached
                cached_keys.add(row.image_key)
            else:
                missing[row.image_key] = requests[row.request_index].image
        vision_seconds = {}
        keys = list(missing)
        for start in range(0, len(keys), self.settings.max_batch_size):
            chunk = keys[start : start + self.settings.max_batch_size]
            began = time.perf_counter()
            encoded = self.encode_images([missing[key] for key in chunk])
            elapsed = time.perf_counter() - began
            for key, embeds in zip(chunk, encoded.split(1)):  # each (1, latent queries, width)
                features[key] = embeds
                self.cache.put(key, embeds)
                vision_seconds[key] = elapsed
        return features, vision_seconds, cached_keys

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Image features as `generate` computes them: vision -> post-layernorm -> L2 norm -> resampler."""
        pixel_values = self.processor.image_processor(list(images), return_tensors="pt")["pixel_values"]
        return image_features(self.model, pixel_values.to(self.device, self.dtype))

    def with_defaults(self, params: GenerationParams) -> GenerationParams:
        """`params` with each field left to the default (None) filled in from `self.defaults`."""
        return dataclasses.replace(
            params,
            max_new_tokens=params.max_new_tokens or self.defaults.max_new_tokens,
            no_repeat_ngram_size=(self.defaults.no_repeat_ngram_size if params.no_repeat_ngram_size is None
                                  else params.no_repeat_ngram_size),
        )

    def _groups(self, requests: Sequence[Request], rows: list[_Row]) -> list[tuple[GenerationParams, list[_Row]]]:
        """Rows that may share a batch: same parameters; a sampled request always alone (its own seed)."""
        groups: dict[tuple[GenerationParams, int | None], list[_Row]] = {}
        for row in rows:
            params = requests[row.request_index].params
            params = self.with_defaults(params)
            alone = row.request_index if params.do_sample else None
            groups.setdefault((params, alone), []).append(row)
        return [(params, group) for (params, _), group in groups.items()]

    @torch.inference_mode()
    def _generate(self, batch: list[_Row], features: dict, params: GenerationParams, requests, **extra) -> None:
        width = max(len(row.input_ids) for row in batch)
        pads = [width - len(row.input_ids) for row in batch]
        input_ids = torch.tensor([[self.pad_token_id] * p + row.input_ids for p, row in zip(pads, batch)])
        attention_mask = torch.tensor([[0] * p + [1] * len(row.input_ids) for p, row in zip(pads, batch)])
        image_mask = torch.tensor([[0] * p + row.image_mask for p, row in zip(pads, batch)], dtype=torch.bool)
        image_embeds = torch.cat([features[row.image_key] for row in batch])
        began = time.perf_counter()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if params.do_sample and params.seed is not None:
                torch.manual_seed(params.seed)
            output = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                image_embeds=image_embeds,
                image_embeds_position_mask=image_mask.to(self.device),
                use_cache=True,
                **generation_kwargs(params),
                **extra,
            )
        elapsed = time.perf_counter() - began
        new_tokens = output[:, width:]
        decoded = self.processor.batch_decode(output, skip_special_tokens=True)
        for row, text, tokens in zip(batch, decoded, new_tokens):
            image = requests[row.request_index].image
            row.output = parse_generation(text, row.spec.text, *image.size)
            row.generated_tokens = int((tokens != self.pad_token_id).sum())
            row.generation_seconds = elapsed


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """What `generate` computes from pixels: vision encoder -> post-layernorm -> L2 norm -> resampler."""
    hidden = model.vision_model.model.post_layernorm(model.vision_model(pixel_values)[0])
    return model.image_to_text_projection(torch.nn.functional.normalize(hidden, dim=-1))[0]


class _TextCallbackStreamer(TextStreamer):
    """Hands each finished piece of new text to a callback (the prompt is not repeated)."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.on_text(text)
        if stream_end:
            self.next_tokens_are_prompt = True  # the next prompt's ids come first again


class _StopWhen(StoppingCriteria):
    """Stops generation as soon as `should_stop()` answers True."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device)


def check_request(request: Request, settings: EngineSettings) -> list[PromptSpec]:
    """Validate a request against the limits in `settings`; return its prompts."""
    request.params.validate(settings.max_new_tokens_cap)
    limit = settings.max_prompt_chars
    for text in (request.task.prompt or "", *request.task.phrases):
        if len(text) > limit:
            raise InvalidRequestError(f"A prompt or phrase is {len(text)} characters long; the limit is {limit}.")
    return build_prompts(request.task, *request.image.size)


def combine_detections(rows: list[_Row]) -> GroundedText:
    """One result for a detection request: the phrases as text, each linked to the boxes found for it."""
    phrases = [row.spec.phrase for row in rows]
    text = ", ".join(phrases)
    entities = []
    start = 0
    for row, phrase in zip(rows, phrases):
        found = next((e for e in row.output.entities if e.phrase == phrase), None)
        if found is not None:
            entities.append(Entity(phrase, (start, start + len(phrase)), found.boxes, found.pixel_boxes))
        start += len(phrase) + 2
    entities = tuple(entities)
    return GroundedText(
        text=text,
        answer=text,
        raw_text="\n".join(row.output.raw_text for row in rows),
        entities=entities,
        markdown=render_markdown(text, entities),
    )


def _result(request: Request, rows: list[_Row], vision_seconds: dict[str, float], cached_keys: set[str]) -> Result:
    """One request's result from its generated rows, with its image's vision time and cache state."""
    key = rows[0].image_key
    timings = Timings(vision_seconds.get(key, 0.0), sum(row.generation_seconds for row in rows))
    task = parse_task(request.task.task)
    output = combine_detections(rows) if task is Task.DETECTION else rows[0].output
    return Result(
        task=task,
        prompt="\n".join(row.spec.text for row in rows),
        text=output.text,
        answer=output.answer,
        raw_text=output.raw_text,
        entities=output.entities,
        markdown=output.markdown,
        image_size=request.image.size,
        generated_tokens=sum(row.generated_tokens for row in rows),
        image_cached=key in cached_keys,
        timings=timings,
    )
