"""`annotate` many images into a JSONL file, here or on a Ray cluster; `export` those records for labeling tools."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from kosmos_serve.cli.options import (
    decoding_options,
    generation_params_from_options,
    model_options,
    ray_job_options,
    ray_options,
    settings_from_flags,
    task_input_from_options,
    task_options,
)
from kosmos_serve.config import EngineSettings, ServerSettings
from kosmos_serve.errors import InvalidRequestError, KosmosServeError, ModelLoadError
from kosmos_serve.tasks import TASK_INPUTS, Task, parse_task

# Commands import their work lazily: --help and argument errors answer without loading torch or supervision.


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL records, one line per image; an earlier run's file is continued.")
@task_options
@click.option("--ontology", type=click.Path(dir_okay=False, path_type=Path),
              help='JSON object of prompt phrase -> class name, e.g. {"a red car": "car"}: each entity gets its '
                   "phrase's class; its phrases are the task's (detection unless --task says otherwise).")
@decoding_options
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Images run through the model together.")
@click.option("--decode-threads", type=click.IntRange(min=1), default=4, show_default=True,
              help="Threads that read and decode the next images while the model runs.")
@click.option("--quiet", is_flag=True, help="No progress bar (it shows only on a terminal anyway).")
@ray_options
@model_options
def annotate(inputs, out, task, prompt, phrases, boxes, no_grounding, ontology, max_new_tokens, sample, top_p,
             temperature, seed, no_repeat_ngram_size, min_score, nms_iou, masks, batch_size, decode_threads, quiet,
             ray_address, workers, cpus_per_worker, gpus_per_worker, **flags):
    """Annotate every image of INPUTS into one JSONL file: one record per image, resumable.

    INPUTS are folders (searched recursively), globs, image files, and manifests: a .txt of paths, or a
    .jsonl of {"image": path, "phrases": [...], "prompt": "..."} lines, whose phrases and prompt replace
    the options' for that image. Phrases alone (--phrase, --ontology or a manifest's) mean --task detection.
    Boxes scored under --min-score (default: the model's, KOSMOS_MIN_SCORE) are left out, whatever the
    task; each record says the threshold, and a file is continued only at its own threshold.
    Run the same command again to continue an interrupted run: images already in --out are skipped.
    Ctrl-C finishes the current batch, writes it and stops.

    \b
    Examples:
      kosmos-serve annotate photos/ --out boxes.jsonl --phrase "a car" --phrase "a person"
      kosmos-serve annotate "photos/**/*.jpg" --out boxes.jsonl --ontology ontology.json --quantize int8
      kosmos-serve annotate photos/ --out captions.jsonl --task detailed_caption
      kosmos-serve annotate photos/ --out masks.jsonl --phrase "a car" --segmenter facebook/sam-vit-base --masks
      kosmos-serve annotate /shared/photos --out boxes.jsonl --phrase "a car" --ray=head-node:6379 --workers 8
    """
    from kosmos_serve.collections.inputs import collect_images, read_ontology
    from kosmos_serve.collections.records import RecordAppender, read_previous
    from kosmos_serve.collections.runner import AnnotateRun, describe, engine_settings, same_run_check
    from kosmos_serve.engine import start_engine

    ray_job = ray_job_options(ray_address, workers, cpus_per_worker, gpus_per_worker)
    settings = settings_from_flags(EngineSettings, flags)
    params = generation_params_from_options(max_new_tokens, sample, top_p, temperature, seed, no_repeat_ngram_size,
                                            min_score, nms_iou, masks)
    if masks and settings.segmenter is None:
        raise InvalidRequestError("Masks need a segmenter: add --segmenter MODEL (or set KOSMOS_SEGMENTER), e.g. "
                                  "--segmenter demo.", "masks")
    params.validate(settings.max_new_tokens_cap)
    classes = read_ontology(ontology) if ontology else None
    if classes and phrases:
        raise InvalidRequestError("Give the phrases either with --phrase or in --ontology, not both.")
    entries = collect_images(inputs)
    if task is None:  # a model that does not caption (Kosmos-2.5) does its first task, ocr
        task = uncaptioned_default(settings.model)
    jobs = annotate_jobs(entries, settings, params, task, prompt, phrases, boxes, no_grounding, classes)
    previous = read_previous(out, check=same_run_check(jobs, settings.model, out))  # refuses a file of anything else
    if params.min_score is not None:  # the default is the engine's, checked as each batch is appended
        previous.check_min_score(params.min_score, out)
    if params.nms_iou is not None:  # as min_score
        previous.check_nms_iou(params.nms_iou, out)
    settings = engine_settings(settings, jobs, batch_size)
    show_progress = not quiet and sys.stderr.isatty()
    if ray_job is not None:
        from kosmos_serve.distributed.ray_data import annotate_on_ray

        summary = annotate_on_ray(jobs, out, previous, settings=settings, params=params, ontology=classes,
                                  batch_size=batch_size, decode_threads=decode_threads, options=ray_job,
                                  show_progress=show_progress)
    else:
        engine = start_engine(settings)
        with RecordAppender(out, previous) as appender:
            run = AnnotateRun(engine, appender, previous.done, params=params, model=settings.model, ontology=classes,
                              batch_size=batch_size, decode_threads=decode_threads, show_progress=show_progress)
            summary = run.run(jobs)
    click.echo(describe(summary, out))
    if summary.interrupted:
        sys.exit(128 + summary.stopped_by)  # the shell's code for "ended by this signal": 130 for Ctrl-C


def uncaptioned_default(model: str) -> str | None:
    """The first task of a `model` that has no caption task (Kosmos-2.5: ocr); None for a Kosmos-2, or when its
    config is not here yet (a hub id never downloaded: loading it says what it takes, later, as it always has)."""
    from kosmos_serve.engine.loading import model_family

    try:
        tasks = model_family(model).tasks
    except ModelLoadError:
        return None
    return None if Task.CAPTION in tasks else tasks[0].value


def annotate_jobs(entries, settings, params, task, prompt, phrases, boxes, no_grounding, ontology):
    """Each image's job: the options' task inputs, or its manifest line's phrases and prompt; all checked up front."""
    from kosmos_serve.collections.runner import Job, check_inputs

    checked = {}
    jobs = []
    for entry in entries:
        own = (entry.phrases, entry.prompt)
        if own not in checked:
            wanted, asked = entry.phrases or phrases, entry.prompt or prompt
            try:
                if ontology and not wanted and (task is None or "phrases" in TASK_INPUTS[parse_task(task)]):
                    wanted = tuple(ontology)
                chosen = Task.DETECTION.value if task is None and wanted and not asked and not boxes else task
                task_input = task_input_from_options(chosen, asked, wanted, boxes, no_grounding)
                specs = check_inputs(task_input, params, settings)
            except KosmosServeError as error:
                if own == (None, None):
                    raise
                raise type(error)(f"{entry.origin}: {error.message}") from error
            checked[own] = (task_input, "\n".join(spec.text for spec in specs))
        jobs.append(Job(entry, *checked[own]))
    return jobs


@click.command()
@click.argument("records", type=click.Path(path_type=Path))
@click.option("--format", "format_name", required=True, metavar="FORMAT",
              help="coco (a COCO detection dataset), label-studio (tasks with predictions), or text or markdown (a "
                   "folder of one .txt or .md file per image: its text or markdown).")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="The file to write (text and markdown: the folder).")
