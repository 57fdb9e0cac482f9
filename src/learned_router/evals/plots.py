"""Frontier plot of an `evaluate` report (matplotlib's Agg canvas, no pyplot state)."""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_frontier(report: dict, path: str | os.PathLike, *, benchmark: str, strong_model: str, weak_model: str) -> Path:
    """Routed quality vs strong calls (%) for every scorer's exact curve, reference curves dotted, the all-weak
    and all-strong qualities as dashed lines, APGR in the legend. Writes the image to `path` (PNG by suffix)."""
    fig = Figure(figsize=(8, 6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, curves in report["curves"].items():
        m = report["scorers"][name]
        fine = curves["fine"]
        apgr = "n/a" if m["apgr"] is None else f"{m['apgr']:.3f}"
        ax.plot(
            [100 * x for x in fine["strong_fraction"]],
            fine["quality"],
            label=f"{name} (APGR {apgr})",
            linestyle=":" if m["reference"] else "-",
            linewidth=1.5,
        )
    ax.axhline(report["weak_mean"], color="grey", linestyle="--", label=f"{weak_model} (all weak)")
    ax.axhline(report["strong_mean"], color="red", linestyle="--", label=f"{strong_model} (all strong)")
    ax.set_xlabel("Strong model calls (%)")
    ax.set_ylabel("Routed quality (mean score)")
    ax.set_xlim(0, 100)
    ax.set_title(
        f"{benchmark} ({report['n_prompts']} prompts)\nstrong: {strong_model}, weak: {weak_model}", fontsize="medium"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
