"""Fine-tuning: label masking, loss going down, resume equal to an uninterrupted run."""

from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, Kosmos2ForConditionalGeneration

from kosmos_serve.training.config import TrainConfig
from kosmos_serve.training.records import Example, read_examples
from kosmos_serve.training.shapes import write_shapes_dataset
from kosmos_serve.training.train import IGNORE_INDEX, TrainingSet, encode_example, example_order, train


@pytest.fixture(scope="module")
def shape_examples(tmp_path_factory):
    return read_examples(write_shapes_dataset(tmp_path_factory.mktemp("shapes"), 6, seed=3))


def load(folder):
    return Kosmos2ForConditionalGeneration.from_pretrained(folder), AutoProcessor.from_pretrained(folder)


def test_labels_are_the_target_and_eos_only(tiny_model_dir, tmp_path):
    _, processor = load(tiny_model_dir)
    example = Example(tmp_path / "unused.png", "<grounding><phrase> the red circle</phrase>",
                      "<object><patch_index_0044><patch_index_0863></object>", "referring")
    ids, image_mask, labels = encode_example(processor, example)
    learnt = [token for token in labels if token != IGNORE_INDEX]
    assert processor.tokenizer.convert_ids_to_tokens(learnt) == [
        "<object>", "<patch_index_0044>", "<patch_index_0863>", "</object>", "</s>"]
    assert labels[-len(learnt):] == ids[-len(learnt):]
    assert all(label == IGNORE_INDEX for label, in_image in zip(labels, image_mask) if in_image)
    assert sum(image_mask) == 64 and len(ids) == len(labels) == len(image_mask)
    prompt = processor.tokenizer.decode(ids[: len(ids) - len(learnt)])
    assert prompt.startswith("<s><image>") and prompt.endswith("</image><grounding><phrase> the red circle</phrase>")


def test_padding_is_never_learnt(tiny_model_dir, shape_examples):
    _, processor = load(tiny_model_dir)
    batch = TrainingSet(processor, shape_examples).batch(range(8))
    padding = batch.attention_mask == 0
    assert padding.any()
    assert (batch.labels[padding] == IGNORE_INDEX).all()
    assert batch.pixel_values.shape == (8, 3, 224, 224)


def test_data_order_is_a_fixed_shuffle_per_epoch():
    first_epoch = example_order(10, seed=1, first_sample=0, samples=10)
    assert sorted(first_epoch) == list(range(10)) and first_epoch != list(range(10))
    assert example_order(10, seed=1, first_sample=7, samples=6) == (first_epoch + example_order(10, 1, 10, 10))[7:13]


def test_a_short_run_lowers_the_loss(tiny_model_dir, shape_examples, tmp_path):
    model, processor = load(tiny_model_dir)
    losses = []
    train(model, processor, TrainingSet(processor, shape_examples[:8]), tmp_path,
          TrainConfig(steps=12, batch_size=8, learning_rate=3e-3, warmup_steps=2, checkpoint_every=100),
          on_step=lambda step, loss: losses.append(loss), progress=False)
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    assert (tmp_path / "final" / "model.safetensors").exists()


class Interrupted(Exception):
    pass


def test_resumed_run_ends_with_the_same_weights(tiny_model_dir, shape_examples, tmp_path):
    config = TrainConfig(steps=6, batch_size=4, gradient_accumulation=2, learning_rate=2e-3, warmup_steps=2,
                         checkpoint_every=3, patch_supervision_weight=1.0)  # its heads are restored too

    model, processor = load(tiny_model_dir)
    whole = train(model, processor, TrainingSet(processor, shape_examples), tmp_path / "whole", config,
                  progress=False)

    def stop_after_checkpoint(step, loss):
        if step == 4:
            raise Interrupted

    model, processor = load(tiny_model_dir)
    with pytest.raises(Interrupted):
        train(model, processor, TrainingSet(processor, shape_examples), tmp_path / "cut", config,
              on_step=stop_after_checkpoint, progress=False)
    model, processor = load(tiny_model_dir)
    resumed = train(model, processor, TrainingSet(processor, shape_examples), tmp_path / "cut", config,
                    resume=True, progress=False)

    expected, actual = load(whole)[0].state_dict(), load(resumed)[0].state_dict()
    untrained = load(tiny_model_dir)[0].state_dict()
    assert any(not torch.equal(expected[name], untrained[name]) for name in expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6)


