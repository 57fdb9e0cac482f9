"""`learned-router`: train | export | score | bench (and the service commands)."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import RouterError

app = typer.Typer(
    help="A learned LLM router: train it, export it to ONNX, score prompts, evaluate and serve it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(code)


def user_errors(fn):
    """Print RouterError (and a missing optional dependency) as one line and exit 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RouterError as e:
            fail(str(e))
        except ModuleNotFoundError as e:
            fail(f"{e.name} is not installed: this command needs pip install 'learned-router[train]' (torch==2.13.0 first)")

    return wrapper


# ---- commands (core) --------------------------------------------------------------------------

# ---- commands (evals) -------------------------------------------------------------------------

# ---- commands (service) -----------------------------------------------------------------------
