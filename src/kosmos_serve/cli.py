"""The `kosmos-serve` command line: one command per job, thin over the library."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import click
from pydantic import ValidationError

from kosmos_serve.config import EngineSettings
from kosmos_serve.engine.loading import quiet_transformers
from kosmos_serve.errors import InvalidRequestError, KosmosServeError
from kosmos_serve.tasks import TASK_DESCRIPTIONS, Task, parse_box
from kosmos_serve.training.config import TrainConfig

TASK_HELP = "\n".join(f"{task.value}: {text}." for task, text in TASK_DESCRIPTIONS.items())


class FriendlyErrors(click.Group):
    """A group that shows domain errors as one line and exit code 1, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KosmosServeError as error:
            click.echo(f"Error: {error.message}", err=True)
            sys.exit(1)
        except ValidationError as error:  # a KOSMOS_* variable or flag that the settings refuse
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
            click.echo(f"Error: invalid setting ({problems}).", err=True)
            sys.exit(1)






def model_options(command):
    """--model, --device, --dtype and --quantize, each also read from its environment variable."""
    options = [
        click.option("--model", envvar="KOSMOS_MODEL", help="Hub id or local folder.  [env: KOSMOS_MODEL]"),
        click.option("--device", envvar="KOSMOS_DEVICE", help="auto, cpu, cuda, mps.  [env: KOSMOS_DEVICE]"),
        click.option("--dtype", envvar="KOSMOS_DTYPE", type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
                     help="Weight dtype.  [env: KOSMOS_DTYPE]"),
        click.option("--quantize", envvar="KOSMOS_QUANTIZE", type=click.Choice(["none", "int8", "auto"]),
                     help="auto: per part, the weight format fastest on this CPU (the choice for speed); "
                          "int8: int8 linear layers on the CPU.  [env: KOSMOS_QUANTIZE]"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def listen_options(command):
    """--host and --port of the service."""
    command = click.option("--port", envvar="PORT", type=int, help="TCP port (default 8000).  [env: PORT]")(command)
    return click.option("--host", envvar="KOSMOS_HOST",
                        help="Address to listen on (default 127.0.0.1).  [env: KOSMOS_HOST]")(command)


def ray_options(command):
    """--ray [ADDRESS], --workers, --cpus-per-worker, --gpus-per-worker: the job on a Ray cluster (Ray Data)."""
    options = [
        click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
                     help="Run on a Ray cluster (pip install 'kosmos-serve[ray]'): ADDRESS (HOST:PORT, ray://HOST:10001 "
                          "or auto) joins it; without one, RAY_ADDRESS, else a new local cluster. Image paths must be "
                          "the same on every node."),
        click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
                     help="--ray: workers, each an actor holding its own engine."),
        click.option("--cpus-per-worker", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
                     help="--ray: CPUs each worker claims (its torch threads)."),
        click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=0.0, show_default=True,
                     help="--ray: GPUs each worker claims (the engine then runs on a GPU)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def ray_job_options(ray_address, workers, cpus_per_worker, gpus_per_worker):
    """The RayOptions the options ask for, or None without --ray (the Ray-only options refused then)."""
    if ray_address is None:
        if workers != 1 or cpus_per_worker != 1.0 or gpus_per_worker:
            raise InvalidRequestError("--workers, --cpus-per-worker and --gpus-per-worker go with --ray.")
        return None
    from kosmos_serve.distributed.cluster import check_address, require_ray

    require_ray()
    from kosmos_serve.distributed.ray_data import RayOptions

    return RayOptions(check_address(ray_address or None), workers, cpus_per_worker, gpus_per_worker)


@click.group(cls=FriendlyErrors)
@click.version_option(package_name="kosmos-serve")
def main():
    """kosmos-serve: run Microsoft's Kosmos-2 grounded multimodal model."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@model_options
@listen_options
@click.option("--max-batch-size", envvar="MAX_BATCH_SIZE", type=int,
              help="Most requests batched together (default 2).  [env: MAX_BATCH_SIZE]")
@click.option("--workers", envvar="NUM_API_SERVERS", type=int,
              help="Worker processes, each with its own model (default 1).  [env: NUM_API_SERVERS]")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Run as a Ray Serve application (pip install 'kosmos-serve[ray]'): ADDRESS (HOST:PORT, "
                   "ray://HOST:10001 or auto) joins that cluster; without one, RAY_ADDRESS, else a new local cluster.")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="--ray: replicas, each with its own model, batcher and image cache.")
@click.option("--autoscale", metavar="MIN,MAX", help="--ray: scale between MIN and MAX replicas with the load.")
@click.option("--cpus-per-replica", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="--ray: CPUs each replica claims (its torch threads).")
@click.option("--gpus-per-replica", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="--ray: GPUs each replica claims (its engine then runs on a GPU).")
def serve(model, device, dtype, host, port, max_batch_size, workers, quantize, ray_address, replicas, autoscale,
          cpus_per_replica, gpus_per_replica):
    """Run the HTTP service: POST /predict (drop-in), /v1 JSON API, /docs, /health, /ready, /metrics.

    Every setting is also an environment variable (README: Configuration); the API key is one only
    (KOSMOS_API_KEY), so it never shows in a process list. With --ray, the same service runs as a Ray
    Serve application on a cluster (the web demo aside).
    """
    flags = {"KOSMOS_MODEL": model, "KOSMOS_DEVICE": device, "KOSMOS_DTYPE": dtype, "KOSMOS_QUANTIZE": quantize,
             "KOSMOS_HOST": host, "PORT": port, "MAX_BATCH_SIZE": max_batch_size, "NUM_API_SERVERS": workers}
    if ray_address is None:
        if replicas != 1 or autoscale or cpus_per_replica != 1.0 or gpus_per_replica:
            raise InvalidRequestError("--replicas, --autoscale, --cpus-per-replica and --gpus-per-replica go with --ray.")
        start_service(flags)
        return
    import os
    from unittest import mock

    from kosmos_serve.distributed.cluster import require_ray

    require_ray()
    from kosmos_serve.config import ServerSettings
    from kosmos_serve.distributed.ray_serve import ServeOptions, serve_on_ray

    if workers not in (None, 1):  # NUM_API_SERVERS=1 (the default) is fine
        raise InvalidRequestError("--workers is for one machine; with --ray, use --replicas or --autoscale.")
    options = ServeOptions(ray_address or None, replicas, parse_autoscale(autoscale) if autoscale else None,
                           cpus_per_replica, gpus_per_replica)
    given = {name: str(value) for name, value in flags.items() if value is not None}
    with mock.patch.dict(os.environ, given):  # the settings read flags over the environment, which stays as it was
        settings, engine_settings = ServerSettings(), EngineSettings()
    serve_on_ray(settings, engine_settings, options, announce=click.echo)


def parse_autoscale(value: str) -> tuple[int, int]:
    """`MIN,MAX` replicas -> (MIN, MAX), 1 <= MIN <= MAX.

    >>> parse_autoscale("1,4")
    (1, 4)
    """
    low, _, high = value.replace(" ", "").partition(",")
    if not (low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high)):
        raise InvalidRequestError(f"--autoscale {value!r}: write MIN,MAX replicas with 1 <= MIN <= MAX, e.g. 1,4.")
    return int(low), int(high)


TASK_OPTION_FLAGS = {"prompt": "--prompt", "phrases": "--phrase", "boxes": "--box", "grounding": "--no-grounding"}


def task_options(command):
    """--task and its inputs: --prompt, --phrase, --box, --no-grounding."""
    options = [
        click.option("--task", help=f"Default: caption, or raw when only --prompt is given (the prompt as given, as POST "
                          f"/predict uses it).\n\n{TASK_HELP}"),
        click.option("--prompt", help="Question (grounded_vqa, region_vqa) or whole prompt (raw)."),
        click.option("--phrase", "phrases", multiple=True, help="A phrase to ground or find; repeat for several."),
        click.option("--box", "boxes", multiple=True, callback=lambda _c, _p, v: tuple(parse_box(b) for b in v),
                     help="x1,y1,x2,y2 in image pixels; repeat for several."),
        click.option("--no-grounding", is_flag=True, help="raw task: do not prepend <grounding>."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def decoding_options(command):
    """--max-new-tokens, --sample, --top-p, --temperature, --seed, --no-repeat-ngram-size."""
    options = [
        click.option("--max-new-tokens", type=int, help="New tokens to generate (default: the model's, else 128)."),
        click.option("--sample", is_flag=True, help="Sample (top-p, temperature) instead of greedy decoding."),
        click.option("--top-p", type=float, default=0.9, show_default=True),
        click.option("--temperature", type=float, default=0.7, show_default=True),
        click.option("--seed", type=int, help="Seed for sampling."),
        click.option("--no-repeat-ngram-size", type=int,
                     help="Forbid repeating n-grams of this size (0: off; default: the model's, else the original "
                          "demo's 3)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def task_input_from_options(task, prompt, phrases, boxes, no_grounding):
    """The TaskInput the options ask for; an option the task does not use is an error naming what it takes."""
    from kosmos_serve.tasks import TASK_INPUTS, TaskInput, parse_task

    if task is None and prompt and not phrases and not boxes:
        return TaskInput(Task.RAW, prompt=prompt, grounding=False)  # used as given, as POST /predict does
    task_input = TaskInput(task=task or Task.CAPTION, prompt=prompt, phrases=phrases, boxes=boxes,
                           grounding=not no_grounding)
    chosen = parse_task(task_input.task)
    unused = [TASK_OPTION_FLAGS[name] for name in task_input.given_inputs() if name not in TASK_INPUTS[chosen]]
    if unused:
        takes = ", ".join(TASK_OPTION_FLAGS[name] for name in TASK_INPUTS[chosen]) or "no options"
        raise InvalidRequestError(f"--task {chosen.value} does not use {' or '.join(unused)}; it takes {takes}.")
    return task_input


def generation_params_from_options(max_new_tokens, sample, top_p, temperature, seed, no_repeat_ngram_size):
    """The GenerationParams the decoding options ask for."""
    from kosmos_serve.generation import GenerationParams

    return GenerationParams(max_new_tokens=max_new_tokens, do_sample=sample, top_p=top_p, temperature=temperature,
                            seed=seed, no_repeat_ngram_size=no_repeat_ngram_size)


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@task_options
@decoding_options
@click.option("--json", "as_json", is_flag=True, help="Print results as a JSON list.")
@click.option("--draw", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the annotated image here (with several images: NAME_1.png, NAME_2.png, ...).")
@model_options
def predict(images, task, prompt, phrases, boxes, no_grounding, max_new_tokens, sample, top_p, temperature, seed,
            no_repeat_ngram_size, as_json, draw, model, device, dtype, quantize):
    """Describe and ground IMAGES; prints the text, then each entity with its pixel boxes.

    \b
    Examples:
      kosmos-serve predict snowman.png
      kosmos-serve predict snowman.png --task phrase_grounding --phrase "a snowman"
      kosmos-serve predict snowman.png --task referring_generation --box 250,22,630,397
      kosmos-serve predict snowman.png --prompt "<grounding> Describe this image in detail:"
    """
    from kosmos_serve.engine import Request, check_task, start_engine

    flags = {"model": model, "device": device, "dtype": dtype, "quantize": quantize}
    settings = EngineSettings(**{key: value for key, value in flags.items() if value})
    task_input = task_input_from_options(task, prompt, phrases, boxes, no_grounding)
    params = generation_params_from_options(max_new_tokens, sample, top_p, temperature, seed, no_repeat_ngram_size)
    loaded = [load_image_file(path, settings.max_image_pixels) for path in images]
    requests = [Request(image, task_input, params) for image in loaded]
    for request in requests:  # refuse bad input before spending seconds on loading the model
        check_task(request.task, request.params, settings, request.image.size)
    results = start_engine(settings).run(requests)
    if as_json:
        payload = [{"image": str(path), **result.to_dict()} for path, result in zip(images, results)]
        click.echo(json.dumps(payload, indent=2, ensure_ascii=False))
    else:
        for path, result in zip(images, results):
            click.echo(summary(path, result))
    if draw:
        from kosmos_serve.drawing import draw_entities

        for number, (image, result) in enumerate(zip(loaded, results), start=1):
            target = draw if len(loaded) == 1 else draw.with_name(f"{draw.stem}_{number}{draw.suffix}")
            draw_entities(image, result.entities).save(target)


def load_image_file(path: Path, max_pixels: int):
    """Load one image for the CLI; an error names the file it is about."""
    from kosmos_serve.images import load_image

    try:
        return load_image(path, max_pixels=max_pixels)
    except KosmosServeError as error:
        raise type(error)(f"{path}: {error.message}") from error


def summary(path: Path, result) -> str:
    """A readable block: image and size, the text, then each entity with its pixel boxes."""
    width, height = result.image_size
    lines = [f"{path} ({width}x{height})", f"  {result.text}"]
    for entity in result.entities:
        boxes = "  ".join(str(list(box)) for box in entity.pixel_boxes)
        lines.append(f"  - {entity.phrase}: {boxes}")
    return "\n".join(lines)


@main.command()
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
             temperature, seed, no_repeat_ngram_size, batch_size, decode_threads, quiet, ray_address, workers,
             cpus_per_worker, gpus_per_worker, model, device, dtype, quantize):
    """Annotate every image of INPUTS into one JSONL file: one record per image, resumable.

    INPUTS are folders (searched recursively), globs, image files, and manifests: a .txt of paths, or a
    .jsonl of {"image": path, "phrases": [...], "prompt": "..."} lines, whose phrases and prompt replace
    the options' for that image. Phrases alone (--phrase, --ontology or a manifest's) mean --task detection.
    Run the same command again to continue an interrupted run: images already in --out are skipped.
    Ctrl-C finishes the current batch, writes it and stops.

    \b
    Examples:
      kosmos-serve annotate photos/ --out boxes.jsonl --phrase "a car" --phrase "a person"
      kosmos-serve annotate "photos/**/*.jpg" --out boxes.jsonl --ontology ontology.json --quantize int8
      kosmos-serve annotate photos/ --out captions.jsonl --task detailed_caption
      kosmos-serve annotate /shared/photos --out boxes.jsonl --phrase "a car" --ray=head-node:6379 --workers 8
    """
    from kosmos_serve.collections.inputs import collect_images, read_ontology
    from kosmos_serve.collections.records import RecordAppender, read_previous
    from kosmos_serve.collections.runner import AnnotateRun, describe, engine_settings, same_run_check
    from kosmos_serve.engine import start_engine

    ray_job = ray_job_options(ray_address, workers, cpus_per_worker, gpus_per_worker)
    flags = {"model": model, "device": device, "dtype": dtype, "quantize": quantize}
    settings = EngineSettings(**{key: value for key, value in flags.items() if value})
    params = generation_params_from_options(max_new_tokens, sample, top_p, temperature, seed, no_repeat_ngram_size)
    params.validate(settings.max_new_tokens_cap)
    classes = read_ontology(ontology) if ontology else None
    if classes and phrases:
        raise InvalidRequestError("Give the phrases either with --phrase or in --ontology, not both.")
    jobs = annotate_jobs(collect_images(inputs), settings, params, task, prompt, phrases, boxes, no_grounding, classes)
    previous = read_previous(out, check=same_run_check(jobs, settings.model, out))  # refuses a file of anything else
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


def annotate_jobs(entries, settings, params, task, prompt, phrases, boxes, no_grounding, ontology):
    """Each image's job: the options' task inputs, or its manifest line's phrases and prompt; all checked up front."""
    from kosmos_serve.collections.runner import Job, check_inputs
    from kosmos_serve.tasks import TASK_INPUTS, parse_task

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


