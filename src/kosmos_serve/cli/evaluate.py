"""`evaluate`: score a model's grounding (and a segmenter's masks) on the project's JSONL records or on the paper's
benchmarks, or a Kosmos-2.5's reading of pages."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from kosmos_serve.cli.options import ray_job_options, ray_options, segmenter_option, settings_from_flags
from kosmos_serve.config import EngineSettings, ServerSettings
from kosmos_serve.errors import InvalidRequestError

# Commands import their work lazily: --help and argument errors answer without loading torch or Ray.


@click.command()
@click.option("--model", help="Hub id, folder, or 'demo'.")
@click.option("--data", "data_file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The project's own grounded JSONL records (README: Training).")
@click.option("--benchmark", help="refcoco, refcoco+, refcocog or flickr30k: the paper's benchmark, scored with the "
                                  "original evaluation's prompts and protocol; detection: COCO-format ground truth, "
                                  "each category's phrase asked (task detection), scored by COCOeval, score AUROC and "
                                  "a min_score table; ocr: a Kosmos-2.5's reading of pages (task ocr) against JSONL "
                                  "ground truth of their lines, scored by CER, WER and line-box F1 at IoU>=0.5.")
@click.option("--annotations", multiple=True, type=click.Path(path_type=Path),
              help="--benchmark: an MDETR annotation file (finetune_refcoco_val.json, "
                   "final_flickr_separateGT_test.json, ...), for detection a COCO ground-truth JSON, for ocr a JSONL "
                   "of each image's lines (README: Reading pages; `kosmos-serve data pages` writes one); repeat for "
                   "several splits.")
@click.option("--images", type=click.Path(path_type=Path),
              help="--benchmark: the folder the annotations' file names are relative to, or the one holding the "
                   "image files (COCO 2014: the folder with train2014/ and val2014/; Flickr30k: the .jpg folder).")
@click.option("--flickr-entities", type=click.Path(path_type=Path),
              help="flickr30k: the official Flickr30k Entities folder (Sentences/, Annotations/): true boxes and "
                   "entity types from there, as the original evaluation reads them (per-type recall).")
@click.option("--ontology", type=click.Path(dir_okay=False, path_type=Path),
              help="detection: the phrases to ask for each category, as annotate's (a JSON object: phrase -> class "
                   "name, the class a category's name); only the categories it names are scored.")
@click.option("--limit", type=click.IntRange(min=1), help="--benchmark: score a fixed sample of N examples (detection: "
                                                           "images) per file.")
@click.option("--url", help="--benchmark: score through a running kosmos-serve service (its /v1/generate) instead of "
                            "loading the model here; an API key goes in KOSMOS_API_KEY.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="--benchmark: predictions JSONL, a line per example; an interrupted run is continued from it.")
@click.option("--quantize", type=click.Choice(["none", "int8", "int4", "auto"]), default="none", show_default=True,
              help="Score the model with int8 or int4 weights (CPU; auto: the formats fastest on this CPU), to compare "
                   "with float32.")
@click.option("--no-repeat-ngram-size", type=click.IntRange(min=0),
              help="Forbid repeating n-grams of this size while decoding (default: 0 with --data, plain greedy, which "
                   "a caption of several objects needs; 3 with --benchmark, as the original evaluation; 0 with ocr, "
                   "as Kosmos-2.5's model doc).")
@click.option("--max-new-tokens", type=click.IntRange(min=1),
              help="--benchmark: new tokens per prompt (default 128, the original allowed 500 in all; ocr: 1024, "
                   "Kosmos-2.5's default).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="--benchmark: prompts run (or sent) together.")
@segmenter_option
@click.option("--masks-from-true-boxes", is_flag=True,
              help="Measure the --segmenter alone: mask each true box (no Kosmos-2 is loaded; no --model) and score "
                   "the masks against the true ones.")
@ray_options
def evaluate(model, data_file, benchmark, annotations, images, flickr_entities, ontology, limit, url, out, quantize,
             no_repeat_ngram_size, max_new_tokens, batch_size, segmenter, masks_from_true_boxes, ray_address, workers,
             cpus_per_worker, gpus_per_worker):
    """Score a model's grounding (--data, or the paper's benchmarks) or a Kosmos-2.5's reading (--benchmark ocr).

    --data: referring IoU>=0.5, caption recall, region descriptions exact. --benchmark: RefCOCO/+/g accuracy
    (the first box at IoU>=0.5) and Flickr30k Entities recall@1/5/10, each split beside the paper's figure;
    detection: COCOeval AP, AP50 and AR@100 with the boxes' scores and with every score 1.0, the score's AUROC for
    phrases present against absent, and per min_score the absent phrases that keep a box and the objects found;
    ocr (Kosmos-2.5): each page's character and word error rates, its lines' boxes matched one to one at IoU>=0.5
    (precision, recall, F1) and the matched lines' character error rate.

    With --segmenter, on true masks (--data records with "masks", as `data shapes` writes them; detection ground
    truth with "segmentation"): every box gets a mask, and each true object that a box found (its phrase's or
    category's best-scored box at IoU>=0.5) is scored by the IoU of that box's mask with its own: their mean and
    the share at IoU>=0.5 (detection: COCOeval segm AP, AP50, AR@100 too). --masks-from-true-boxes measures the
    segmenter alone: each object's mask from its true box, no Kosmos-2.

    \b
    Examples:
      kosmos-serve evaluate --model demo --data data/shapes-eval/records.jsonl
      kosmos-serve evaluate --model microsoft/kosmos-2-patch14-224 --benchmark refcoco \\
          --annotations mdetr_annotations/finetune_refcoco_val.json --images coco2014 --out refcoco-val.jsonl
      kosmos-serve evaluate --benchmark flickr30k --url http://gpu-box:8000 \\
          --annotations mdetr_annotations/final_flickr_separateGT_test.json --images flickr30k-images
      kosmos-serve evaluate --model demo --benchmark detection \\
          --annotations data/shapes-eval/coco/instances_synthetic.json --images data/shapes-eval/images
      kosmos-serve evaluate --model demo --segmenter demo --data data/shapes-eval/records.jsonl
      kosmos-serve evaluate --segmenter demo --masks-from-true-boxes --data data/shapes-eval/records.jsonl
      kosmos-serve evaluate --model microsoft/kosmos-2.5 --benchmark ocr \\
          --annotations data/pages/pages.jsonl --images data/pages --out pages-predictions.jsonl
    """
    segmenter = settings_from_flags(EngineSettings, {"segmenter": segmenter}).segmenter  # or KOSMOS_SEGMENTER
    if masks_from_true_boxes:
        _check_true_boxes(segmenter, model, url, quantize, ray_address)
    benchmark_options = {"--annotations": annotations, "--images": images, "--flickr-entities": flickr_entities,
                         "--ontology": ontology,
                         "--limit": limit, "--url": url, "--out": out, "--max-new-tokens": max_new_tokens,
                         "--ray": ray_address is not None, "--workers": workers != 1,
                         "--cpus-per-worker": cpus_per_worker != 1.0, "--gpus-per-worker": gpus_per_worker}
    if benchmark is None:
        given = [name for name, value in benchmark_options.items() if value]
        if given:
            raise InvalidRequestError(f"{', '.join(given)}: only with --benchmark NAME.")
        if data_file is None or not (model or masks_from_true_boxes):
            raise InvalidRequestError(
                "Give --model and --data FILE (the project's JSONL records), or --benchmark NAME with --annotations "
                "FILE and --images DIR (and --model, or --url of a running service).")
        from kosmos_serve.training.records import read_examples

        examples = read_examples(data_file)
        if segmenter is not None and not any(example.masks for example in examples):
            raise InvalidRequestError(f'--segmenter: {data_file} gives no true masks to score masks against (a "masks" '
                                      'list beside "boxes", as kosmos-serve data shapes writes them).')
        if masks_from_true_boxes:
            click.echo(true_box_scores(segmenter, examples))
        else:
            click.echo(data_scores(model, examples, quantize, no_repeat_ngram_size or 0, segmenter))
        return
    from kosmos_serve.evaluation.datasets import BENCHMARKS
    from kosmos_serve.evaluation.report import format_report
    from kosmos_serve.evaluation.runner import (
        DEFAULT_MAX_NEW_TOKENS,
        OCR_MAX_NEW_TOKENS,
        ORIGINAL_NO_REPEAT_NGRAM_SIZE,
        evaluate_benchmark,
    )

    if benchmark not in BENCHMARKS:
        raise InvalidRequestError(f"Unknown benchmark {benchmark!r}; choose one of: {', '.join(BENCHMARKS)}.")
    if data_file is not None or not annotations or images is None:
        raise InvalidRequestError("--benchmark takes --annotations FILE (MDETR's; detection: COCO ground truth; ocr: "
                                  "JSONL of each image's lines) and --images DIR, not --data.")
    if ontology is not None and benchmark != "detection":
        raise InvalidRequestError("--ontology: only with --benchmark detection.")
    if flickr_entities is not None and benchmark != "flickr30k":
        raise InvalidRequestError("--flickr-entities: only with --benchmark flickr30k.")
    if segmenter is not None and benchmark != "detection":
        raise InvalidRequestError(f"--segmenter: masks are scored on --data records with masks or --benchmark "
                                  f"detection ground truth with segmentation; {benchmark} has no masks (leave out "
                                  "--segmenter, and KOSMOS_SEGMENTER).")
    if segmenter is not None and url:
        raise InvalidRequestError("--segmenter loads the segmenter here; through --url masks are not scored (leave out "
                                  "--segmenter, and KOSMOS_SEGMENTER, or run here with --model).")
    if bool(model) == bool(url) and not masks_from_true_boxes:
        raise InvalidRequestError("--benchmark needs --model (run here) or --url (a running service), one of them.")
    if url and quantize != "none":
        raise InvalidRequestError("--quantize is the service's to choose with --url (kosmos-serve serve --quantize).")
    if url and ray_address is not None:
        raise InvalidRequestError("--ray runs the model on a Ray cluster, --url through a service: one of them.")
    ocr = benchmark == "ocr"
    if no_repeat_ngram_size is None:
        no_repeat_ngram_size = 0 if ocr else ORIGINAL_NO_REPEAT_NGRAM_SIZE
    outcome = evaluate_benchmark(
        benchmark, annotations, images, model=model, url=url, out=out, limit=limit, flickr_entities=flickr_entities,
        quantize=quantize, batch_size=batch_size, show_progress=sys.stderr.isatty(),
        on_cluster=_on_ray_cluster(ray_address, workers, cpus_per_worker, gpus_per_worker, batch_size),
        no_repeat_ngram_size=no_repeat_ngram_size,
        max_new_tokens=max_new_tokens or (OCR_MAX_NEW_TOKENS if ocr else DEFAULT_MAX_NEW_TOKENS),
        api_key=_service_key() if url else None,
        ontology=ontology, segmenter=segmenter, masks_from_true_boxes=masks_from_true_boxes,
    )
    click.echo(format_report(outcome))
    if outcome.interrupted:
        sys.exit(130)


def _check_true_boxes(segmenter, model, url, quantize, ray_address) -> None:
    """--masks-from-true-boxes: a segmenter is given, and nothing that runs Kosmos-2."""
    if segmenter is None:
        raise InvalidRequestError("--masks-from-true-boxes measures a segmenter alone: add --segmenter MODEL (or set "
                                  "KOSMOS_SEGMENTER), e.g. --segmenter demo.")
    given = {"--model": model, "--url": url, "--quantize": quantize != "none", "--ray": ray_address is not None}
    kosmos = [flag for flag, value in given.items() if value]
    if kosmos:
        raise InvalidRequestError(f"--masks-from-true-boxes runs the segmenter alone, no Kosmos-2: leave out "
                                  f"{', '.join(kosmos)}.")


def _service_key() -> str | None:
    """The API key for --url: KOSMOS_API_KEY, the setting the service itself reads its key from."""
    key = ServerSettings().api_key
    return key.get_secret_value() if key is not None else None


def _on_ray_cluster(ray_address, workers, cpus_per_worker, gpus_per_worker, batch_size):
    """evaluate_on_ray for --ray (None without it)."""
    options = ray_job_options(ray_address, workers, cpus_per_worker, gpus_per_worker)
    if options is None:
        return None
    from kosmos_serve.distributed.ray_data import evaluate_on_ray

    return functools.partial(evaluate_on_ray, batch_size=batch_size, options=options, show_progress=sys.stderr.isatty())


def data_scores(model, examples, quantize: str = "none", no_repeat_ngram_size: int = 0,
                segmenter: str | None = None) -> str:
    """`model`'s scores on the project's grounded records (`evaluate --data`, and `train`'s held-out report); with a
    `segmenter`, its masks' too."""
    from kosmos_serve.engine import start_engine
    from kosmos_serve.tasks import Task
    from kosmos_serve.training.evaluate import evaluate as score
    from kosmos_serve.training.evaluate import format_scores

    engine = start_engine(EngineSettings(model=str(model), max_batch_rows=32, quantize=quantize, segmenter=segmenter))
    if Task.RAW not in engine.family.tasks:
        raise InvalidRequestError(f"--data scores a Kosmos-2's grounding, and {str(model)!r} is a {engine.family.name} "
                                  "model; score its reading with --benchmark ocr.")
    return format_scores(score(engine, examples, no_repeat_ngram_size=no_repeat_ngram_size))


def true_box_scores(segmenter: str, examples) -> str:
    """`segmenter`'s masks of the records' true boxes, alone (`evaluate --masks-from-true-boxes --data`)."""
    from kosmos_serve.engine import start_segmenter
    from kosmos_serve.training.evaluate import format_scores, true_box_masks

    return format_scores({"true boxes": true_box_masks(start_segmenter(EngineSettings(segmenter=segmenter)), examples)})
