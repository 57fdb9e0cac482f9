"""The command line run in this process through typer's runner: the same parsing, commands, one-line errors and exit
codes as the console script, without a new interpreter importing torch and MLflow for every call. A few tests keep
a real subprocess where the process itself is the subject (signals, the console script, what an import pulls)."""

from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass

from typer.testing import CliRunner

from learned_router.cli import app


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str
    exception: BaseException | None


def cli(*args, env: dict | None = None, stdin: str | bytes | None = None, cwd=None, ok: bool = False) -> Ran:
    """`learned-router ARGS`; `env` and `cwd` hold for the call only; `ok`: assert exit 0 and show the error when
    not."""
    with contextlib.chdir(cwd) if cwd is not None else contextlib.nullcontext():
        r = CliRunner().invoke(
            app, [str(a) for a in args], input=stdin, env={k: str(v) for k, v in (env or {}).items()}
        )
    ran = Ran(r.exit_code, r.stdout, r.stderr, r.exception)
    if ok:
        assert ran.returncode == 0, f"{args[0]}: {ran.stderr[-2000:]}{crash(ran)}"
    return ran


def crash(ran: Ran) -> str:
    """The traceback of an exception that escaped the command (a bug: the console script would print it)."""
    e = ran.exception
    if e is None or isinstance(e, SystemExit):
        return ""
    return "".join(traceback.format_exception(e))
