"""Masks from boxes: a Segment Anything model (transformers' SAM family) prompted with the boxes Kosmos-2 gave.

Per image, the segmenter's image embedding is computed once, one image per call (so it never depends on its batch
neighbours), and kept in an LRU keyed by the image's content, as Kosmos-2's image features are: several phrases and
several requests about one image pay for it once. The scheduler starts it (`prepare`) in the segmenter's own thread
when a request asking for masks is admitted, so it is computed while Kosmos-2 decodes the boxes it will take. Every
box of a result then goes through one prompt-encoder and mask-decoder call, `multimask_output=False`: SAM's single
mask for a box prompt (SAM 2's own forward then picks
among its masks by stability, as it does for one box). The processor's own `post_process_masks` brings the masks to
the image's size and thresholds them (its default, logit 0); each is written as COCO run-length encoding. A mask's
score is the model's predicted IoU for that mask.

This is exactly what the segmenter gives when run directly through transformers, one box at a time:
`processor(images=image, input_boxes=[[box]])`, `model(**inputs, multimask_output=False)`,
`processor.post_process_masks(pred_masks, original_sizes[, reshaped_input_sizes])`
(tests/model/test_segmentation.py holds SAM and SAM-HQ to that; tests/model/test_segmentation_sam2.py SAM 2 and
EdgeTAM, in an environment with torchvision).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForMaskGeneration, AutoProcessor, PretrainedConfig
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_MASK_GENERATION_MAPPING_NAMES
from transformers.utils import is_timm_available, is_torchvision_available

from kosmos_serve.config import EngineSettings
from kosmos_serve.engine.features import ImageFeatureCache
from kosmos_serve.engine.loading import quiet_transformers, resolve_device, resolve_dtype, resolve_source, set_threads
from kosmos_serve.errors import ModelLoadError
from kosmos_serve.grounding import Mask, PixelBox

logger = logging.getLogger(__name__)

# transformers' mask-generation models, each prompted by boxes: sam, sam_hq, sam2, edgetam, sam3_tracker (the video
# variants' configs load their image model).
SEGMENTER_TYPES = tuple(MODEL_FOR_MASK_GENERATION_MAPPING_NAMES)
# How a family's forward takes the embedding `get_image_embeddings` returns: SAM-HQ's is a pair, the ViT's
# intermediate layers beside the image embedding; the others' one tensor (SAM) or list of feature maps (SAM 2).
PAIRED_EMBEDDINGS = {"sam_hq": ("image_embeddings", "intermediate_embeddings")}
MASK_SCORE_DECIMALS = 4  # as the boxes' scores
# Images whose segmenter embeddings are kept, at most (fewer when KOSMOS_IMAGE_CACHE_SIZE is smaller): an embedding is
# 4 MB for SAM ViT-B, 16 MB for SAM 2 (its high-resolution maps), against Kosmos-2's 0.5 MB of image features.
MAX_CACHED_EMBEDDINGS = 16


class Segmenter:
    """A loaded Segment Anything model that masks the boxes of an image, its image embeddings cached."""

    def __init__(self, settings: EngineSettings, device: torch.device, dtype: torch.dtype):
        self.model, self.processor = load_segmenter(settings.segmenter, device, dtype)
        self.model_type = self.model.config.model_type
        self.device, self.dtype = device, dtype
        # image digest -> a Future of the forward's embedding arguments (done, or being computed by `_worker`)
        self.cache = ImageFeatureCache(min(settings.image_cache_size, MAX_CACHED_EMBEDDINGS))
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segmenter")
        self._queued = 0  # images handed to `_worker` and not yet embedded

    def prepare(self, image: Image.Image, key: str) -> None:
        """Start the image's embedding in the segmenter's thread, unless it is cached, coming, or the queue is full."""
        with self._lock:
            if key in self.cache or self._queued >= max(self.cache.capacity, 1):
                return
            self._queued += 1
            self.cache.put(key, self._worker.submit(self._embed_image, image))

    @torch.inference_mode()
    def segment(self, image: Image.Image, key: str, boxes: Sequence[PixelBox]) -> list[tuple[Mask, float]]:
        """Each box's mask and score, all boxes in one decoder call; `key` is the image's content digest."""
        if not boxes:
            return []
        inputs = self.processor(images=image, input_boxes=[[[float(v) for v in box] for box in boxes]],
                                return_tensors="pt")
        embeddings = self.embeddings(key, inputs["pixel_values"])
        outputs = self.model(**embeddings, input_boxes=inputs["input_boxes"].to(self.device, self.dtype),
                             multimask_output=False)
        sizes = [inputs[name] for name in ("original_sizes", "reshaped_input_sizes") if name in inputs]
        masks = self.processor.post_process_masks(outputs.pred_masks.float().cpu(), *sizes)[0]  # (boxes, 1, h, w)
        scores = outputs.iou_scores[0, :, 0].float().cpu().tolist()
        return [(Mask.from_array(mask[0].numpy()), round(score, MASK_SCORE_DECIMALS))
                for mask, score in zip(masks, scores)]

    def embeddings(self, key: str, pixel_values: torch.Tensor) -> dict[str, object]:
        """The forward's embedding arguments for an image: cached or coming (`prepare`), else computed now and kept."""
        with self._lock:
            future = self.cache.get(key)
            if future is None:
                future = Future()
                future.set_running_or_notify_cancel()
                self.cache.put(key, future)
                computing = True
            else:
                computing = False
        if computing:
            try:
                future.set_result(self._embed(pixel_values))
            except Exception as error:  # noqa: BLE001 - raised below, to the waiting caller as to this one
                future.set_exception(error)
        try:
            return future.result()
        except Exception:
            with self._lock:
                self.cache.discard(key, future)  # a later request tries again
            raise

    @torch.inference_mode()
    def _embed_image(self, image: Image.Image) -> dict[str, object]:
        try:
            return self._embed(self.processor(images=image, return_tensors="pt")["pixel_values"])
        finally:
            with self._lock:
                self._queued -= 1

    @torch.inference_mode()
    def _embed(self, pixel_values: torch.Tensor) -> dict[str, object]:
        computed = self.model.get_image_embeddings(pixel_values.to(self.device, self.dtype))
        names = PAIRED_EMBEDDINGS.get(self.model_type, ("image_embeddings",))
        return dict(zip(names, computed)) if len(names) > 1 else {names[0]: computed}


