"""Multi-tier evaluation: quality against dollars for the tier policy, each single model, the two-model router and
the oracle, on prompts the router never saw.

Protocol: k-fold cross-validation by prompt on a graded table (long shape: every tier's model graded on the same
prompts; a preference against a fixed baseline counts the baseline as 0.5). Per fold, the router's recipe is refit
on its training data without the fold's prompts, and the fold is routed with the tier policy (`scorer.choose_tier`)
on each tier's pass chance as the service reads it: the tier model's `Router.score` column (its pass chance against
the router's strong model; `generic` for a model the router does not know), the top tier unscored (1.0). A call costs its prompt (one message) as input tokens and its answer
as output tokens at the tier's prices, tokens estimated from characters as the service does (prices.py): the answer
lengths are the graded answers' own, where the data has them, else the price file's `output_tokens`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..data import canonical, group_of, load_source, observations
from ..errors import DataError, RouterError
from ..outputs import GENERIC
from ..prices import cost_usd, message_tokens, text_tokens
from ..progress import step
from .protocol import Prices, folds_of

PER = 1000  # costs are reported in dollars per this many requests


@dataclass
class Frontier:
    cost: np.ndarray  # $ per PER requests, ascending
    quality: np.ndarray  # mean grade of the routed answers

    @classmethod
    def of(cls, points: list[tuple[float, float]]) -> "Frontier":
        pts = np.array(sorted(set(points)))
        return cls(pts[:, 0], pts[:, 1])

    def envelope(self) -> tuple[np.ndarray, np.ndarray]:
        """The best quality reachable at each cost or less."""
        return self.cost, np.maximum.accumulate(self.quality)

    def cost_at(self, quality: float) -> float | None:
        """The least cost whose quality reaches `quality`, interpolated between envelope points; None: never reached."""
        c, q = self.envelope()
        hit = np.flatnonzero(q >= quality - 1e-12)
        if not len(hit):
            return None
        i = hit[0]
        if i == 0 or q[i] == q[i - 1]:
            return float(c[i])
        return float(c[i - 1] + (quality - q[i - 1]) * (c[i] - c[i - 1]) / (q[i] - q[i - 1]))

    def quality_at(self, cost: float) -> float | None:
        c, q = self.envelope()
        return float(np.interp(cost, c, q)) if cost >= c[0] else None


def route_points(choice_of, thresholds, scores: np.ndarray, costs: np.ndarray) -> list[tuple[float, float]]:
    rows = np.arange(len(scores))
    out = []
    for t in thresholds:
        ch = choice_of(t)
        out.append((float(costs[rows, ch].mean() * PER), float(scores[rows, ch].mean())))
    return out


def threshold_grid(p: np.ndarray) -> np.ndarray:
    return np.unique(np.concatenate([np.linspace(0, 1, 201), np.quantile(p, np.linspace(0, 1, 201)), [1.0 + 1e-6]]))


def oracle_points(scores: np.ndarray, costs: np.ndarray) -> list[tuple[float, float]]:
    """The best any router could do: per prompt, argmax(grade - lambda * cost), swept over lambda (cheapest wins ties)."""
    rows = np.arange(len(scores))
    span = scores.max() - scores.min() + 1e-9
    lams = np.concatenate([[0.0], np.geomspace(1e-6, 1e6, 400) * span / max(costs.mean(), 1e-12)])
    return [
        (float(costs[rows, ch].mean() * PER), float(scores[rows, ch].mean()))
        for ch in ((scores - lam * costs - 1e-12 * costs).argmax(axis=1) for lam in lams)
    ]


def grade_table(path: Path, tiers: list[str]) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Prompts graded for every tier (contaminated ones dropped): the prompts, grades (prompts x tiers) and answer
    lengths in characters (NaN where unknown)."""
    src = load_source(path)
    obs = observations(src)
    obs = obs[~obs["contaminated"]]
    if src.scheme == "versus" and obs["opponent"].nunique() != 1:
        raise DataError(f"{path}: tiers need grades on one scale: absolute grades, or preferences against one baseline")
    grades = obs.groupby(["prompt", "model"])["grade"].mean().unstack()
    baseline = obs["opponent"].iloc[0] if src.scheme == "versus" else None
    if baseline:
        grades[baseline] = 0.5
    missing = [t for t in tiers if t not in grades.columns]
    if missing:
        raise DataError(f"{path}: tier model(s) {', '.join(missing)} not graded there")
    grades = grades[tiers].dropna()
    if grades.empty:
        raise DataError(f"{path}: no prompt graded for every tier")
    chars = pd.DataFrame(np.nan, index=grades.index, columns=tiers)
    if "output_chars" in src.table.columns:
        lengths = (
            src.table.assign(model=src.table["model"].astype(str).map(canonical))
            .groupby(["prompt", "model"])["output_chars"]
            .mean()
            .unstack()
        )
        chars.update(lengths.reindex(index=grades.index, columns=tiers))
    prompts = pd.DataFrame({"prompt": grades.index, "group": grades.index.map(group_of)})
    return prompts, grades.to_numpy(float), chars.to_numpy(float)


