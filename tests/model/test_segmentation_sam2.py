"""SAM 2 and EdgeTAM masks (`--segmenter`) against transformers' own pipeline run one box at a time, on tiny random
models, in the environment that has torchvision (tests/tool_environments.py: its processor needs it, and our torch
has none that imports).

There, a script builds a tiny random Kosmos-2 and segmenter with the checkout's own CLI (`kosmos-serve tiny-model`,
`kosmos-serve tiny-segmenter --family sam2|edgetam`), loads both through the production Engine and reports what
it gives, alone and batched, beside what transformers gives for each box alone (processor, model,
`post_process_masks`); the tests below read that report, as tests/model/test_segmentation.py checks SAM in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as coco_mask

REPO = Path(__file__).resolve().parents[2]
# A predicted IoU may differ in its last digit: float32 rounding in a decoder call over several boxes (as box scores).
SCORE_ROUNDING = 1.0001e-4

# Runs in the torchvision environment: argv holds the tiny Kosmos-2's folder and the segmenter's. Prints one JSON
# report: each request's entities alone and batched, each box's mask and score beside transformers' own for that box
# alone (COCO RLE of its post-processed mask, its predicted IoU), the embedding cache's count over a repeated image,
# and the mask-decoder calls of one result.
ENGINE_AND_REFERENCE = r"""
import json, sys, threading
import numpy as np
import torch
from PIL import Image
from pycocotools import mask as coco_mask
from transformers import AutoModelForMaskGeneration, AutoProcessor
from kosmos_serve.config import EngineSettings
from kosmos_serve.engine import Engine, GenerationParams, Request
from kosmos_serve.images import image_digest
from kosmos_serve.tasks import Task, TaskInput

kosmos, folder = sys.argv[1:3]
engine = Engine(EngineSettings(model=kosmos, segmenter=folder, device="cpu", max_batch_rows=8))
processor = AutoProcessor.from_pretrained(folder)
model = AutoModelForMaskGeneration.from_pretrained(folder).eval()
masks = GenerationParams(max_new_tokens=24, masks=True, min_score=0.0)
boxes = ((10, 20, 150, 160), (0, 0, 90, 60))
images = [Image.effect_mandelbrot((640, 480), (-2.0, -1.5, 1.0, 1.5), 60).convert("RGB"),
          Image.linear_gradient("L").resize((300, 200)).convert("RGB"), Image.effect_noise((200, 320), 60).convert("RGB")]
requests = [Request(image, task, masks) for image in images
            for task in (TaskInput(Task.REFERRING_GENERATION, boxes=boxes),
                         TaskInput(Task.DETECTION, phrases=("a circle", "a star")),
                         TaskInput(Task.REGION_VQA, prompt="Where is the fire next to?", phrases=("the fire",),
                                   boxes=((5, 5, 120, 90),)))]

def reference(image, box):
    inputs = processor(images=image, input_boxes=[[[float(v) for v in box]]], return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs, multimask_output=False)
    sizes = [inputs[name] for name in ("original_sizes", "reshaped_input_sizes") if name in inputs]
    mask = processor.post_process_masks(outputs.pred_masks, *sizes)[0][0, 0].numpy()
    return coco_mask.encode(np.asfortranarray(mask, dtype=np.uint8))["counts"].decode(), float(outputs.iou_scores[0, 0, 0])

engine.segmenter.cache.clear()
alone = [engine.run([request])[0] for request in requests]
engine.segmenter.cache.clear()
together = engine.run(requests)
boxes_checked = []
for request, result in zip(requests, alone):
    for entity in result.entities:
        for box, mask, score in zip(entity.pixel_boxes, entity.masks, entity.mask_scores):
            counts, expected_score = reference(request.image, box)
            boxes_checked.append({"size": list(mask.size), "image": [request.image.height, request.image.width],
                                  "counts": mask.counts, "score": score, "expected_counts": counts,
                                  "expected_score": expected_score})
