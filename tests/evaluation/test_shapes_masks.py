"""The synthetic scenes' true masks: in the referring records (COCO RLE, pycocotools' own bytes), exactly the drawn
objects' visible pixels, read back with their boxes, and in the detection file as `segmentation`; every other
record and every image as before."""

import json
import random

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from kosmos_serve.evaluation.synthetic import write_detection_file
from kosmos_serve.exports.masks import encode_mask, mask_pixels
from kosmos_serve.training.records import DataError, read_examples
from kosmos_serve.training.shapes import draw_scene, draw_scene_with_masks, scene_records, write_shapes_dataset

SCENES, SEED = 12, 5


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """12 scenes and their records, read back as JSON."""
    folder = tmp_path_factory.mktemp("shapes-masks")
    path = write_shapes_dataset(folder, SCENES, SEED)
    return folder, [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_each_referring_record_holds_the_drawn_pixels_of_its_object(written):
    folder, records = written
    checked = 0
    for index in range(SCENES):
        image, objects, masks = draw_scene_with_masks(random.Random(f"shapes:{SEED}:{index}"))
        name = f"images/{index:06d}.png"
        assert np.array_equal(np.asarray(Image.open(folder / name)), np.asarray(image))
        drawn = {obj.box: mask for obj, mask in zip(objects, masks)}
        referring = [r for r in records if r["image"] == name and r.get("task") == "referring"]
        assert len(referring) == len(objects)
        for record in referring:
            (box,), (mask,) = record["boxes"], record["masks"]
            assert mask["size"] == [image.height, image.width]
            decoded = coco_mask.decode({"size": mask["size"], "counts": mask["counts"].encode()}).astype(bool)
            assert np.array_equal(decoded, drawn[tuple(box)]) and decoded.any()
            checked += 1
    assert checked >= 2 * SCENES


def test_every_other_record_is_what_it_was(written):
    _, records = written
    for index in range(SCENES):
        name = f"images/{index:06d}.png"
        _, objects = draw_scene(random.Random(f"shapes:{SEED}:{index}"))
        without = [{k: v for k, v in r.items() if k != "masks"} for r in records if r["image"] == name]
        assert without == scene_records(name, objects)
        assert all("masks" not in r for r in records if r["image"] == name and r.get("task") != "referring")


def test_the_encoding_is_pycocotools_own_byte_for_byte():
    rng = np.random.default_rng(0)
    shapes = [mask for index in range(SCENES)
              for mask in draw_scene_with_masks(random.Random(f"shapes:{SEED}:{index}"))[2]]
    noise = [rng.random(rng.integers(1, 30, 2)) < share for share in (0.0, 0.1, 0.5, 0.9, 1.0) for _ in range(40)]
    for pixels in shapes + noise:
        theirs = coco_mask.encode(np.asfortranarray(pixels.astype(np.uint8)))
        assert encode_mask(pixels) == {"size": list(pixels.shape), "counts": theirs["counts"].decode("ascii")}
        assert np.array_equal(mask_pixels(encode_mask(pixels)), pixels)


def test_examples_carry_the_masks_with_their_phrases_and_boxes(written):
    folder, records = written
    examples = read_examples(folder / "records.jsonl")
    referring = [e for e in examples if e.kind == "referring"]
    assert all(not e.masks for e in examples if e.kind != "referring")
    for example, record in zip(referring, (r for r in records if r.get("task") == "referring")):
        (truth,) = example.masks
        assert truth.phrase == record["expression"] and list(truth.box) == record["boxes"][0]
        assert truth.mask.to_dict() == record["masks"][0]


@pytest.mark.parametrize(("masks", "problem"), [
    ([], 'field "masks" must be a list of one mask per box'),
    ([{"size": [2, 2], "counts": "04"}], "its size 2 x 2 is not the image's 40 x 60"),
    ([{"size": [40, 60], "counts": "05"}], "its counts cover 5 pixels, not 40 x 60"),
    (["mask"], 'must be {"size": [height, width], "counts": "<COCO run-length encoding>"}'),
])
def test_a_bad_mask_is_named_with_its_line(tmp_path, masks, problem):
    Image.new("RGB", (60, 40)).save(tmp_path / "a.png")
    good = {"image": "a.png", "task": "referring", "expression": "the box", "boxes": [[0, 0, 10, 10]],
            "masks": [encode_mask(np.ones((40, 60), bool))]}
    (tmp_path / "records.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "masks": masks}) + "\n")
    with pytest.raises(DataError) as raised:
        read_examples(tmp_path / "records.jsonl")
    assert "records.jsonl line 2: " in raised.value.message and problem in raised.value.message
    assert "line 1" not in raised.value.message


def test_normalised_boxes_are_given_their_pixels(tmp_path):
    Image.new("RGB", (60, 40)).save(tmp_path / "a.png")
    record = {"image": "a.png", "task": "referring", "expression": "the box", "boxes": [[0.5, 0.25, 1.0, 0.5]],
              "box_units": "normalized", "masks": [encode_mask(np.ones((40, 60), bool))]}
    (tmp_path / "records.jsonl").write_text(json.dumps(record) + "\n")
    (example,) = read_examples(tmp_path / "records.jsonl")
    assert example.masks[0].box == (30.0, 10.0, 60.0, 20.0)


def test_the_detection_file_gives_each_object_its_mask_as_segmentation(written):
    folder, records = written
    truth = json.loads(write_detection_file(folder, absent=2, seed=SEED).read_text())
    images = {image["id"]: image["file_name"] for image in truth["images"]}
    masks = {(r["image"], tuple(r["boxes"][0])): r["masks"][0] for r in records if r.get("task") == "referring"}
    assert len(truth["annotations"]) == len(masks)
    for annotation in truth["annotations"]:
        x, y, w, h = annotation["bbox"]
        assert annotation["segmentation"] == masks[(images[annotation["image_id"]], (x, y, x + w, y + h))]
        assert annotation["area"] == w * h  # the box's, as before
