"""Masks as COCO run-length encoding, and the drawing that lays them over the image."""

import dataclasses

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from kosmos_serve.drawing import MASK_OPACITY, draw_entities, entity_colours
from kosmos_serve.engine.results import entity_dict
from kosmos_serve.grounding import Entity, Mask

GREY = (128, 128, 128)


def disc(height: int, width: int, centre: tuple[int, int], radius: int) -> np.ndarray:
    rows, columns = np.ogrid[:height, :width]
    return (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 <= radius**2


def test_a_mask_round_trips_and_is_pycocotools_own_encoding():
    pixels = disc(37, 53, (20, 30), 11)
    mask = Mask.from_array(pixels)
    assert mask.size == (37, 53)
    assert np.array_equal(mask.to_array(), pixels)
    assert np.array_equal(coco_mask.decode({"size": [37, 53], "counts": mask.counts.encode()}), pixels)
    assert coco_mask.area({"size": [37, 53], "counts": mask.counts.encode()}) == pixels.sum()


def test_an_empty_and_a_full_mask_encode():
    for pixels in (np.zeros((4, 5), dtype=bool), np.ones((4, 5), dtype=bool)):
        assert np.array_equal(Mask.from_array(pixels).to_array(), pixels)


def test_entity_json_has_masks_only_when_made():
    plain = Entity("a disc", (0, 6), ((0.1, 0.1, 0.5, 0.5),), ((5, 5, 25, 25),), (0.9,))
    assert set(entity_dict(plain)) == {"phrase", "span", "boxes", "pixel_boxes", "scores"}
    mask = Mask.from_array(disc(40, 40, (15, 15), 8))
    masked = dataclasses.replace(plain, masks=(mask,), mask_scores=(0.87,))
    answer = entity_dict(masked)
    assert answer["masks"] == [{"size": [40, 40], "counts": mask.counts}] and answer["mask_scores"] == [0.87]


def test_each_mask_is_drawn_translucent_in_its_entitys_colour():
    pixels = disc(120, 160, (60, 50), 25)
    entity = Entity("a disc", (0, 6), ((0.0, 0.0, 1.0, 1.0),), ((100, 10, 150, 40),), (0.9,),
                    masks=(Mask.from_array(pixels),), mask_scores=(0.8,))
    drawn = np.asarray(draw_entities(Image.new("RGB", (160, 120), GREY), [entity])).astype(int)
    colour = np.array(entity_colours(["a disc"])["a disc"])
    expected = np.rint(GREY + (colour - GREY) * round(255 * MASK_OPACITY) / 255)
    assert np.abs(drawn[60, 50] - expected).max() <= 1  # inside the mask: blended, the image still showing
    assert tuple(drawn[60, 90]) == GREY  # outside the mask and the box: untouched
    assert tuple(drawn[5, 5]) == GREY


def test_a_mask_of_another_size_is_not_drawn():
    entity = Entity("a disc", (0, 6), ((0.0, 0.0, 0.1, 0.1),), ((0, 0, 2, 2),), (0.9,),
                    masks=(Mask.from_array(np.ones((10, 10), dtype=bool)),), mask_scores=(0.8,))
    drawn = np.asarray(draw_entities(Image.new("RGB", (160, 120), GREY), [entity]))
    assert tuple(drawn[60, 80]) == GREY and tuple(drawn[100, 140]) == GREY