def test_box_attention_loss_reads_the_patches_of_each_box():
    from kosmos_serve.training.patch_supervision import box_attention_loss, patch_targets

    first = 100
    # A 2x2 patch grid; the box covers the upper half, so its patches are 0 and 1, cells (0, 0)-(31, 15).
    _, corners = patch_targets([((0.0, 0.0, 1.0, 0.5), [7])], side=2, vocab_size=9)
    # <s> <image> 4 image tokens </image> <object> <loc (0, 0)> <loc (31, 15)>
    labels = torch.full((1, 10), IGNORE_INDEX)
    labels[0, 8], labels[0, 9] = first + 0, first + 15 * 32 + 31
    image_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0, 0, 0]])
    attention = torch.full((1, 10, 10), 0.01)
    attention[0, 7, 2], attention[0, 7, 3] = 0.3, 0.2  # the position before the upper-left token: patches 0 and 1
    attention[0, 8, 3], attention[0, 8, 4] = 0.25, 0.5  # before the lower-right one: patch 1 (patch 2 is not the box's)
    loss = box_attention_loss(attention, {"labels": labels, "image_embeds_position_mask": image_mask},
                              corners[None], first)
    expected = -(torch.log(torch.tensor(0.5 + 1e-6)) + torch.log(torch.tensor(0.26 + 1e-6))) / 2
    torch.testing.assert_close(loss, expected)


def test_patch_supervision_training_runs_on_the_scratch_start(shape_examples, tmp_path):
    from kosmos_serve.training.scratch import build_scratch_model

    model, processor = build_scratch_model(0)
    losses = []
    config = TrainConfig(steps=3, batch_size=4, warmup_steps=1, checkpoint_every=100, patch_supervision_weight=1.0,
                         location_attention_weight=1.0)
    train(model, processor, TrainingSet(processor, shape_examples[:8]), tmp_path, config,
          on_step=lambda step, loss: losses.append(loss), progress=False)
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
    assert model.config.text_config._attn_implementation == "sdpa"  # eager only while training
    saved = load(tmp_path / "final")[0].state_dict()
    assert saved.keys() == build_scratch_model(0)[0].state_dict().keys()  # an ordinary Kosmos-2: no training heads


def test_location_attention_needs_patch_supervision(tiny_model_dir, shape_examples, tmp_path):
    from kosmos_serve.training.records import DataError

    model, processor = load(tiny_model_dir)
    with pytest.raises(DataError, match="--patch-supervision-weight"):
        train(model, processor, TrainingSet(processor, shape_examples[:4]), tmp_path,
              TrainConfig(steps=1, batch_size=2, location_attention_weight=1.0), progress=False)


def test_word_loss_is_zero_when_image_tokens_hold_their_words():
    from kosmos_serve.training.patch_supervision import WORD_CODE_SCALE, PatchSupervision
    from kosmos_serve.training.scratch import build_scratch_model

    model, processor = build_scratch_model(0)
    example = Example(kind="referring", image_path=Path("scene.png"), prompt="<grounding><phrase> the red circle</phrase>",
                      target="<object><patch_index_0000><patch_index_0528></object>")
    supervision = PatchSupervision(model, processor, [example])
    words = supervision.words_of([example.image_path])  # the upper-left quarter's patches: "the red circle"
    held = WORD_CODE_SCALE * (words @ model.get_input_embeddings().weight.detach()) @ supervision.word_turn.T
    assert supervision.word_loss(model, held, [example.image_path]).item() < 1e-8
    assert supervision.word_loss(model, torch.zeros_like(held), [example.image_path]).item() > 0.01


def test_patch_words_loss_sums_over_the_vocabulary_from_a_small_start():
    import math

    from kosmos_serve.training import patch_supervision
    from kosmos_serve.training.scratch import build_scratch_model

    model, processor = build_scratch_model(0)
    example = Example(kind="referring", image_path=Path("scene.png"), prompt="<grounding><phrase> the red circle</phrase>",
                      target="<object><patch_index_0000><patch_index_0528></object>")
    supervision = patch_supervision.PatchSupervision(model, processor, [example])
    vocab = supervision.vocab_size
    with torch.no_grad():  # every patch predicts the prior alone: each word at 1 / vocab, each corner cell at 1 / 32
        supervision.words.weight.zero_()
        supervision.corners.weight.zero_()
        supervision.corners.bias.zero_()
    features = torch.randn(1, 1 + supervision.side**2, model.config.vision_config.hidden_size)
    named = supervision.words_of([example.image_path]).sum(-1)  # 3 words on the box's patches, 0 elsewhere
    per_patch = named * math.log(1 + vocab) + (vocab - named) * math.log(1 + 1 / vocab)
    expected = patch_supervision.WORDS_WEIGHT * per_patch.mean() + math.log(32)
    torch.testing.assert_close(supervision.loss(model, features, [example.image_path]), expected, rtol=1e-4, atol=0)
    assert per_patch.mean() < 10  # the prior keeps the summed loss small at the start (0.69 x vocab without it)
