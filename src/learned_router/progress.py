"""Named progress for long steps ("embedding 13,115 prompts", "fitting the quality model"), on stderr.

On a terminal, rich draws each step as a line with its bar (or a spinner) and elapsed time; steps nest. Elsewhere
(a log file) each step is one plain line when it starts. Nothing in CI (`CI` set, as CI services do) or inside
`quiet()` (the CLI's --quiet)."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

_quiet: ContextVar[bool] = ContextVar("quiet", default=False)
_live: ContextVar[Progress | None] = ContextVar("live", default=None)


def mode() -> str | None:
    """ "live" on a terminal, "lines" elsewhere, None in CI or when quiet."""
    if _quiet.get() or os.environ.get("CI", "").lower() not in ("", "0", "false"):
        return None
    return "live" if sys.stderr.isatty() else "lines"


@contextmanager
def quiet(on: bool = True) -> Iterator[None]:
    """No progress inside this block when `on`."""
    token = _quiet.set(on)
    try:
        yield
    finally:
        _quiet.reset(token)


@contextmanager
def no_library_bars() -> Iterator[None]:
    """transformers' own bars ("Loading weights: 103/103") off inside the block, as they were after: the step names
    the work."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


class _Count(ProgressColumn):
    """done/total for a step that has a total; nothing for one that has not."""

    def render(self, task) -> Text:
        return Text(
            f"{int(task.completed):,}/{int(task.total):,}" if task.fields["counted"] else "", style="progress.download"
        )


class Step:
    """A running step: `advance(n)` its count, `describe(text)` its label."""

    def __init__(self, progress: Progress | None = None, task=None, lines: bool = False):
        self._progress, self._task, self._lines = progress, task, lines

    def advance(self, n: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def describe(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text)
        elif self._lines:
            print(text, file=sys.stderr, flush=True)


@contextmanager
def step(label: str, total: float | None = None) -> Iterator[Step]:
    """One named step: a bar when `total` is known, else a spinner; it stays listed with its time when done."""
    how = mode()
    if how != "live":
        if how == "lines":
            print(label, file=sys.stderr, flush=True)
        yield Step(lines=how == "lines")
        return
    outer = _live.get()
    progress = outer or Progress(
        SpinnerColumn(finished_text="[green]✓"),
        TextColumn("{task.description}"),
        BarColumn(),
        _Count(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    token = _live.set(progress)
    if outer is None:
        progress.start()
    task = progress.add_task(label, total=total, counted=total is not None)
    try:
        yield Step(progress, task)
        progress.update(task, total=total or 1, completed=total or 1)
    finally:
        progress.stop_task(task)
        _live.reset(token)
        if outer is None:
            progress.stop()
