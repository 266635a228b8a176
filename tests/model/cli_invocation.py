"""Running the kosmos-serve CLI in-process, as the model tests do."""

from click.testing import CliRunner

from kosmos_serve.cli import main


def invoke(*args):
    """`kosmos-serve ARGS...` in this process (each argument as text), exceptions raised rather than caught."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