@dataclass(frozen=True)
class TierEvaluator:
    """The dollar frontier of a tier policy on a graded table: routed by each tier's score column (prompts x tiers,
    the top tier's 1.0), against each single model, the best two-model router and the oracle. `run_tier_eval` is
    handed one and gives it the columns from models that never saw the prompts."""

    prompts: pd.DataFrame  # prompt, group
    tiers: list[str]
    grades: np.ndarray  # (prompts, tiers)
    costs: np.ndarray  # (prompts, tiers): $ of each tier's call
    prices: dict[str, list[float]]
    name: str
    data: str

    @classmethod
    def from_file(cls, data: Path, tiers: list[str], prices: Path | None, name: str | None = None) -> "TierEvaluator":
        tiers = [canonical(t) for t in tiers]
        if len(tiers) < 2 or len(set(tiers)) != len(tiers):
            raise RouterError(f"--tiers needs at least 2 distinct models, cheapest first; got {tiers}")
        priced = Prices.load(prices)
        if priced is None:
            raise RouterError("--prices is required: the multi-tier frontier is in dollars")
        unpriced = [t for t in tiers if t not in priced.per_model]
        if unpriced:
            raise DataError(f"{prices}: no price for tier(s) {', '.join(unpriced)}")
        prompts, grades, chars = grade_table(data, tiers)
        p_in, p_out = np.array([priced.per_model[t] for t in tiers]).T
        answer_tokens = np.where(np.isnan(chars), priced.output_tokens, text_tokens(np.nan_to_num(chars)))
        costs = cost_usd(message_tokens(prompts["prompt"].str.len().to_numpy())[:, None], answer_tokens, p_in, p_out)
        order = np.argsort(costs.mean(axis=0), kind="stable")
        if list(order) != list(range(len(tiers))):
            raise RouterError(
                "--tiers must be listed cheapest first; by mean cost per request on this data they are: "
                + ", ".join(tiers[i] for i in order)
            )
        return cls(
            prompts,
            tiers,
            grades,
            costs,
            {t: list(priced.per_model[t]) for t in tiers},
            name or Path(data).stem,
            str(data),
        )

    def __call__(self, p: np.ndarray) -> tuple[dict, dict[str, Frontier]]:
        """The report's figures and each policy's frontier, from the tiers' score columns."""
        from ..scorer import choose_tier

        scores, costs, tiers = self.grades, self.costs, self.tiers
        mean_cost, mean_q = costs.mean(axis=0), scores.mean(axis=0)
        best = int(np.argmax(mean_q))
        curves = {
            "router": Frontier.of(route_points(lambda t: choose_tier(p, t), threshold_grid(p), scores, costs)),
            "oracle": Frontier.of(oracle_points(scores, costs)),
        }
        two = {
            tiers[k]: Frontier.of(
                route_points(lambda t, k=k: np.where(p[:, k] >= t, k, best), threshold_grid(p[:, k]), scores, costs)
            )
            for k in range(best)
        }
        best_q, best_c = float(mean_q[best]), float(mean_cost[best] * PER)

        def summary(f: Frontier) -> dict:
            at = f.cost_at(best_q)
            return {
                "cost_at_best_quality": at,
                "saving_at_best_quality": None if at is None else 1 - at / best_c,
                "quality_at_best_cost": f.quality_at(best_c),
                "max_quality": float(f.quality.max()),
            }

        if two:
            pick = max(
                two,
                key=lambda w: (
                    summary(two[w])["saving_at_best_quality"] or -1,
                    summary(two[w])["quality_at_best_cost"] or -1,
                ),
            )
            curves[f"two-model ({pick} / {tiers[best]})"] = two[pick]
        report = {
            "benchmark": self.name,
            "data": self.data,
            "tiers": tiers,
            "n_prompts": len(self.prompts),
            "per_requests": PER,
            "single": {
                t: {"cost": float(mean_cost[k] * PER), "quality": float(mean_q[k])} for k, t in enumerate(tiers)
            },
            "best_single": tiers[best],
            "above_router": [
                t
                for k, t in enumerate(tiers)  # single models the router's frontier does not reach at their cost
                if (q := curves["router"].quality_at(mean_cost[k] * PER)) is None or q < mean_q[k] - 1e-12
            ],
            "scorers": {k: summary(f) for k, f in curves.items()},
            "two_model_all": {w: summary(f) for w, f in two.items()},
            "curves": {
                k: {"cost": f.cost.round(6).tolist(), "quality": f.quality.round(6).tolist()} for k, f in curves.items()
            },
            "prices": self.prices,
        }
        return report, curves