segmenter = engine.segmenter
segmenter.cache.clear()
embedded = []  # the thread of each image embedding computed from here on
embed = segmenter.model.get_image_embeddings
segmenter.model.get_image_embeddings = lambda *a, **k: embedded.append(threading.current_thread().name) or embed(*a, **k)
image = images[2]
first = engine.predict(image, TaskInput(Task.REFERRING_GENERATION, boxes=boxes[:1]), masks)
second = engine.predict(image, TaskInput(Task.REFERRING_GENERATION, boxes=boxes), masks)
segmenter.model.get_image_embeddings = embed
calls = []
segmenter.model.mask_decoder.register_forward_hook(lambda module, args, output: calls.append(list(output[0].shape)))
engine.predict(images[0], TaskInput(Task.REFERRING_GENERATION, boxes=boxes), masks)
print("REPORT " + json.dumps({
    "model_type": segmenter.model_type, "boxes": boxes_checked,
    "alone": [result.to_dict()["entities"] for result in alone],
    "together": [result.to_dict()["entities"] for result in together],
    "embedded": embedded,
    "repeated_mask_kept": second.entities[0].masks[0] == first.entities[0].masks[0],
    "decoder_calls": calls,
}))
"""


@pytest.fixture(scope="module", params=["sam2", "edgetam"])
def report(request, torchvision_python, tmp_path_factory) -> dict:
    """What the Engine and transformers give for a tiny random segmenter of the family, in the torchvision
    environment, running this checkout's code."""
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    kosmos, segmenter = folder / "kosmos-2", folder / request.param
    environment = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    command_line = Path(torchvision_python).parent / "kosmos-serve"
    for arguments in (["tiny-model", kosmos], ["tiny-segmenter", segmenter, "--family", request.param]):
        built = subprocess.run([command_line, *map(str, arguments)], capture_output=True, text=True, timeout=600,
                               check=False, env=environment)
        assert built.returncode == 0, built.stderr[-3000:]
    done = subprocess.run([torchvision_python, "-c", ENGINE_AND_REFERENCE, str(kosmos), str(segmenter)],
                          capture_output=True, text=True, timeout=900, check=False, env=environment)
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return {"family": request.param, **json.loads(lines[-1].removeprefix("REPORT "))}


def decoded(size: list[int], counts: str) -> np.ndarray:
    return coco_mask.decode({"size": size, "counts": counts.encode()}).astype(bool)


def test_masks_equal_the_segmenter_run_alone_one_box_at_a_time(report):
    assert report["model_type"] == report["family"]
    checked = report["boxes"]
    assert len(checked) >= 3 * 3  # three images, each with two boxes given and one more
    for box in checked:
        assert box["size"] == box["image"]
        mask = decoded(box["size"], box["counts"])
        assert np.array_equal(mask, decoded(box["size"], box["expected_counts"]))
        assert abs(box["score"] - round(box["expected_score"], 4)) <= SCORE_ROUNDING
    assert any(0 < decoded(box["size"], box["counts"]).mean() < 1 for box in checked)  # real masks, not all or none
    assert len({box["score"] for box in checked}) > 1


def test_batched_requests_get_the_masks_they_get_alone(report):
    assert report["together"] == report["alone"]
    masks = sum(len(entity.get("masks", [])) for entities in report["alone"] for entity in entities)
    boxes = sum(len(entity["pixel_boxes"]) for entities in report["alone"] for entity in entities)
    assert masks == boxes == len(report["boxes"])


def test_an_images_embedding_is_computed_once_and_its_boxes_share_one_decoder_call(report):
    assert len(report["embedded"]) == 1 and report["embedded"][0].startswith("segmenter")  # from admission, aside
    assert report["repeated_mask_kept"]
    assert len(report["decoder_calls"]) == 1 and report["decoder_calls"][0][1] == 2
