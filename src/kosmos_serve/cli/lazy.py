"""A click group whose commands are imported only when one runs or shows its own --help (click's LazyGroup)."""

from __future__ import annotations

import importlib

import click


class LazyGroup(click.Group):
    """A group of commands named by import path, each with the one-line help that the group's --help shows.

    `lazy_commands` maps a command's name to ("module:attribute", its docstring's first sentence), so the
    group's --help lists every command without importing any (tests/unit/test_cli_startup.py holds each
    sentence to its command's docstring).
    """

    def __init__(self, *args, lazy_commands: dict[str, tuple[str, str]], **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Every command's name, in order."""
        return sorted(self.lazy_commands)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        """The command `name`, its module imported now; None for a name that is no command."""
        if name not in self.lazy_commands:
            return None
        module, _, attribute = self.lazy_commands[name][0].partition(":")
        return getattr(importlib.import_module(module), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The Commands section as click writes it: each sentence cut to the width as click cuts a command's help."""
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names))
        rows = [(name, click.Command(name, help=self.lazy_commands[name][1]).get_short_help_str(limit)) for name in names]
        with formatter.section("Commands"):
            formatter.write_dl(rows)
