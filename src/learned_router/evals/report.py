"""Every metric for every scorer on one benchmark, as a JSON-ready dict, and its markdown table."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import numpy as np
from scipy.stats import DegenerateDataWarning, bootstrap

from ..errors import DataError
from .baselines import oracle_envelope, oracle_scores, random_scores, routellm_random_curve
from .checks import as_array, as_binary, as_pair, as_unit
from .classifier import classifier_metrics
from .frontier import Curve, apgr, auc, cost_saving, cpt, cpt_routellm, sweep

CPT_SHARES = (0.2, 0.5, 0.8)
# Added by `evaluate` from the qualities alone:
REFERENCES = {
    "random": "expected random routing (every score ties): the straight line, APGR 0.5",
    "oracle": "best routing at each exact share of strong calls (largest gain first, losses last)",
    "optimal": "best quality with at most each share of strong calls (RouteLLM's Optimal line; README oracle APGR)",
    "random_routellm": "RouteLLM's random router (seed 0, 10 runs, averaged); only with routellm_random=True",
}
RESAMPLES = 1000  # bootstrap resamples of the prompts behind each APGR interval
LEVEL = 0.95


def curve_metrics(
    fine: Curve, routellm: Curve, weak_mean: float, strong_mean: float, cost_share: float = 0.95
) -> dict[str, float]:
    """apgr/auc/cptNN on the exact curve (ours) and *_routellm on RouteLLM's quantile curve; cost saving when
    the exact curve has costs."""
    out = {
        "apgr": apgr(fine, weak_mean, strong_mean),
        "apgr_routellm": apgr(routellm, weak_mean, strong_mean),
        "auc": auc(fine),
        "auc_routellm": auc(routellm),
    }
    for p in CPT_SHARES:
        key = f"cpt{round(p * 100)}"
        out[key] = cpt(fine, weak_mean, strong_mean, p)
        out[f"{key}_routellm"] = cpt_routellm(routellm, weak_mean, strong_mean, p)
    if fine.cost is not None:
        out["cost_saving"], out["cost_saving_strong_fraction"] = cost_saving(fine, strong_mean, cost_share)
    return out


def apgr_intervals(
    strong_score: Mapping[str, object], weak_q, strong_q, lead_of: str, resamples: int = RESAMPLES, seed: int = 0
) -> dict[str, dict[str, list[float]]]:
    """95% percentile-bootstrap intervals over the prompts (a resample draws prompts with replacement, each with its
    scores and grades): every scorer's exact APGR ("apgr_ci") and, for the others, `lead_of`'s APGR minus theirs on
    the same resamples ("lead_ci": above 0 = `lead_of` ahead beyond resampling noise). An interval is [NaN, NaN] when
    some resample has both models at the same mean quality (APGR undefined there; only on small or near-tied sets)."""
    weak, strong = as_pair(weak_q, strong_q)
    scores = {name: as_array(s, f"strong score '{name}'", weak.size) for name, s in strong_score.items()}
    if lead_of not in scores:
        raise DataError(f"lead_of: '{lead_of}' is not among the scorers {sorted(scores)}")

    names, rest = list(scores), [n for n in scores if n != lead_of]

    def statistic(*arrays):  # every scorer's APGR, then lead_of's minus each other's, on one resample
        *resampled, w, s = arrays
        a = dict(zip(names, (apgr(sweep(x, w, s, None), w.mean(), s.mean()) for x in resampled)))
        return np.array([a[n] for n in names] + [a[lead_of] - a[n] for n in rest])

    with warnings.catch_warnings():  # a NaN resample gives a NaN interval, documented above
        warnings.simplefilter("ignore", DegenerateDataWarning)
        ci = bootstrap(
            (*scores.values(), weak, strong),
            statistic,
            paired=True,
            vectorized=False,
            n_resamples=resamples,
            confidence_level=LEVEL,
            method="percentile",
            rng=seed,
        ).confidence_interval
    lo, hi = np.atleast_1d(ci.low).tolist(), np.atleast_1d(ci.high).tolist()
    out = {n: {"apgr_ci": [lo[i], hi[i]]} for i, n in enumerate(names)}
    for i, n in enumerate(rest, start=len(names)):
        out[n]["lead_ci"] = [lo[i], hi[i]]
    return out


def span(v: list | None, fmt: str = "{:.3f} to {:.3f}") -> str:
    """An interval for a table; "–" when not computed or undefined."""
    return fmt.format(*v) if v and None not in v and not any(map(math.isnan, v)) else "–"


def evaluate(
    strong_score: Mapping[str, object],
    weak_q,
    strong_q,
    cost_per_call: Mapping[str, object] | None = None,
    labels=None,
    p_weak: Mapping[str, object] | None = None,
    quantiles: int = 10,
    cost_share: float = 0.95,
    routellm_random: bool = False,
    lead_of: str | None = None,
) -> dict:
    """Metrics and curves for each named strong score (router and baselines), plus the reference curves
    `random`, `oracle` and `optimal` (and `random_routellm` on request), on the same prompts.

    weak_q/strong_q: per-prompt quality in [0, 1]. cost_per_call: see `frontier.per_prompt_cost`.
    labels (1 = weak passes) with p_weak ({name: P(weak passes)}): adds roc_auc, ece and brier to those entries.
    lead_of (a scorer's name): adds `apgr_intervals` (apgr_ci to every named scorer, lead_ci to the others).
    Returns {"n_prompts", "weak_mean", "strong_mean", "quantiles", "cost_share", "lead_of",
             "scorers": {name: {"reference": bool, "apgr", "apgr_routellm", "auc", "auc_routellm",
                                "cpt20", "cpt20_routellm", "cpt50", ..., "cpt80_routellm",
                                ["cost_saving", "cost_saving_strong_fraction"], ["roc_auc", "ece", "brier"],
                                ["apgr_ci", "lead_ci"]}},
             "curves": {name: {"fine": Curve.to_dict(), "routellm": Curve.to_dict()}}}
    with NaN (a target never reached, an undefined metric) written as None.
    """
    weak, strong = as_pair(weak_q, strong_q)
    taken = set(strong_score) & set(REFERENCES)
    if taken:
        raise DataError(f"scorer names {sorted(taken)} are reserved for the reference curves")
    if not strong_score:
        raise DataError("evaluate: no scorers given")
    curves = {}
    for name, score in strong_score.items():
        curves[name] = tuple(sweep(score, weak, strong, q, cost_per_call) for q in (None, quantiles))
    for name, score in (("random", random_scores(weak.size)), ("oracle", oracle_scores(weak, strong))):
        curves[name] = tuple(sweep(score, weak, strong, q, cost_per_call) for q in (None, quantiles))
    curves["optimal"] = (oracle_envelope(weak, strong), oracle_envelope(weak, strong, quantiles))
    if routellm_random:
        curve = routellm_random_curve(weak, strong, quantiles)
        curves["random_routellm"] = (curve, curve)

    weak_mean, strong_mean = float(weak.mean()), float(strong.mean())
    scorers = {
        name: {"reference": name in REFERENCES, **curve_metrics(fine, rl, weak_mean, strong_mean, cost_share)}
        for name, (fine, rl) in curves.items()
    }
    if p_weak:
        if labels is None:
            raise DataError("p_weak given without labels")
        y = as_binary(labels, "labels", weak.size)
        unknown = set(p_weak) - set(strong_score)
        if unknown:
            raise DataError(f"p_weak names {sorted(unknown)} are not among the scorers")
        for name, p in p_weak.items():
            scorers[name].update(classifier_metrics(as_unit(p, f"p_weak['{name}']", y.size), y))
    if lead_of is not None:
        for name, cis in apgr_intervals(strong_score, weak, strong, lead_of).items():
            scorers[name].update(cis)
    return _json_ready(
        {
            "n_prompts": int(weak.size),
            "weak_mean": weak_mean,
            "strong_mean": strong_mean,
            "quantiles": quantiles,
            "cost_share": cost_share,
            "lead_of": lead_of,
            "scorers": scorers,
            "curves": {name: {"fine": fine.to_dict(), "routellm": rl.to_dict()} for name, (fine, rl) in curves.items()},
        }
    )


def _json_ready(obj):
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def markdown_table(report: dict) -> str:
    """One row per scorer of an `evaluate` report: APGR (both conventions), CPT50/CPT80 (both), cost saving at the
    report's quality share, ROC-AUC, and the APGR intervals when computed; "–" where a value is undefined or not
    computed."""
    share = round(report["cost_share"] * 100)
    cols = [
        ("APGR", "apgr", "{:.3f}"),
        ("APGR (RouteLLM)", "apgr_routellm", "{:.3f}"),
        ("CPT50", "cpt50", "{:.1%}"),
        ("CPT50 (RouteLLM)", "cpt50_routellm", "{:.1%}"),
        ("CPT80", "cpt80", "{:.1%}"),
        ("CPT80 (RouteLLM)", "cpt80_routellm", "{:.1%}"),
        (f"cost saving @{share}%", "cost_saving", "{:.1%}"),
        ("ROC-AUC", "roc_auc", "{:.3f}"),
    ]
    ranges = (
        [
            (f"APGR {LEVEL:.0%} CI", "apgr_ci", "{:.3f} to {:.3f}"),
            (f"{report.get('lead_of')} − this, {LEVEL:.0%} CI", "lead_ci", "{:+.3f} to {:+.3f}"),
        ]
        if report.get("lead_of")
        else []
    )
    heads = [c[0] for c in cols[:1] + ranges[:1] + cols[1:] + ranges[1:]]
    lines = ["| scorer | " + " | ".join(heads) + " |", "| --- |" + " ---: |" * len(heads)]
    for name, m in report["scorers"].items():
        cells = [fmt.format(m[key]) if m.get(key) is not None else "–" for _, key, fmt in cols]
        spans = [span(m.get(key), fmt) for _, key, fmt in ranges]
        lines.append(f"| {name} | " + " | ".join(cells[:1] + spans[:1] + cells[1:] + spans[1:]) + " |")
    return "\n".join(lines)
