"""The inference core: prepared prompts -> continuous batching (`scheduler.py`) -> grounded results.

One `Engine.run` call takes any mix of tasks, prompts, images and generation parameters. Vision
features are computed once per distinct image (and kept in an LRU across calls); rows decode
together step by step whatever their parameters (`decode.py`), joining and leaving the batch at
any step; every result equals the request run alone through transformers' own `generate` +
`post_process_generation`. Beam search runs through `generate` itself.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import StoppingCriteria, TextStreamer

from kosmos_serve.config import EngineSettings
from kosmos_serve.engine.features import ImageFeatureCache, image_features
from kosmos_serve.engine.results import Result, Timings, combine_detections
from kosmos_serve.engine.scheduler import Scheduler, Ticket
from kosmos_serve.errors import InvalidRequestError
from kosmos_serve.generation import (
    GenerationParams,
    ModelDefaults,
    generation_kwargs,
    read_model_defaults,
    resolve_defaults,
)
from kosmos_serve.grounding import GroundedText, parse_generation
from kosmos_serve.images import image_digest
from kosmos_serve.loading import load_model, resolve_source
from kosmos_serve.tasks import PromptSpec, TaskInput, build_prompts

__all__ = [  # what the rest of kosmos-serve imports from here
    "Engine", "GenerationParams", "ImageFeatureCache", "Request", "Result", "Scheduler", "Ticket", "Timings",
    "check_request", "combine_detections", "image_features", "tokenise",
]

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
        """Run many requests together; each result equals that request run alone (greedy and seeded sampling).

        They go through one `Scheduler`: rows decode together step by step, each leaving the batch as
        soon as it ends, the next waiting rows joining at the next step (at most `max_batch_size` rows).
        """
        scheduler = self.scheduler()
        tickets = [scheduler.add(request) for request in requests]
        scheduler.load_features(tickets)  # "image_cached" means: cached before this call
        while scheduler.busy:
            scheduler.step()
        for ticket in tickets:
            if ticket.error is not None:
                raise ticket.error
        return [ticket.result for ticket in tickets]

    def stream(self, request: Request, on_text: Callable[[str], None], should_stop: Callable[[], bool] | None = None) -> Result:
        """Run one request, passing each piece of generated text to `on_text` as it is decoded.

        Its prompts run one after another (a detection's phrases in order), so the text reads in
        order and the result equals `run([request])[0]`. `should_stop` is polled after every token:
        when it answers True (the client left), generation ends early.
        """
        scheduler = self.scheduler()
        ticket = scheduler.add(request, on_text=on_text, should_stop=should_stop)
        while scheduler.busy:
            scheduler.step()
        if ticket.error is not None:
            raise ticket.error
        return ticket.result

    def scheduler(self, max_rows: int | None = None) -> Scheduler:
        """A fresh continuous-batching scheduler over this engine (at most `max_rows` rows, default `max_batch_size`)."""
        return Scheduler(self, max_rows)

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