def start_segmenter(settings: EngineSettings) -> Segmenter:
    """The segmenter of `settings` alone, without Kosmos-2 (`evaluate --masks-from-true-boxes`), on the device, dtype
    and threads an engine of the same settings gives it."""
    set_threads(settings.threads)
    quiet_transformers()
    device = resolve_device(settings.device)
    return Segmenter(settings, device, resolve_dtype(settings.dtype, device))


def load_segmenter(name: str, device: torch.device, dtype: torch.dtype):
    """A SAM-family model and its processor from `name` (hub id, folder or demo), on `device` in `dtype`; anything
    else fails here with one line saying what was found and what is expected."""
    source, model_type = check_segmenter(name)
    try:
        processor = AutoProcessor.from_pretrained(source)
        model = AutoModelForMaskGeneration.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError, ImportError) as error:
        raise ModelLoadError(f"--segmenter {name!r} holds no complete {model_type} checkpoint (config.json, weights "
                             "and processor files as written by save_pretrained).") from error
    if not hasattr(processor, "post_process_masks"):
        raise ModelLoadError(f"--segmenter {name!r}: its processor ({type(processor).__name__}) is not a Segment "
                             "Anything processor.")
    Mask.from_array(torch.zeros(1, 1, dtype=torch.bool).numpy())  # pycocotools is there, or say how to install it
    model.to(device).eval()
    logger.info("Loaded segmenter %s (%s) on %s as %s", source, model_type, device, dtype)
    return model, processor


def check_segmenter(name: str) -> tuple[str, str]:
    """The folder and model type of segmenter `name`, read from its config alone (what `serve` checks before
    starting): a model that is no Segment Anything model, or one whose classes need a package not installed here,
    fails with one line."""
    source = resolve_source(name, option="--segmenter")
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"--segmenter {name!r} holds no model config (config.json as written by "
                             "save_pretrained).") from error
    if config.model_type not in SEGMENTER_TYPES:
        raise ModelLoadError(f"--segmenter {name!r} is a {config.model_type!r} model, not a Segment Anything model; "
                             f"expected one of transformers' mask-generation types: {', '.join(SEGMENTER_TYPES)}.")
    require_packages(config, f"--segmenter {name!r} ({config.model_type})")
    return source, config.model_type


def require_packages(config: PretrainedConfig, subject: str) -> None:
    """Fail in one line, saying what to install, where transformers' classes for `config` need packages missing
    here: torchvision for an image processor with no PIL version (SAM 2, EdgeTAM, SAM 3's tracker), timm for a timm
    backbone (EdgeTAM's RepViT)."""
    backends = IMAGE_PROCESSOR_MAPPING_NAMES.get(config.model_type, {})
    backbone = getattr(getattr(config, "vision_config", None), "backbone_config", None)
    missing = {}
    if backends and "pil" not in backends and not is_torchvision_available():
        release = torchvision_release(torch.__version__)
        missing["torchvision"] = (f"the torchvision made for this torch {torch.__version__}, from the package index "
                                  f'it came from (pip install "torchvision=={release}.*"; one of another build, as '
                                  "PyPI's CUDA torchvision beside a CPU torch, fails to import)")
    if getattr(backbone, "model_type", None) == "timm_wrapper" and not is_timm_available():
        missing["timm"] = "timm (pip install timm)"
    if missing:
        raise ModelLoadError(f"{subject} needs {' and '.join(missing)}, not installed here: "
                             f"install {'; and '.join(missing.values())}. README, \"Masks\".")


def torchvision_release(torch_version: str) -> str:
    """The torchvision release made for a torch release: torch 2.N pairs with torchvision 0.(N + 15).

    >>> torchvision_release("2.13.0+cpu"), torchvision_release("2.14.1"), torchvision_release("2.9.1")
    ('0.28', '0.29', '0.24')
    """
    return f"0.{int(torch_version.split('.')[1]) + 15}"