@click.option("--relative-to", type=click.Path(file_okay=False, path_type=Path),
              help="Folder that image names (COCO file_name, Label Studio paths) are relative to; default: the "
                   "deepest folder holding every image, or for label-studio's local files "
                   "$LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT when set.")
@click.option("--image-root", metavar="URL",
              help="label-studio: prefix of each image reference (default /data/local-files/?d=, Label Studio's "
                   "local files under LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT).")
@click.option("--from-name", help="label-studio: name of the RectangleLabels control (default label); a line read's "
                                  "text goes to the TextArea transcription, as in Label Studio's OCR template.")
@click.option("--to-name", help="label-studio: name of the Image object (default image).")
@click.option("--label-config", type=click.Path(dir_okay=False, path_type=Path),
              help="label-studio: also write a labeling config with these names and every label here.")
@click.option("--mask-format", metavar="brush|polygon",
              help="label-studio: each box's mask (records of annotate --masks) as a brushlabels or polygonlabels "
                   "region, not a rectangle.")
def export(records, format_name, out, relative_to, image_root, from_name, to_name, label_config, mask_format):
    """Export annotation RECORDS (the JSONL of kosmos-serve annotate) as COCO, Label Studio tasks, or text files.

    Failed records are left out; boxes with reversed corners are put in order, boxes of zero size
    left out; the summary counts each. Lines read (annotate --task ocr) are objects too: in COCO with
    their text in attributes.text, in Label Studio a rectangle and its transcription (its OCR template).
    Image names keep their folders under --out for text and markdown, with .txt or .md for their suffix.
    For supervision.Detections use the Python helper kosmos_serve.exports.to_detections.

    \b
    Examples:
      kosmos-serve export results.jsonl --format coco --out coco.json
      kosmos-serve export results.jsonl --format label-studio --out tasks.json --label-config config.xml
      kosmos-serve export masks.jsonl --format label-studio --mask-format brush --out tasks.json
      kosmos-serve export pages.jsonl --format markdown --out pages/
    """
    from kosmos_serve.exports import export_records

    if format_name == "label-studio" and image_root is None and relative_to is None:  # what ?d= is relative to
        relative_to = ServerSettings().label_studio_local_files_document_root or None
    report = export_records(records, format_name, out, relative_to=relative_to, image_root=image_root,
                            from_name=from_name, to_name=to_name, label_config=label_config, mask_format=mask_format)
    click.echo(report.summary())
