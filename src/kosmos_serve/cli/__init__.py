"""The `kosmos-serve` command line: one command per job, thin over the library, a module per group of commands.

A command's module is imported only when the command runs or shows its --help: `kosmos-serve --help` answers
from the table below, and a command imports its heavy parts (torch, the service, Ray) in its own body.
"""

from __future__ import annotations

import logging
import sys

import click
from pydantic import ValidationError

from kosmos_serve.cli.lazy import LazyGroup
from kosmos_serve.errors import KosmosServeError


class FriendlyErrors(click.Group):
    """A group that shows domain errors as one line and exit code 1, never a traceback; an input at fault is named
    by the command's flag for it (`--phrase` for the domain's `phrases`)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KosmosServeError as error:
            command = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
            click.echo(f"Error: {error.naming(option_flags(command))}", err=True)
            sys.exit(1)
        except ValidationError as error:  # a KOSMOS_* variable or flag that the settings refuse
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
            click.echo(f"Error: invalid setting ({problems}).", err=True)
            sys.exit(1)


def option_flags(command: click.Command | None) -> dict[str, str]:
    """Each option of `command` by its parameter's name, the domain's name for the input it sets: its first flag."""
    options = command.params if command is not None else []
    return {option.name: option.opts[0] for option in options if isinstance(option, click.Option)}


class CommandLine(LazyGroup, FriendlyErrors):
    """kosmos-serve's group: its commands imported when used, domain errors shown as one line."""


COMMANDS = {  # name: (where the command is, the first sentence of its docstring: its line in kosmos-serve --help)
    "annotate": ("kosmos_serve.cli.annotate:annotate",
                 "Annotate every image of INPUTS into one JSONL file: one record per image, resumable."),
    "data": ("kosmos_serve.cli.training:data", "Make training and evaluation data."),
    "demo": ("kosmos_serve.cli.serve:demo",
             "Run the web demo: the HTTP service in one process, with its Gradio page at /demo."),
    "evaluate": ("kosmos_serve.cli.evaluate:evaluate",
                 ("Score a model's grounding (--data, or the paper's benchmarks) or a Kosmos-2.5's reading "
                  "(--benchmark ocr).")),
    "export": ("kosmos_serve.cli.annotate:export",
               "Export annotation RECORDS (the JSONL of kosmos-serve annotate) as COCO or Label Studio tasks."),
    "predict": ("kosmos_serve.cli.predict:predict",
                "Describe and ground IMAGES; prints the text, then each entity with its pixel boxes and their scores."),
    "serve": ("kosmos_serve.cli.serve:serve",
              "Run the HTTP service: POST /predict (drop-in), /v1 JSON API, /docs, /health, /ready, /metrics."),
    "tiny-model": ("kosmos_serve.cli.training:tiny_model",
                   "Write a tiny random Kosmos-2 or Kosmos-2.5 (for tests and trying the tools offline) to folder OUT."),
    "tiny-segmenter": ("kosmos_serve.cli.training:tiny_segmenter",
                       ("Write a tiny random Segment Anything model (for tests and trying --segmenter offline) to "
                       "folder OUT.")),
    "train": ("kosmos_serve.cli.training:train",
              "Fine-tune MODEL on DATA (or train a fresh model), writing checkpoints and OUT/final."),
    "train-demo": ("kosmos_serve.cli.training:train_demo",
                   ("Rebuild the shipped demo model in OUT: data, training from scratch, held-out scores (~52 min, "
                    "2 cores).")),
    "train-demo-2.5": ("kosmos_serve.cli.training:train_demo_reader",
                       ("Train the reading demo attempt (a small Kosmos-2.5, not shipped: it finds lines, reads few "
                        "words) in OUT: from scratch on synthetic pages, held-out scores (~46 min, 2 cores).")),
    "train-demo-segmenter": ("kosmos_serve.cli.training:train_demo_segmenter",
                             ("Rebuild the shipped demo segmenter in OUT: a small SAM trained on the shapes' masks, "
                              "held-out IoU (~15 CPU-min).")),
}


@click.group(cls=CommandLine, lazy_commands=COMMANDS)
@click.version_option(package_name="kosmos-serve")
def main():
    """kosmos-serve: run Microsoft's Kosmos-2 grounded multimodal model."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

