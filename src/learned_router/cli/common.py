"""What every command shares: one-line errors and exit 2, the --quiet and --threads options, option parsers, the serve
extra's imports."""

from __future__ import annotations

import functools
import re
from importlib import metadata
from typing import Annotated, Optional

import typer

from ..errors import RouterError, shown


Quiet = Annotated[
    bool,
    typer.Option(
        "--quiet", "-q", help="No progress (there is none in CI either; plain lines when stderr is not a terminal)."
    ),
]
Threads = Annotated[
    Optional[int], typer.Option(help="onnxruntime threads (default: OMP_NUM_THREADS if set, else all cores).")
]


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(code)


def user_errors(fn):
    """Print RouterError, a missing optional dependency and what the OS refused (a name too long, no permission) as
    one line and exit 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RouterError as e:
            fail(str(e))
        except ModuleNotFoundError as e:
            fail(missing_module(e.name))
        except OSError as e:
            fail(os_error(e))

    return wrapper


def os_error(e: OSError) -> str:
    """'FILE: the OS's reason', the file name cut as `shown` cuts it."""
    if e.filename is None or not e.strerror:
        return str(e)
    return f"{shown(e.filename)}: {e.strerror}"


def missing_module(name: str | None) -> str:
    """One line for a module that is not installed, with the extra of this package that installs it, if one does."""
    name = name or "a module"
    top = name.partition(".")[0]
    for req in metadata.requires("learned-router") or []:
        dist, extra = re.match(r"[A-Za-z0-9._-]+", req)[0], re.search(r"extra == .(\w+)", req)
        if extra and dist.lower().replace("-", "_") == {"sklearn": "scikit_learn"}.get(top, top):
            first = " (torch==2.13.0 first: an unpinned torch pulls CUDA)" if extra[1] == "train" else ""
            return f"{name} is not installed: this command needs pip install 'learned-router[{extra[1]}]'{first}"
    return f"{name} is not installed"


def pair_option(item: str, option: str, shape: str) -> tuple[str, str]:
    """NAME=VALUE of a repeatable option; RouterError naming the option otherwise."""
    name, sep, value = item.partition("=")
    if not (sep and name.strip() and value.strip()):
        raise RouterError(f"{option} expects {shape}, got {item!r}")
    return name.strip(), value.strip()


def names_of(text: str) -> list[str]:
    """A comma-separated option as a list, blanks dropped."""
    return [s.strip() for s in text.split(",") if s.strip()]


def serve_imports(modules: tuple[str, ...] = ("fastapi", "httpx", "prometheus_client", "redis", "uvicorn")):
    """Import the serve extra's `modules` (all of them: what `serve` needs; redis for state.backend: redis), or fail
    with the install hint; returns uvicorn when it is among them."""
    import importlib

    try:
        loaded = {m: importlib.import_module(m) for m in modules}
    except ModuleNotFoundError as e:
        fail(missing_module(e.name))
    return loaded.get("uvicorn")
