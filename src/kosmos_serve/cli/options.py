"""Options shared by several commands, and what they become: settings, task inputs, decoding parameters, Ray jobs.

An option that sets a setting is named after the setting's field and has no default of its own: a command
hands such flags on (`**flags`) to `settings_from_flags`, which builds the one settings object of the process,
the flags given over the environment over the defaults, all three read from `kosmos_serve.config`.
"""

from __future__ import annotations

from typing import Literal, TypeVar, get_args, get_origin

import click
from pydantic_settings import BaseSettings

from kosmos_serve.config import Settings
from kosmos_serve.errors import InvalidRequestError
from kosmos_serve.generation import GenerationParams
from kosmos_serve.tasks import TASK_DESCRIPTIONS, TASK_INPUTS, Task, TaskInput, parse_box, parse_task

# Ray is imported only under --ray, once require_ray() has named the extra to install when it is missing.

SettingsModel = TypeVar("SettingsModel", bound=BaseSettings)

TASK_OPTION_FLAGS = {"prompt": "--prompt", "phrases": "--phrase", "boxes": "--box", "grounding": "--no-grounding"}


def _task_help(task: Task, text: str) -> str:
    flags = ", ".join(TASK_OPTION_FLAGS[name] for name in TASK_INPUTS[task])
    return f"{task.value}: {text} ({flags})." if flags else f"{task.value}: {text}."


TASK_HELP = "\n".join(_task_help(task, text) for task, text in TASK_DESCRIPTIONS.items())


def own_alias(setting: str) -> str | None:
    """The one name a setting has of its own in the environment and as an argument (PORT for port), if any."""
    alias = Settings.model_fields[setting].validation_alias
    return alias if isinstance(alias, str) else None


def variable_name(setting: str) -> str:
    """The environment variable a setting is read from: its own alias, else KOSMOS_ and its name.

    >>> variable_name("port"), variable_name("model")
    ('PORT', 'KOSMOS_MODEL')
    """
    return own_alias(setting) or f"{Settings.model_config['env_prefix']}{setting}".upper()


def setting_option(flag: str, setting: str, text: str, show_default: bool = False, **kwargs):
    """A flag for `setting`: its help, then the model's default (when `show_default`) and the variable it overrides.

    A setting of a few literal values takes just those (click checks them before the settings do).
    """
    field = Settings.model_fields[setting]
    if get_origin(field.annotation) is Literal:
        kwargs["type"] = click.Choice(get_args(field.annotation))
    default = f" (default {field.default})" if show_default else ""
    return click.option(flag, setting, help=f"{text}{default}.  [env: {variable_name(setting)}]", **kwargs)


def settings_from_flags(model: type[SettingsModel], flags: dict) -> SettingsModel:
    """`model` built once from the flags given (None: not given) over the environment.

    Each flag goes in under its variable's alias, so an invalid value is named alike from a flag or the environment.
    """
    return model(**{own_alias(name) or name: value for name, value in flags.items() if value is not None})


def apply_options(command, options: list):
    """`command` with `options`, which --help then lists in this order."""
    for option in reversed(options):
        command = option(command)
    return command


def model_options(command):
    """--model, --device, --dtype, --quantize and --segmenter: the engine settings a command may override."""
    return apply_options(command, [
        setting_option("--model", "model", "Hub id or local folder"),
        setting_option("--device", "device", "auto, cpu, cuda, mps"),
        setting_option("--dtype", "dtype", "Weight dtype"),
        setting_option("--quantize", "quantize", "auto: per part, the weight format fastest on this CPU (the choice "
                                                 "for speed); int8: int8 linear layers on the CPU; int4: 4-bit text "
                                                 "weights (CPU)"),
        segmenter_option,
    ])


segmenter_option = setting_option(
    "--segmenter", "segmenter", "Segment Anything model (hub id, folder, or demo) that masks each box when masks are "
                                "asked for (pip install 'kosmos-serve[masks]'; default: none)")


