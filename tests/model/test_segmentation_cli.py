"""`--segmenter` and `--masks` on the command line (predict, annotate, tiny-segmenter), run in-process."""

import json

import numpy as np
import pytest
import torch
from cli_invocation import invoke
from click.testing import CliRunner
from PIL import Image
from transformers.utils import is_timm_available, is_torchvision_available

from kosmos_serve.cli import main
from kosmos_serve.engine import GenerationParams
from kosmos_serve.engine.segmentation import torchvision_release
from kosmos_serve.grounding import Mask
from kosmos_serve.tasks import Task, TaskInput
from kosmos_serve.training.tiny_segmenter import sam2_config

BOX = (10, 20, 150, 160)


def test_predict_masks_json_and_drawing(image_file, tmp_path, tiny_model_dir, tiny_segmenter_dir, segmenting_engine,
                                        sample_images):
    drawn = tmp_path / "drawn.png"
    result = invoke("predict", image_file, "--model", tiny_model_dir, "--segmenter", tiny_segmenter_dir, "--masks",
                    "--task", "referring_generation", "--box", ",".join(map(str, BOX)), "--max-new-tokens", 8,
                    "--json", "--draw", drawn)
    assert result.exit_code == 0, result.output
    entity = json.loads(result.stdout)[0]["entities"][0]
    expected = segmenting_engine.predict(sample_images[0], TaskInput(Task.REFERRING_GENERATION, boxes=(BOX,)),
                                         GenerationParams(max_new_tokens=8, masks=True)).entities[0]
    assert [Mask(tuple(m["size"]), m["counts"]) for m in entity["masks"]] == list(expected.masks)
    assert entity["mask_scores"] == list(expected.mask_scores)
    plain = tmp_path / "plain.png"
    invoke("predict", image_file, "--model", tiny_model_dir, "--task", "referring_generation", "--box",
           ",".join(map(str, BOX)), "--max-new-tokens", 8, "--draw", plain)
    masked_pixels = expected.masks[0].to_array()
    difference = np.any(np.asarray(Image.open(drawn)) != np.asarray(Image.open(plain)), axis=-1)
    assert difference[masked_pixels].mean() > 0.9  # the mask's pixels are tinted


def test_predict_text_shows_each_masks_score(image_file, tiny_model_dir, tiny_segmenter_dir):
    result = invoke("predict", image_file, "--model", tiny_model_dir, "--segmenter", tiny_segmenter_dir, "--masks",
                    "--task", "referring_generation", "--box", ",".join(map(str, BOX)), "--max-new-tokens", 8)
    assert result.exit_code == 0, result.output
    assert " score 1.00 mask " in result.output


def test_masks_without_a_segmenter_are_refused_before_loading(image_file, tiny_model_dir):
    result = CliRunner().invoke(main, ["predict", str(image_file), "--model", str(tiny_model_dir), "--masks"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: --masks: Masks need a segmenter: add --segmenter MODEL")


def test_a_segmenter_that_is_no_sam_is_one_line(image_file, tiny_model_dir):
    result = CliRunner().invoke(main, ["predict", str(image_file), "--model", str(tiny_model_dir), "--segmenter",
                                       str(tiny_model_dir), "--masks"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "is a 'kosmos-2' model, not a Segment Anything model" in result.output


def test_annotate_records_carry_masks(tmp_path, sample_images, tiny_model_dir, tiny_segmenter_dir, segmenting_engine):
    photos = tmp_path / "photos"
    photos.mkdir()
    for number, image in enumerate(sample_images):
        image.save(photos / f"{number}.png")
    out = tmp_path / "records.jsonl"
    result = invoke("annotate", photos, "--out", out, "--model", tiny_model_dir, "--segmenter", tiny_segmenter_dir,
                    "--masks", "--task", "referring_generation", "--box", ",".join(map(str, BOX)),
                    "--max-new-tokens", 8, "--min-score", 0)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == len(sample_images)
    for record in records:
        image = Image.open(record["resolved"]).convert("RGB")
        expected = segmenting_engine.predict(image, TaskInput(Task.REFERRING_GENERATION, boxes=(BOX,)),
                                             GenerationParams(max_new_tokens=8, masks=True)).entities[0]
        entity = record["entities"][0]
        assert list(entity)[:2] == ["phrase", "class"]
        assert [Mask(tuple(m["size"]), m["counts"]) for m in entity["masks"]] == list(expected.masks)
        assert entity["mask_scores"] == list(expected.mask_scores)


def test_tiny_segmenter_writes_a_folder_the_segmenter_loads(tmp_path):
    result = invoke("tiny-segmenter", tmp_path / "sam", "--family", "sam_hq")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "sam" / "config.json").read_text())["model_type"] == "sam_hq"


def test_serve_refuses_a_missing_segmenter_before_starting(tmp_path, tiny_model_dir):
    missing = tmp_path / "no-such-segmenter"
    result = CliRunner().invoke(main, ["serve", "--model", str(tiny_model_dir), "--segmenter", str(missing)])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: --segmenter '{missing}' is not a folder; pass a checkpoint folder or a hub id."


@pytest.mark.skipif(is_torchvision_available() or is_timm_available(), reason="this environment has torchvision or timm")
@pytest.mark.parametrize(("family", "needs"), [("sam2", "torchvision"), ("edgetam", "torchvision and timm")])
def test_a_segmenter_whose_packages_are_missing_is_one_line_saying_what_to_install(image_file, tmp_path,
                                                                                   tiny_model_dir, family, needs):
    folder = tmp_path / family
    sam2_config(family).save_pretrained(folder)  # its config is what start-up reads before loading anything
    what = (f"needs {needs}, not installed here: install the torchvision made for this torch {torch.__version__}, "
            f'from the package index it came from (pip install "torchvision=={torchvision_release(torch.__version__)}.*"')
    for arguments in (["predict", image_file, "--model", tiny_model_dir, "--segmenter", folder, "--masks"],
                      ["serve", "--model", tiny_model_dir, "--segmenter", folder],
                      ["tiny-segmenter", tmp_path / "built", "--family", family]):
        result = CliRunner().invoke(main, [str(a) for a in arguments])
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert what in result.output
        assert result.output.startswith(f"Error: --segmenter '{folder}' ({family}) " if "--segmenter" in arguments
                                        else f"Error: --family {family} ")