def run_tier_eval(router_dir: Path, evaluator: TierEvaluator, out: Path, folds: int = 5) -> dict:
    """Evaluate the router's tier policy on the evaluator's table, each fold scored by the recipe refit without it;
    writes metrics.json, frontier.png and table.md into `out`."""
    from ..data import load_grades
    from ..embed import Encoder
    from ..manifest import RouterFolder
    from ..recipe import Recipe
    from ..train import fit

    if folds < 2:
        raise RouterError(f"--folds must be at least 2, got {folds}")
    record = RouterFolder(router_dir).record()
    recipe = Recipe.from_dict(record.recipe)
    enc = Encoder(record.encoder_path, record.encoder.max_seq_length, record.encoder.layers)
    with step("reading the router's training data"):
        grades = load_grades(
            list(dict.fromkeys(d["path"] for d in record.data)),
            {d["name"]: d["weight"] for d in record.data},
            recipe.val,
            recipe.test,
            recipe.seed,
            recipe.max_prompts,
        )
    prompts = evaluator.prompts
    fold = folds_of(prompts["group"], folds)
    p = np.empty(evaluator.grades.shape)  # each tier's score column as the service reads it (`Router.score`)
    parts = np.unique(fold)
    for n, f in enumerate(parts, 1):
        held = fold == f
        with step(
            f"fold {n}/{len(parts)}: fitting the recipe without {int(held.sum()):,} benchmark prompts",
            total=recipe.steps,
        ) as bar:
            model = fit(grades.without(set(prompts["group"][held])), enc, recipe, lambda i, loss: bar.advance())
        outputs = model.predict(prompts["prompt"][held].tolist())
        chances = outputs.pass_chances()
        for k, t in enumerate(evaluator.tiers):
            p[held, k] = chances[:, outputs.column(t if t in outputs.models else GENERIC)]
    p[:, -1] = 1.0
    report, curves = evaluator(p)
    report |= {
        "router": str(router_dir),
        "folds": folds,
        "protocol": f"{folds}-fold cross-validation by prompt: the router's recipe refit per fold on its training data "
        "without the fold's prompts; each tier's pass chance against the top tier",
    }
    write_tier_outputs(report, curves, Path(out))
    return report


def tier_table(report: dict) -> str:
    per = report["per_requests"]
    lines = [
        f"| policy | $ per {per:,} requests at {report['best_single']}'s quality | saving | quality at its cost | best quality |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, m in report["scorers"].items():
        c, sv = m["cost_at_best_quality"], m["saving_at_best_quality"]
        q = m["quality_at_best_cost"]
        lines.append(
            f"| {name} | {'not reached' if c is None else f'{c:.3f}'} | {'–' if sv is None else f'{sv:.1%}'} | "
            f"{'–' if q is None else f'{q:.3f}'} | {m['max_quality']:.3f} |"
        )
    lines += ["", f"| single model | $ per {per:,} requests | quality |", "| --- | ---: | ---: |"]
    for t, m in report["single"].items():
        lines.append(f"| {t}{' (best)' if t == report['best_single'] else ''} | {m['cost']:.3f} | {m['quality']:.3f} |")
    return "\n".join(lines)


def write_tier_outputs(report: dict, curves: dict, out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(8, 6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, f in curves.items():
        x, y = f.envelope()
        ax.step(x, y, where="post", label=name, linestyle=":" if name == "oracle" else "-")
    for t, m in report["single"].items():
        ax.scatter(m["cost"], m["quality"], marker="o", zorder=3)
        ax.annotate(t, (m["cost"], m["quality"]), fontsize="x-small", xytext=(4, -8), textcoords="offset points")
    ax.axhline(report["single"][report["best_single"]]["quality"], color="grey", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel(f"$ per {report['per_requests']:,} requests (log)")
    ax.set_ylabel("Routed quality (mean grade)")
    ax.set_title(
        f"{report['benchmark']}: {len(report['tiers'])} tiers, {report['n_prompts']} held-out prompts",
        fontsize="medium",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(out / "frontier.png", dpi=120)
    (out / "metrics.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    (out / "table.md").write_text(
        f"### {report['benchmark']}: tiers {', '.join(report['tiers'])}\n\n"
        f"{report['n_prompts']} prompts; {report['protocol']}.\n\n{tier_table(report)}\n"
        + (
            f"\nSingle models above the router's frontier: {', '.join(report['above_router'])}.\n"
            if report["above_router"]
            else ""
        )
    )
