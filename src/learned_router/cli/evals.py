"""Commands that evaluate routers: eval (one benchmark, a tier policy or a learning curve) and report (a suite)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import RouterError
from ..progress import quiet as quieted
from ..progress import step

from .common import Quiet, names_of, user_errors
from .main import app


def parse_sizes(text: str) -> list[int | None]:
    """'100,300,all' -> [100, 300, None]."""
    out = []
    for item in names_of(text):
        if item == "all":
            out.append(None)
        elif item.isdigit() and int(item) >= 20:
            out.append(int(item))
        else:
            raise RouterError(f"--learning-curve: expected sizes of at least 20 or 'all', got {item!r}")
    if not out:
        raise RouterError("--learning-curve: name at least one size")
    return out


@app.command("eval")
@user_errors
def eval_cmd(
    data: Annotated[Path, typer.Option(help="A graded benchmark (long or battles).")],
    out: Annotated[Path, typer.Option(help="Folder for metrics.json, frontier.png and table.md.")],
    router: Annotated[Path, typer.Option(help="Router folder (with its checkpoint/).")] = Path("models/default"),
    strong: Annotated[str, typer.Option(help="The strong model, as the benchmark names it.")] = "gpt-4-1106-preview",
    weak: Annotated[
        str, typer.Option(help="The weak model ('*' on battles: whichever model the strong one met).")
    ] = "mistralai/Mixtral-8x7B-Instruct-v0.1",
    prices: Annotated[Optional[Path], typer.Option(help="YAML of $ per 1M input/output tokens per model.")] = Path(
        "evals/prices.yaml"
    ),
    folds: Annotated[int, typer.Option(help="Folds when the benchmark overlaps the router's training data.")] = 5,
    by: Annotated[
        str,
        typer.Option(
            help="source: leave the benchmark's source out of training; prompt or category: "
            "k-fold cross-validation by that (MMLU subject: out of domain)."
        ),
    ] = "prompt",
    data_dir: Annotated[
        Optional[Path], typer.Option(help="Where the router's training files are, if not where it was trained.")
    ] = None,
    tiers: Annotated[
        Optional[str],
        typer.Option(
            help="Comma-separated models, cheapest first: evaluate the tier policy "
            "in dollars (each single model, the best two-model router, the oracle) "
            "instead of a pair."
        ),
    ] = None,
    name: Annotated[Optional[str], typer.Option(help="Benchmark name in the outputs (default: the file name).")] = None,
    against: Annotated[
        Optional[Path],
        typer.Option(
            help="Another router folder (e.g. the one in service) to compare on the same prompts, as it is (no refit)."
        ),
    ] = None,
    learning_curve: Annotated[
        Optional[str],
        typer.Option(
            help="Comma-separated training sizes (and 'all'): the "
            "learning curve of a top level over --router as the prior, "
            "next to the prior, kNN, ridge and prompt length."
        ),
    ] = None,
    draws: Annotated[int, typer.Option(help="Random draws of training prompts per learning-curve size.")] = 5,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "learned-router-evals",
    quiet: Quiet = False,
):
    """Evaluate a router on a benchmark: the cost-quality frontier, APGR/CPT/cost, baselines; logged to MLflow."""
    from ..evals import logged
    from ..tracking import run_link

    with quieted(quiet):
        if learning_curve is not None:
            sizes = parse_sizes(learning_curve)
            if draws < 1:
                raise RouterError(f"--draws must be at least 1, got {draws}")
            text, run = logged.learning_curve(router, data, out, strong, weak, name, sizes, draws, experiment)
        elif tiers is not None:
            text, run = logged.tier_eval(router, data, out, names_of(tiers), prices, name, folds, experiment)
        else:
            text, run = logged.pair_eval(
                router, data, out, strong, weak, prices, name, folds, by, data_dir, against, experiment
            )
    typer.echo(text)
    typer.echo(f"written to {out}; MLflow: {run_link(run)}")


@app.command()
@user_errors
def report(
    config: Annotated[Path, typer.Option(help="Benchmark suite YAML.")] = Path("evals/benchmarks.yaml"),
    out: Annotated[Path, typer.Option(help="Folder for RESULTS.md and results/<benchmark>/.")] = Path("evals"),
    only: Annotated[
        Optional[str],
        typer.Option(
            help="Run one benchmark of the suite by name (the others' figures from "
            "their last run), or 'learning-curves' for that section alone."
        ),
    ] = None,
    quiet: Quiet = False,
):
    """Run every benchmark of a suite and regenerate RESULTS.md (leave-one-source-out and in-domain tables, frontier
    plots, RouteLLM's numbers, learning curves of two-level routers)."""
    from ..evals.results import load_suite, write_results

    suite = load_suite(config)
    with quieted(quiet), step(f"report: {only or f'{len(suite.benchmarks)} benchmarks'}") as bar:
        path = write_results(suite, out, progress=bar.describe, only=only)
    typer.echo(f"written {path}")
