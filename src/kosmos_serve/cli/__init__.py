"""The `kosmos-serve` command line: one command per job, thin over the library, a module per group of commands."""

from __future__ import annotations

import logging
import sys

import click
from pydantic import ValidationError

from kosmos_serve.cli import annotate, evaluate, predict, serve, training
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


@click.group(cls=FriendlyErrors)
@click.version_option(package_name="kosmos-serve")
def main():
    """kosmos-serve: run Microsoft's Kosmos-2 grounded multimodal model."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


for command in (serve.serve, serve.demo, predict.predict, annotate.annotate, annotate.export, evaluate.evaluate,
                training.train, training.train_demo, training.tiny_model, training.data):
    main.add_command(command)
