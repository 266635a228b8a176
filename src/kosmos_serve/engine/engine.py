"""The engine: a loaded Kosmos-2 or Kosmos-2.5 that validates requests, computes image features and runs batches of
prompts (what differs between the two is their family's: `families.py`)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from kosmos_serve.config import EngineSettings
from kosmos_serve.engine.decode import Continuations, RunningBatch, prefill, read_continuations
from kosmos_serve.engine.features import ImageFeatureCache
from kosmos_serve.engine.loading import load_model, quiet_transformers, resolve_source, set_threads
from kosmos_serve.engine.requests import PreparedRequest, PromptReader, Request, Row, check_task, tokenise
from kosmos_serve.engine.results import Result
from kosmos_serve.engine.scheduler import Scheduler
from kosmos_serve.engine.scoring import PhrasePriors, TokenEvidence, evidence_from
from kosmos_serve.engine.segmentation import Segmenter
from kosmos_serve.engine.streaming import TextStream
from kosmos_serve.errors import InvalidRequestError
from kosmos_serve.generation import (
    GenerationParams,
    ModelDefaults,
    generation_kwargs,
    read_model_defaults,
    resolve_defaults,
)
from kosmos_serve.grounding import GroundedText
from kosmos_serve.images import image_digest
from kosmos_serve.tasks import PromptSpec, Task, TaskInput, parse_task


class Engine:
    """A loaded Kosmos-2 (or Kosmos-2.5) that runs batches of requests."""

    def __init__(self, settings: EngineSettings | None = None):
        self.settings = settings or EngineSettings()
        self.model, self.processor, self.family = load_model(self.settings)
        operator = ModelDefaults(max_new_tokens=self.settings.max_new_tokens,
                                 no_repeat_ngram_size=self.settings.no_repeat_ngram_size,
                                 min_score=self.settings.min_score, nms_iou=self.settings.nms_iou)
        self.defaults = resolve_defaults(operator, read_model_defaults(resolve_source(self.settings.model)),
                                         self.family.defaults)
        self.device = self.model.device
        self.dtype = self.model.dtype
        self.cache = ImageFeatureCache(self.settings.image_cache_size)
        self.pad_token_id = self.processor.tokenizer.pad_token_id
        self.vocabulary = self.family.vocabulary(self.processor)
        self.phrase_priors = PhrasePriors(self._blank_image_log_probs)
        self.segmenter = Segmenter(self.settings, self.device, self.dtype) if self.settings.segmenter else None

    @property
    def weight_formats(self) -> dict[str, str]:
        """The weight format of each part (vision, text), as `--quantize` chose it on this machine."""
        return self.model.weight_formats

    def predict(self, image: Image.Image, task: TaskInput | None = None,
                params: GenerationParams | None = None) -> Result:
        """Run one request (by default, the model's default task: its family's first)."""
        return self.run([Request(image, task or TaskInput(self.family.tasks[0]), params or GenerationParams())])[0]

    def run(self, requests: Sequence[Request | PreparedRequest]) -> list[Result]:
        """Run many requests together; each result equals that request run alone (greedy and seeded sampling).

        They go through one `Scheduler`: rows decode together step by step, each leaving the batch as
        soon as it ends, the next waiting rows joining at the next step (at most `max_batch_rows` rows).
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

    def scheduler(self, max_rows: int | None = None) -> Scheduler:
        """A fresh continuous-batching scheduler over this engine (at most `max_rows` rows, else `max_batch_rows`)."""
        return Scheduler(self, max_rows)

    # the steps a scheduler takes

    def prepare(self, request: Request) -> PreparedRequest:
        """Validate `request` against this engine's model and limits (the one check it meets); defaults filled in."""
        task = parse_task(request.task.task)
        if task not in self.family.tasks:
            raise InvalidRequestError(f"Task {task.value!r} is not one of this model's: {self.settings.model!r} is a "
                                      f"{self.family.name} model, whose tasks are "
                                      f"{', '.join(task.value for task in self.family.tasks)}.", "task")
        prompts = check_task(request.task, request.params, self.settings, request.image.size)
        if request.params.masks and self.segmenter is None:
            raise InvalidRequestError("Masks need a segmenter, and none is loaded: start kosmos-serve with "
                                      "--segmenter MODEL (or set KOSMOS_SEGMENTER), e.g. --segmenter demo.", "masks")
        return PreparedRequest(request, tuple(prompts), self.with_defaults(request.params),
                               self.min_score_for(request), self.nms_iou_for(request))

    def min_score_for(self, request: Request) -> float | None:
        """The request's `min_score`; for detection when none is given, the default (operator, model, built-in)."""
        if request.params.min_score is not None:
            return request.params.min_score
        return self.defaults.min_score if parse_task(request.task.task) is Task.DETECTION else None

    def nms_iou_for(self, request: Request) -> float | None:
        """The request's `nms_iou`; for detection when none is given, the default (operator, model, built-in)."""
        if request.params.nms_iou is not None:
            return request.params.nms_iou
        return self.defaults.nms_iou if parse_task(request.task.task) is Task.DETECTION else None

    def tokenise(self, prepared: PreparedRequest) -> list[Row]:
        """The request's prompts as token rows, each reading the request's image."""
        key = image_digest(prepared.request.image)
        rows = []
        for spec in prepared.prompts:
            input_ids, image_mask = self.family.tokenise(self.processor, spec)
            rows.append(Row(spec, key, input_ids, image_mask))
        return rows

    @functools.cached_property
    def prompt_reader(self) -> PromptReader:
        """Token counts and decoded text of prompts, for callers outside the engine thread."""
        return PromptReader(self.processor, self.family.tokenise)

    def with_defaults(self, params: GenerationParams) -> GenerationParams:
        """`params` with each field left to the default (None) filled in from `self.defaults`."""
        return dataclasses.replace(
            params,
            max_new_tokens=params.max_new_tokens or self.defaults.max_new_tokens,
            no_repeat_ngram_size=(self.defaults.no_repeat_ngram_size if params.no_repeat_ngram_size is None
                                  else params.no_repeat_ngram_size),
        )

    @torch.inference_mode()
    def features_for(
        self, images: dict[str, Image.Image]
    ) -> tuple[dict[str, torch.Tensor], dict[str, float], set[str]]:
        """Features per image key: from the cache, else encoded in batches; vision seconds per key; the cached keys."""
        features: dict[str, torch.Tensor] = {}
        cached_keys = set()
        missing: dict[str, Image.Image] = {}
        for key, image in images.items():
            cached = self.cache.get(key)
            if cached is not None:
                features[key] = cached
                cached_keys.add(key)
            else:
                missing[key] = image
        vision_seconds = {}
        keys = list(missing)
        for start in range(0, len(keys), self.settings.max_batch_rows):
            chunk = keys[start : start + self.settings.max_batch_rows]
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
        """Image features as `generate` computes them (images, image tokens, width)."""
        return self.family.encode_images(self.model, self.processor, images)

    @torch.inference_mode()
    def generate_rows(self, rows: list[Row], features: dict[str, torch.Tensor], params: GenerationParams,
                      image_size: tuple[int, int], should_stop: Callable[[], bool] | None = None) -> None:
        """Rows of one image through transformers' own `generate` (the exact path, beam search's); outputs set."""
        width = max(len(row.input_ids) for row in rows)
        pads = [width - len(row.input_ids) for row in rows]
        input_ids = torch.tensor([[self.pad_token_id] * p + row.input_ids for p, row in zip(pads, rows)])
        attention_mask = torch.tensor([[0] * p + [1] * len(row.input_ids) for p, row in zip(pads, rows)])
        image_mask = torch.tensor([[0] * p + row.image_mask for p, row in zip(pads, rows)])
        image_embeds = torch.cat([features[row.image_key] for row in rows])
        stopping = StoppingCriteriaList([_StopWhen(should_stop)]) if should_stop is not None else None
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
                stopping_criteria=stopping,
                **generation_kwargs(params),
            )
        elapsed = time.perf_counter() - began
        new_tokens = output[:, width:]
        decoded = self.processor.batch_decode(output, skip_special_tokens=True)
        for row, text, tokens in zip(rows, decoded, new_tokens):
            generated = [int(token) for token in tokens if token != self.pad_token_id]
            evidence = self._rescore(row, row.input_ids + generated, features[row.image_key])
            row.output = self.score(self.parse(text, row.spec, image_size), row, row.input_ids + generated, evidence)
            row.generated_tokens = len(generated)
            row.generation_seconds = elapsed

    def parse(self, decoded_text: str, spec: PromptSpec, image_size: tuple[int, int]) -> GroundedText:
        """A row's generation (its whole sequence, decoded) parsed as its family's reference code reads it."""
        return self.family.parse(self.processor, decoded_text, spec, image_size)

    def with_masks(self, result: Result, image: Image.Image, key: str) -> Result:
        """`result` with a mask and a mask score for each box, from the segmenter (`key`: the image's digest)."""
        boxes = [box for entity in result.entities for box in entity.pixel_boxes]
        began = time.perf_counter()
        segmented = self.segmenter.segment(image, key, boxes)
        masks = iter(segmented)
        entities = []
        for entity in result.entities:
            mine = [next(masks) for _ in entity.pixel_boxes]
            entities.append(dataclasses.replace(entity, masks=tuple(mask for mask, _ in mine),
                                                mask_scores=tuple(score for _, score in mine)))
        timings = dataclasses.replace(result.timings, segmentation=time.perf_counter() - began)
        return dataclasses.replace(result, entities=tuple(entities), timings=timings)

    # scoring (engine/scoring.py)

    def scored_tail(self, prompt: list[int]) -> int:
        """How many of the prompt's last tokens are scored: an open phrase's words and `</phrase>` (0 if none)."""
        start = self.vocabulary.open_phrase_start(prompt)
        return 0 if start is None else len(prompt) - start

    def new_phrases(self, prompts: list[list[int]]) -> list[tuple[int, ...]]:
        """The prompts' closed open phrases (a detection's) whose blank-image prior is not known yet."""
        phrases = []
        for prompt in prompts:
            start = self.vocabulary.open_phrase_start(prompt)
            if start is not None and prompt[-1] == self.vocabulary.phrase_end:
                phrases.append(tuple(prompt[start:-1]))
        return self.phrase_priors.missing(phrases)

    def prior_continuations(self, phrases: list[tuple[int, ...]]) -> Continuations | None:
        """`phrases` (and `</phrase>`) to read after the blank image's `<grounding><phrase>`; None for none."""
        if not phrases:
            return None
        beginning, next_log_probs = self._blank_beginning
        return Continuations(beginning, next_log_probs, [[*phrase, self.vocabulary.phrase_end] for phrase in phrases])

    def learn_priors(self, phrases: list[tuple[int, ...]], read: list[list[float]]) -> None:
        """Keep the priors of `phrases` from their continuations' tokens' log-probabilities."""
        self.phrase_priors.store(phrases, [sum(log_probs) for log_probs in read])

    def note_evidence(self, log_probs: torch.Tensor, tokens: list[int], first_position: int,
                      evidence: TokenEvidence) -> None:
        """Record what the model said of `tokens` (at `first_position`..) from their log-softmax rows."""
        evidence_from(log_probs, tokens, first_position, self.vocabulary, evidence)

    def score(self, output: GroundedText, row: Row, ids: list[int], evidence: TokenEvidence) -> GroundedText:
        """`output`, generated as `ids` from `row`'s prompt, with each of its boxes (or lines) scored."""
        return self.family.score(output, ids, len(row.input_ids), evidence, self.vocabulary, self.phrase_priors)

    @functools.cached_property
    def _blank_beginning(self) -> tuple[RunningBatch, torch.Tensor]:
        """`<grounding><phrase>` on a blank image (the processor's mean colour), prefilled once: its cache and the
        log-softmax of the token after it."""
        mean = self.processor.image_processor.image_mean
        blank = Image.new("RGB", (224, 224), tuple(round(255 * channel) for channel in mean))
        ids, image_mask = tokenise(self.processor, "<grounding><phrase>")
        prefilled = prefill(self.model, [ids], [image_mask], self.encode_images([blank]), self.pad_token_id)
        return prefilled.batch, torch.log_softmax(prefilled.logits[0], dim=-1)

    def _blank_image_log_probs(self, phrases: list[tuple[int, ...]]) -> list[float]:
        """log p(phrase, `</phrase>` | blank image, `<grounding><phrase>`) of each phrase: their priors, in one pass
        of their own after the blank beginning (a caption's phrases, met one by one)."""
        read = read_continuations(self.model, self.prior_continuations(phrases), self.pad_token_id)
        return [sum(log_probs) for log_probs in read]

    @torch.inference_mode()
    def _rescore(self, row: Row, ids: list[int], features: torch.Tensor) -> TokenEvidence:
        """The evidence of a row generated outside the scheduler (beam search): its tokens read again, alone."""
        first = len(row.input_ids) - self.scored_tail(row.input_ids)
        evidence = TokenEvidence()
        if first < len(ids):
            image_mask = row.image_mask + [0] * (len(ids) - len(row.input_ids))
            (log_probs,) = prefill(self.model, [ids], [image_mask], features, self.pad_token_id,
                                   tails=[len(ids) - first]).tail_log_probs
            self.note_evidence(log_probs, ids[first:], first, evidence)
        return evidence

    def decode(self, ids: list[int]) -> str:
        """Token ids as text, special tokens left out (grounding tags kept: they are ordinary tokens)."""
        return self.processor.tokenizer.decode(ids, skip_special_tokens=True)

    def text_stream(self) -> TextStream:
        """A streamed request's text from the token ids the engine thread hands over, for its consumer's thread
        (one at a time: the event loop's)."""
        return TextStream(self._stream_tokenizer)

    @functools.cached_property
    def _stream_tokenizer(self):
        """A private copy of the tokenizer for the streams' consumers, off the one the engine thread uses."""
        return copy.deepcopy(self.processor.tokenizer)


def start_engine(settings: EngineSettings, workers: int = 1) -> Engine:
    """The one way a process starts an engine: its share of the cores (`workers` share them), quiet transformers,
    then the model loaded from `settings`."""
    set_threads(settings.threads, workers)
    quiet_transformers()
    return Engine(settings)


class _StopWhen(StoppingCriteria):
    """Stops generation as soon as `should_stop()` answers True."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device)