def listen_options(command):
    """--host and --port of the service."""
    return apply_options(command, [
        setting_option("--host", "host", "Address to listen on", show_default=True),
        setting_option("--port", "port", "TCP port", show_default=True, type=int),
    ])


def ray_options(command):
    """--ray [ADDRESS], --workers, --cpus-per-worker, --gpus-per-worker: the job on a Ray cluster (Ray Data)."""
    return apply_options(command, [
        click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
                     help="Run on a Ray cluster (pip install 'kosmos-serve[ray]'): ADDRESS (HOST:PORT, "
                          "ray://HOST:10001 or auto) joins it; without one, RAY_ADDRESS, else a new local cluster. "
                          "Image paths must be the same on every node."),
        click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
                     help="--ray: workers, each an actor holding its own engine."),
        click.option("--cpus-per-worker", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
                     help="--ray: CPUs each worker claims (its torch threads)."),
        click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=0.0, show_default=True,
                     help="--ray: GPUs each worker claims (the engine then runs on a GPU)."),
    ])


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


def task_options(command):
    """--task and its inputs: --prompt, --phrase, --box, --no-grounding."""
    return apply_options(command, [
        click.option("--task", help=f"Default: caption (ocr on a Kosmos-2.5), or raw when only --prompt is given (the "
                                    f"prompt as given, as POST /predict uses it).\n\n{TASK_HELP}"),
        click.option("--prompt", help="Question (grounded_vqa, region_vqa, question) or whole prompt (raw)."),
        click.option("--phrase", "phrases", multiple=True, help="A phrase to ground or find; repeat for several."),
        click.option("--box", "boxes", multiple=True, callback=lambda _c, _p, v: tuple(parse_box(b) for b in v),
                     help="x1,y1,x2,y2 in image pixels; repeat for several."),
        click.option("--no-grounding", is_flag=True, help="raw task: do not prepend <grounding>."),
    ])


def decoding_options(command):
    """--max-new-tokens, --sample, --top-p, --temperature, --seed, --no-repeat-ngram-size, --min-score, --nms-iou,
    --masks."""
    return apply_options(command, [
        click.option("--max-new-tokens", type=int, help="New tokens to generate (default: the model's, else 128)."),
        click.option("--sample", is_flag=True, help="Sample (top-p, temperature) instead of greedy decoding."),
        click.option("--top-p", type=float, default=GenerationParams.top_p, show_default=True),
        click.option("--temperature", type=float, default=GenerationParams.temperature, show_default=True),
        click.option("--seed", type=int, help="Seed for sampling."),
        click.option("--no-repeat-ngram-size", type=int,
                     help="Forbid repeating n-grams of this size (0: off; default: the model's, else the original "
                          "demo's 3)."),
        click.option("--min-score", type=float,
                     help="Drop boxes scored under this, 0 to 1 (default: the model's for detection and annotate, "
                          "else keep every box).  [env: KOSMOS_MIN_SCORE]"),
        click.option("--nms-iou", type=float,
                     help="Of two boxes of different phrases overlapping by more than this IoU, drop the lower-scored "
                          "(0 to 1; 1: off; default: the model's for detection, else off).  [env: KOSMOS_NMS_IOU]"),
        click.option("--masks", is_flag=True,
                     help="A mask for every box (COCO RLE) and its score, from the --segmenter model."),
    ])


def task_input_from_options(task, prompt, phrases, boxes, no_grounding) -> TaskInput:
    """The TaskInput the options ask for; an option the task does not use is an error naming what it takes."""
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


def generation_params_from_options(max_new_tokens, sample, top_p, temperature, seed, no_repeat_ngram_size,
                                   min_score, nms_iou=None, masks=False) -> GenerationParams:
    """The GenerationParams the decoding options ask for."""
    return GenerationParams(max_new_tokens=max_new_tokens, do_sample=sample, top_p=top_p, temperature=temperature,
                            seed=seed, no_repeat_ngram_size=no_repeat_ngram_size, min_score=min_score,
                            nms_iou=nms_iou, masks=masks)
