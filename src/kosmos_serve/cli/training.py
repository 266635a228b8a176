"""`train`, `train-demo`, `train-demo-segmenter`, `tiny-model`, `data shapes` and `data pages`: models, and training
and evaluation data, of one's own."""

from __future__ import annotations

from pathlib import Path

import click

from kosmos_serve.cli.evaluate import data_scores
from kosmos_serve.training.config import TrainConfig

# Commands import their work lazily: --help and argument errors answer without loading torch.


@click.command()
@click.option("--model", required=True, help="Hub id, folder, or 'scratch' for a fresh small model (see README).")
@click.option("--data", "data_file", type=click.Path(dir_okay=False, exists=True, path_type=Path), required=True,
              help="Grounded JSONL records (see README).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--eval-data", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Held-out JSONL records scored at the end (default: the first 200 training examples).")
@click.option("--steps", type=int, default=TrainConfig.steps, show_default=True)
@click.option("--batch-size", type=int, default=TrainConfig.batch_size, show_default=True)
@click.option("--gradient-accumulation", type=int, default=TrainConfig.gradient_accumulation, show_default=True)
@click.option("--learning-rate", type=float, default=TrainConfig.learning_rate, show_default=True)
@click.option("--warmup-steps", type=int, default=TrainConfig.warmup_steps, show_default=True)
@click.option("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every, show_default=True)
@click.option("--freeze-vision-steps", type=int, default=TrainConfig.freeze_vision_steps, show_default=True,
              help="Keep the vision encoder and resampler fixed for this many first steps.")
@click.option("--patch-supervision-weight", type=float, default=TrainConfig.patch_supervision_weight,
              show_default=True, help="Weight of the loss that teaches each vision patch the words and box of the "
              "grounded phrase it lies in (0: off; used to train a model from scratch).")
@click.option("--location-attention-weight", type=float, default=TrainConfig.location_attention_weight,
              show_default=True, help="Weight of the loss that teaches one decoder head to look at a box's patches "
              "while writing the box (0: off; needs --patch-supervision-weight and the --model scratch start).")
@click.option("--seed", type=int, default=TrainConfig.seed, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in OUT.")
@click.option("--threads", type=int, help="Torch intra-op threads (default: all cores).")
def train(model, data_file, out, eval_data, steps, batch_size, gradient_accumulation, learning_rate, warmup_steps,
          checkpoint_every, freeze_vision_steps, patch_supervision_weight, location_attention_weight, seed, resume,
          threads):
    """Fine-tune MODEL on DATA (or train a fresh model), writing checkpoints and OUT/final."""
    from kosmos_serve.engine.loading import quiet_transformers, set_threads
    from kosmos_serve.training import train as training
    from kosmos_serve.training.records import read_examples

    set_threads(threads)
    examples = read_examples(data_file)
    held_out = read_examples(eval_data) if eval_data else examples[:200]
    quiet_transformers()
    loaded, processor = training.load_for_training(model, seed)
    config = TrainConfig(steps=steps, batch_size=batch_size, gradient_accumulation=gradient_accumulation,
                         learning_rate=learning_rate, warmup_steps=warmup_steps, checkpoint_every=checkpoint_every,
                         freeze_vision_steps=freeze_vision_steps, patch_supervision_weight=patch_supervision_weight,
                         location_attention_weight=location_attention_weight, seed=seed)
    final = training.train(loaded, processor, training.TrainingSet(processor, examples), out, config, resume=resume)
    click.echo(f"saved {final}")
    click.echo(data_scores(final, held_out))


@click.command("train-demo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--threads", type=int, help="Torch intra-op threads (default: all cores).")
def train_demo(out, threads):
    """Rebuild the shipped demo model in OUT: data, training from scratch, held-out scores (~52 min, 2 cores).

    Run again with the same OUT to continue an interrupted run.
    """
    from kosmos_serve.engine.loading import quiet_transformers, set_threads
    from kosmos_serve.training.demo_model import build_demo_model

    set_threads(threads)
    quiet_transformers()
    click.echo(f"saved {build_demo_model(out, log=click.echo)}")


@click.command("train-demo-2.5")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--threads", type=int, help="Torch intra-op threads (default: all cores).")
def train_demo_reader(out, threads):
    """Train the reading demo attempt (a small Kosmos-2.5, not shipped: it finds lines, reads few words) in OUT: from
    scratch on synthetic pages, held-out scores (~46 min, 2 cores). Serve it with `--model OUT/final`.

    Run again with the same OUT to continue an interrupted run.
    """
    import time

    from kosmos_serve.engine.loading import quiet_transformers, set_threads
    from kosmos_serve.evaluation.datasets import OCR_BENCHMARK
    from kosmos_serve.evaluation.report import format_report
    from kosmos_serve.evaluation.runner import evaluate_benchmark
    from kosmos_serve.training import demo_reader

    set_threads(threads)
    quiet_transformers()
    pages, recipe = demo_reader.held_out_pages(out), demo_reader.RECIPE
    started = time.monotonic()
    final = demo_reader.train_reader(out, recipe, log=click.echo)
    minutes = (time.monotonic() - started) / 60
    outcome = evaluate_benchmark(OCR_BENCHMARK, [pages], pages.parent, model=str(final),
                                 max_new_tokens=demo_reader.READER_DEFAULTS.max_new_tokens, no_repeat_ngram_size=0)
    report = format_report(outcome)
    (final / demo_reader.SCORES_FILE).write_text(
        f"Held-out pages: {demo_reader.HELD_OUT_PAGES}, seed {demo_reader.HELD_OUT_SEED} (training drew its pages "
        f"from seed {demo_reader.TRAIN_SEED}); trained {recipe.steps} steps of {recipe.batch_size} pages in "
        f"{minutes:.1f} minutes.\n{report}\n")
    click.echo(report)
    click.echo(f"saved {final}")


@click.command("train-demo-segmenter")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--threads", type=int, help="Torch intra-op threads (default: all cores).")
def train_demo_segmenter(out, threads):
    """Rebuild the shipped demo segmenter in OUT: a small SAM trained on the shapes' masks, held-out IoU (~15 CPU-min).

    Run again with the same OUT to continue an interrupted run.
    """
    from kosmos_serve.engine.loading import quiet_transformers, set_threads
    from kosmos_serve.training.demo_segmenter import build_demo_segmenter

    set_threads(threads)
    quiet_transformers()
    click.echo(f"saved {build_demo_segmenter(out, log=click.echo)}")


@click.command("tiny-model")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--family", type=click.Choice(["kosmos-2", "kosmos-2.5"]), default="kosmos-2", show_default=True,
              help="Kosmos-2, or Kosmos-2.5 (reads documents: ocr, markdown).")
@click.option("--seed", type=int, default=0, show_default=True)
def tiny_model(out, family, seed):
    """Write a tiny random Kosmos-2 or Kosmos-2.5 (for tests and trying the tools offline) to folder OUT."""
    from kosmos_serve.engine.loading import quiet_transformers
    from kosmos_serve.training.tiny_kosmos25 import build_tiny_kosmos25
    from kosmos_serve.training.tiny_model import build_tiny_model

    quiet_transformers()
    build = build_tiny_kosmos25 if family == "kosmos-2.5" else build_tiny_model
    click.echo(str(build(out, seed=seed)))


@click.command("tiny-segmenter")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--family", type=click.Choice(["sam", "sam_hq", "sam2", "edgetam"]), default="sam", show_default=True,
              help="SAM, SAM-HQ, SAM 2 or EdgeTAM (SAM 2's processor needs torchvision, EdgeTAM's backbone timm).")
@click.option("--seed", type=int, default=0, show_default=True)
def tiny_segmenter(out, family, seed):
    """Write a tiny random Segment Anything model (for tests and trying --segmenter offline) to folder OUT."""
    from kosmos_serve.engine.loading import quiet_transformers
    from kosmos_serve.training.tiny_segmenter import build_tiny_segmenter

    quiet_transformers()
    click.echo(str(build_tiny_segmenter(out, family, seed=seed)))


@click.group()
def data():
    """Make training and evaluation data."""


@data.command("shapes")
@click.option("--n", "count", type=int, required=True, help="Number of scenes.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def data_shapes(count, seed, out):
    """Write synthetic scenes (1-4 coloured shapes) and their grounded JSONL records to OUT."""
    from kosmos_serve.training.shapes import write_shapes_dataset

    click.echo(str(write_shapes_dataset(out, count, seed)))


@data.command("pages")
@click.option("--n", "count", type=click.IntRange(min=1), required=True, help="Number of pages.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def data_pages(count, seed, out):
    """Write synthetic pages of rendered text and each line's text and box (pages.jsonl: OCR ground truth) to OUT."""
    from kosmos_serve.training.pages import write_pages_dataset

    click.echo(str(write_pages_dataset(out, count, seed)))