@main.command("tiny-model")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True)
def tiny_model(out, seed):
    """Write a tiny random Kosmos-2 (for tests and trying the tools offline) to folder OUT."""
    from kosmos_serve.training.tiny_model import build_tiny_model

    quiet_transformers()
    click.echo(str(build_tiny_model(out, seed=seed)))


@main.group()
def data():
    """Make training data."""


@data.command("shapes")
@click.option("--n", "count", type=int, required=True, help="Number of scenes.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def data_shapes(count, seed, out):
    """Write synthetic scenes (1-4 coloured shapes) and their grounded JSONL records to OUT."""
    from kosmos_serve.training.shapes import write_shapes_dataset

    click.echo(str(write_shapes_dataset(out, count, seed)))


@main.command()
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
    import torch

    from kosmos_serve.training import train as training
    from kosmos_serve.training.records import read_examples

    if threads:
        torch.set_num_threads(threads)
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
    click.echo(_scores(final, held_out))


@main.command("train-demo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--threads", type=int, help="Torch intra-op threads (default: all cores).")
def train_demo(out, threads):
    """Rebuild the shipped demo model in OUT: data, training from scratch, held-out scores (~52 min, 2 cores).

    Run again with the same OUT to continue an interrupted run.
    """
    import torch

    from kosmos_serve.training.demo_model import build_demo_model

    if threads:
        torch.set_num_threads(threads)
    quiet_transformers()
    click.echo(f"saved {build_demo_model(out, log=click.echo)}")


@main.command()
@click.option("--model", help="Hub id, folder, or 'demo'.")
@click.option("--data", "data_file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The project's own grounded JSONL records (README: Training).")
@click.option("--benchmark", help="refcoco, refcoco+, refcocog or flickr30k: the paper's benchmark, scored with the "
                                  "original evaluation's prompts and protocol.")
@click.option("--annotations", multiple=True, type=click.Path(path_type=Path),
              help="--benchmark: an MDETR annotation file (finetune_refcoco_val.json, "
                   "final_flickr_separateGT_test.json, ...); repeat for several splits.")
@click.option("--images", type=click.Path(path_type=Path),
              help="--benchmark: the images (COCO 2014: the folder with train2014/ and val2014/; Flickr30k: the "
                   ".jpg folder).")
@click.option("--flickr-entities", type=click.Path(path_type=Path),
              help="flickr30k: the official Flickr30k Entities folder (Sentences/, Annotations/): true boxes and "
                   "entity types from there, as the original evaluation reads them (per-type recall).")
@click.option("--limit", type=click.IntRange(min=1), help="--benchmark: score a fixed sample of N examples per file.")
@click.option("--url", help="--benchmark: score through a running kosmos-serve service (its /v1/generate) instead of "
                            "loading the model here; an API key goes in KOSMOS_API_KEY.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="--benchmark: predictions JSONL, a line per example; an interrupted run is continued from it.")
@click.option("--quantize", type=click.Choice(["none", "int8", "auto"]), default="none", show_default=True,
              help="Score the model with int8 weights (CPU; auto: the formats fastest on this CPU), to compare "
                   "with float32.")
@click.option("--no-repeat-ngram-size", type=click.IntRange(min=0),
              help="Forbid repeating n-grams of this size while decoding (default: 0 with --data, plain greedy, which "
                   "a caption of several objects needs; 3 with --benchmark, as the original evaluation).")
@click.option("--max-new-tokens", type=click.IntRange(min=1),
              help="--benchmark: new tokens per prompt (default 128; the original allowed 500 in all).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="--benchmark: prompts run (or sent) together.")
@ray_options
def evaluate(model, data_file, benchmark, annotations, images, flickr_entities, limit, url, out, quantize,
             no_repeat_ngram_size, max_new_tokens, batch_size, ray_address, workers, cpus_per_worker, gpus_per_worker):
    """Score a model's grounding: on the project's JSONL records (--data), or on the paper's benchmarks (--benchmark).

    --data: referring IoU>=0.5, caption recall, region descriptions exact. --benchmark: RefCOCO/+/g accuracy
    (the first box at IoU>=0.5) and Flickr30k Entities recall@1/5/10, each split beside the paper's figure.

    \b
    Examples:
      kosmos-serve evaluate --model demo --data data/shapes-eval/records.jsonl
      kosmos-serve evaluate --model microsoft/kosmos-2-patch14-224 --benchmark refcoco \\
          --annotations mdetr_annotations/finetune_refcoco_val.json --images coco2014 --out refcoco-val.jsonl
      kosmos-serve evaluate --benchmark flickr30k --url http://gpu-box:8000 \\
          --annotations mdetr_annotations/final_flickr_separateGT_test.json --images flickr30k-images
    """
    benchmark_options = {"--annotations": annotations, "--images": images, "--flickr-entities": flickr_entities,
                         "--limit": limit, "--url": url, "--out": out, "--max-new-tokens": max_new_tokens,
                         "--ray": ray_address is not None, "--workers": workers != 1,
                         "--cpus-per-worker": cpus_per_worker != 1.0, "--gpus-per-worker": gpus_per_worker}
    if benchmark is None:
        given = [name for name, value in benchmark_options.items() if value]
        if given:
            raise InvalidRequestError(f"{', '.join(given)}: only with --benchmark NAME.")
        if data_file is None or not model:
            raise InvalidRequestError(
                "Give --model and --data FILE (the project's JSONL records), or --benchmark NAME with --annotations "
                "FILE and --images DIR (and --model, or --url of a running service).")
        from kosmos_serve.training.records import read_examples

        quiet_transformers()
        click.echo(_scores(model, read_examples(data_file), quantize, no_repeat_ngram_size or 0))
        return
    from kosmos_serve.evaluation.datasets import BENCHMARKS
    from kosmos_serve.evaluation.report import format_report
    from kosmos_serve.evaluation.runner import DEFAULT_MAX_NEW_TOKENS, ORIGINAL_NO_REPEAT_NGRAM_SIZE, evaluate_benchmark

    if benchmark not in BENCHMARKS:
        raise InvalidRequestError(f"Unknown benchmark {benchmark!r}; choose one of: {', '.join(BENCHMARKS)}.")
    if data_file is not None or not annotations or images is None:
        raise InvalidRequestError("--benchmark takes --annotations FILE (MDETR's) and --images DIR, not --data.")
    if bool(model) == bool(url):
        raise InvalidRequestError("--benchmark needs --model (run here) or --url (a running service), one of them.")
    if url and quantize != "none":
        raise InvalidRequestError("--quantize is the service's to choose with --url (kosmos-serve serve --quantize).")
    if url and ray_address is not None:
        raise InvalidRequestError("--ray runs the model on a Ray cluster, --url through a service: one of them.")
    outcome = evaluate_benchmark(
        benchmark, annotations, images, model=model, url=url, out=out, limit=limit, flickr_entities=flickr_entities,
        quantize=quantize, batch_size=batch_size, show_progress=sys.stderr.isatty(),
        on_cluster=_on_ray_cluster(ray_address, workers, cpus_per_worker, gpus_per_worker, batch_size),
        no_repeat_ngram_size=ORIGINAL_NO_REPEAT_NGRAM_SIZE if no_repeat_ngram_size is None else no_repeat_ngram_size,
        max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
    )
    click.echo(format_report(outcome))
    if outcome.interrupted:
        sys.exit(130)


def _on_ray_cluster(ray_address, workers, cpus_per_worker, gpus_per_worker, batch_size):
    """evaluate_on_ray for --ray (None without it)."""
    options = ray_job_options(ray_address, workers, cpus_per_worker, gpus_per_worker)
    if options is None:
        return None
    import functools

    from kosmos_serve.distributed.ray_data import evaluate_on_ray

    return functools.partial(evaluate_on_ray, batch_size=batch_size, options=options, show_progress=sys.stderr.isatty())


def _scores(model, examples, quantize: str = "none", no_repeat_ngram_size: int = 0) -> str:
    from kosmos_serve.engine import start_engine
    from kosmos_serve.training.evaluate import evaluate as score
    from kosmos_serve.training.evaluate import format_scores

    engine = start_engine(EngineSettings(model=str(model), max_batch_rows=32, quantize=quantize))
    return format_scores(score(engine, examples, no_repeat_ngram_size=no_repeat_ngram_size))


@main.command()
@model_options
@listen_options
def demo(model, device, dtype, host, port, quantize):
    """Run the web demo: the HTTP service in one process, with its Gradio page at /demo.

    Needs the demo extra: pip install -e ".[demo]".
    """
    from kosmos_serve.demo import DEMO_PATH, INSTALL_HINT, demo_available

    if not demo_available():
        raise click.ClickException(INSTALL_HINT)
    start_service(
        {"KOSMOS_MODEL": model, "KOSMOS_DEVICE": device, "KOSMOS_DTYPE": dtype, "KOSMOS_QUANTIZE": quantize,
         "KOSMOS_HOST": host, "PORT": port, "NUM_API_SERVERS": 1, "KOSMOS_DEMO": "true"},
        announce=lambda address: f"Kosmos-2 demo: {address}{DEMO_PATH}/ (the model loads in the background)",
    )


def start_service(flags: dict, announce: Callable[[str], str] | None = None) -> None:
    """Run the service (in `NUM_API_SERVERS` workers) configured by `flags` on top of the environment.

    Flags become environment variables because each uvicorn worker builds its app from the
    environment. A missing model fails here, in a second, before any worker starts.
    """
    import os

    import uvicorn

    from kosmos_serve.config import ServerSettings
    from kosmos_serve.engine.loading import resolve_source

    os.environ.update({name: str(value) for name, value in flags.items() if value is not None})
    settings, engine_settings = ServerSettings(), EngineSettings()
    resolve_source(engine_settings.model)
    quiet_transformers()
    if announce is not None:
        shown_host = "127.0.0.1" if settings.host in {"0.0.0.0", "::"} else settings.host
        click.echo(announce(f"http://{shown_host}:{settings.port}"))
    uvicorn.run(
        "kosmos_serve.server.app:app_from_environment", factory=True, host=settings.host, port=settings.port,
        workers=settings.num_api_servers, log_level=settings.log_level.lower(), access_log=False,
    )


@main.command()
@click.argument("records", type=click.Path(path_type=Path))
@click.option("--format", "format_name", required=True, metavar="FORMAT",
              help="coco (a COCO detection dataset) or label-studio (tasks with predictions).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The file to write.")
@click.option("--relative-to", type=click.Path(file_okay=False, path_type=Path),
              help="Folder that image names (COCO file_name, Label Studio paths) are relative to; default: the "
                   "deepest folder holding every image, or for label-studio's local files "
                   "$LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT when set.")
@click.option("--image-root", metavar="URL",
              help="label-studio: prefix of each image reference (default /data/local-files/?d=, Label Studio's "
                   "local files under LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT).")
@click.option("--from-name", help="label-studio: name of the RectangleLabels control (default label).")
@click.option("--to-name", help="label-studio: name of the Image object (default image).")
@click.option("--label-config", type=click.Path(dir_okay=False, path_type=Path),
              help="label-studio: also write a labeling config with these names and every label here.")
def export(records, format_name, out, relative_to, image_root, from_name, to_name, label_config):
    """Export annotation RECORDS (the JSONL of kosmos-serve annotate) as COCO or Label Studio tasks.

    Failed records are left out; boxes with reversed corners are put in order, boxes of zero size
    left out; the summary counts each. For supervision.Detections use the Python helper
    kosmos_serve.exports.to_detections.

    \b
    Examples:
      kosmos-serve export results.jsonl --format coco --out coco.json
      kosmos-serve export results.jsonl --format label-studio --out tasks.json --label-config config.xml
    """
    import os

    from kosmos_serve.exports import export_records

    if format_name == "label-studio" and image_root is None and relative_to is None:
        relative_to = os.environ.get("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT") or None  # what ?d= is relative to
    report = export_records(records, format_name, out, relative_to=relative_to, image_root=image_root,
                            from_name=from_name, to_name=to_name, label_config=label_config)
    click.echo(report.summary())


if __name__ == "__main__":
    main()
