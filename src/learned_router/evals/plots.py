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


def plot_quality(estimate: dict, path: str | os.PathLike, title: str) -> Path:
    """Retained quality against cost (both relative to the strongest tier) on shadow-graded traffic: the router
    re-deciding every prompt at each threshold, random routing, the oracle, the point in use with its intervals and
    the quality target."""
    fig = Figure(figsize=(8, 6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    curves = estimate["frontier"]
    for name, style in (("router", "-"), ("random", ":"), ("oracle", ":")):
        pts = curves[name]
        ax.plot([100 * p["cost_ratio"] for p in pts], [100 * p["retained_quality"] for p in pts], style, label=name)
    now = estimate["in_use"]
    (lo_c, hi_c), (lo_q, hi_q) = now["cost_ratio_ci"], now["retained_quality_ci"]
    ax.errorbar(
        100 * now["cost_ratio"],
        100 * now["retained_quality"],
        xerr=[[100 * (now["cost_ratio"] - lo_c)], [100 * (hi_c - now["cost_ratio"])]],
        yerr=[[100 * (now["retained_quality"] - lo_q)], [100 * (hi_q - now["retained_quality"])]],
        fmt="o",
        color="black",
        capsize=3,
        label="in use (95% interval)",
    )
    ax.axhline(100 * estimate["target"], color="red", linestyle="--", linewidth=0.8, label="target")
    ax.set_xlabel("Cost (% of sending every request to the strongest tier)")
    ax.set_ylabel("Quality retained (% of the strongest tier's)")
    ax.set_title(f"{title} ({estimate['prompts']} graded requests)", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
