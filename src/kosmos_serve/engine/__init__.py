"""The inference core: prepared prompts -> continuous batching (`scheduler.py`) -> grounded results.

One `Engine.run` call takes any mix of tasks, prompts, images and generation parameters. Vision
features are computed once per distinct image (and kept in an LRU across calls); rows decode
together step by step whatever their parameters (`decode.py`), joining and leaving the batch at
any step; every result equals the request run alone through transformers' own `generate` +
`post_process_generation`. Beam search runs through `generate` itself. The service's `Batcher`
feeds one engine's scheduler from many callers. This package imports no web framework.
"""

from kosmos_serve.engine.batcher import Batcher, BatchObserver, start_batcher
from kosmos_serve.engine.engine import Engine, start_engine
from kosmos_serve.engine.features import ImageFeatureCache, image_features
from kosmos_serve.engine.requests import PreparedRequest, Request, Row, check_task, tokenise
from kosmos_serve.engine.results import Result, Timings, combine_detections
from kosmos_serve.engine.scheduler import Scheduler, Ticket
from kosmos_serve.engine.segmentation import Segmenter, start_segmenter
from kosmos_serve.generation import GenerationParams

__all__ = [  # what the rest of kosmos-serve imports from here
    "BatchObserver", "Batcher", "Engine", "GenerationParams", "ImageFeatureCache", "PreparedRequest", "Request",
    "Result", "Row", "Scheduler", "Segmenter", "Ticket", "Timings", "check_task", "combine_detections",
    "image_features", "start_batcher", "start_engine", "start_segmenter", "tokenise",
]
