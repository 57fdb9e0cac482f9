"""The `learned-router` command group: its version option and how the package's warnings reach stderr."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from .. import __version__


app = typer.Typer(
    help="A learned LLM router: train it, export it to ONNX, score prompts, evaluate and serve it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # click's plain help: a flag gets no value label
)


class StderrLines(logging.Handler):
    """The package's warnings as 'warning: ...' lines on whatever stderr is when they are logged."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(f"{record.levelname.lower()}: {record.getMessage()}", err=True)


STDERR_LINES = StderrLines(logging.WARNING)


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"learned-router {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=show_version, help="Print the version and exit.")
    ] = False,
):
    package = logging.getLogger("learned_router")
    if STDERR_LINES not in package.handlers:
        package.addHandler(STDERR_LINES)
