"""Each kind of `eval` as one MLflow run: the evaluator is built from the file first (a bad file starts no run), then
the evaluation runs and its figures, plot and tables are logged. Each returns its table as text and the run."""

from __future__ import annotations

from pathlib import Path

from ..errors import shown
from ..progress import step
from ..tracking import log_eval, log_learning_curve, log_tier_eval, start_run


def pair_eval(
    router: Path,
    data: Path,
    out: Path,
    strong: str,
    weak: str,
    prices: Path | None,
    name: str | None,
    folds: int,
    by: str,
    data_dir: Path | None,
    against: Path | None,
    experiment: str,
):
    """The router's frontier for one pair against the baselines (and `against`, another router as it is)."""
    from .protocol import BenchmarkEvaluator, run_eval

    evaluator = BenchmarkEvaluator.from_file(data, strong, weak, prices, name)
    params = {"router": str(router), "data": str(data), "strong": strong, "weak": weak, "folds": folds, "by": by}
    with start_run(experiment, name or data.stem) as run:
        with step(f"evaluating {shown(router, 40)} on {shown(data.name, 40)} (by {by})"):
            result = run_eval(router, evaluator, out, folds=folds, by=by, data_dir=data_dir, against=against)
        log_eval(params, result.report, out)
    return (out / "table.md").read_text(), run


def tier_eval(
    router: Path,
    data: Path,
    out: Path,
    tiers: list[str],
    prices: Path | None,
    name: str | None,
    folds: int,
    experiment: str,
):
    """The tier policy in dollars: each single model, the best two-model router, the oracle."""
    from .tiers import TierEvaluator, run_tier_eval

    evaluator = TierEvaluator.from_file(data, tiers, prices, name)
    params = {"router": str(router), "data": str(data), "tiers": ",".join(evaluator.tiers), "folds": folds}
    with (
        start_run(experiment, name or f"{data.stem} tiers") as run,
        step(f"evaluating {router} on {data.name} as {len(evaluator.tiers)} tiers ({folds}-fold refits)"),
    ):
        log_tier_eval(params, run_tier_eval(router, evaluator, out, folds), out)
    return (out / "table.md").read_text(), run


def learning_curve(
    prior: Path,
    data: Path,
    out: Path,
    strong: str,
    weak: str,
    name: str | None,
    sizes: list[int | None],
    draws: int,
    experiment: str,
):
    """A top level over `prior` fitted on growing draws of the data, beside the prior, kNN, ridge and prompt length."""
    from .learning import run_learning_curve
    from .protocol import BenchmarkEvaluator

    evaluator = BenchmarkEvaluator.from_file(data, strong, weak, name=name)
    params = {"prior": str(prior), "data": str(data), "strong": strong, "weak": weak, "draws": draws}
    with (
        start_run(experiment, name or f"{data.stem} learning curve") as run,
        step(f"learning curve of a top level over {prior} on {data.name}"),
    ):
        rows, text = run_learning_curve(prior, evaluator, sizes, draws, out)
        log_learning_curve(params | {"sizes": ",".join("all" if s is None else str(s) for s in sizes)}, rows, out)
    return text, run
