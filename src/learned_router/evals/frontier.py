"""The routed-quality curve (quality vs share of strong calls) and the metrics read off it.

Two conventions are kept side by side:
- ours: the curve at every distinct score (`sweep(..., quantiles=None)`), which spans 0-100% strong calls;
- RouteLLM's `evaluate.py`: `sweep(..., quantiles=10)`, its 11 `pd.qcut` cut points, and `np.interp` for CPT.
Strong fractions are in [0, 1] in both (RouteLLM prints percentages).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.integrate import trapezoid

from ..errors import DataError
from ..prices import cost_usd
from .checks import as_array, as_pair

TOL = 1e-12  # float slack when comparing a curve's quality with a target


@dataclass(frozen=True)
class Curve:
    """Points sorted by strong fraction, first at 0 (all weak) and last at 1 (all strong).

    `threshold[i]`: a prompt goes strong when its strong score >= threshold[i] (inf: none does; a router's
    p_weak threshold is 1 - this when strong score = 1 - p_weak). `cost`: mean cost per prompt, when costs were given.
    """

    strong_fraction: np.ndarray
    quality: np.ndarray
    threshold: np.ndarray
    cost: np.ndarray | None = None

    def to_dict(self) -> dict:
        """JSON-ready lists; an infinite or NaN threshold becomes None."""
        out = {
            "strong_fraction": self.strong_fraction.tolist(),
            "quality": self.quality.tolist(),
            "threshold": [float(t) if np.isfinite(t) else None for t in self.threshold],
        }
        if self.cost is not None:
            out["cost"] = self.cost.tolist()
        return out


def per_prompt_cost(cost_per_call: Mapping[str, object], n: int) -> tuple[np.ndarray, np.ndarray]:
    """`{"weak": c, "strong": c}`, each a number (every call costs the same) or one cost per prompt.

    Any unit works (relative, or dollars the caller computed with `call_cost`); savings are ratios.
    """
    if set(cost_per_call) != {"weak", "strong"}:
        raise DataError(f"cost_per_call: expected the keys 'weak' and 'strong', got {sorted(cost_per_call)}")
    out = []
    for model in ("weak", "strong"):
        raw = cost_per_call[model]
        c = as_array(np.broadcast_to(raw, (n,)) if np.ndim(raw) == 0 else raw, f"cost_per_call['{model}']", n)
        if (c < 0).any():
            raise DataError(f"cost_per_call['{model}']: costs must be >= 0")
        out.append(c)
    if out[1].sum() <= 0:
        raise DataError("cost_per_call['strong']: the all-strong cost must be > 0")
    return out[0], out[1]


def call_cost(input_tokens, output_tokens, usd_per_m_input: float, usd_per_m_output: float) -> np.ndarray:
    """Dollars per call from token counts (numbers or per-prompt arrays) and $ per 1M input/output tokens."""
    return cost_usd(
        np.asarray(input_tokens, float), np.asarray(output_tokens, float), usd_per_m_input, usd_per_m_output
    )


def sweep(
    strong_score, weak, strong, quantiles: int | None = 10, cost_per_call: Mapping[str, object] | None = None
) -> Curve:
    """Routed quality at each threshold on `strong_score` (higher = more in need of the strong model).

    quantiles=None: a point at every distinct score, so the curve is exact; a tie group enters all at once and
    the straight segment across it is the expected curve when the router breaks the tie at random.
    quantiles=q: RouteLLM's thresholds, the `pd.qcut(scores, q, retbins=True)` cut points; a prompt goes strong when
    score >= cut, except at the last cut (the maximum) where it is `>`, so none does. Ties make `qcut` raise on
    duplicate edges in RouteLLM; here `duplicates="drop"` keeps the distinct edges, which route the same prompts.
    The all-weak and all-strong points are always included. Quality = mean of the routed answers' qualities.
    """
    weak, strong = as_pair(weak, strong)
    n = weak.size
    score = as_array(strong_score, "strong score", n)
    order = np.argsort(-score, kind="stable")
    desc = score[order]
    if quantiles is None:
        cuts = np.unique(score)
    else:
        if not isinstance(quantiles, int) or quantiles < 1:
            raise DataError(f"quantiles must be a positive integer or None, got {quantiles!r}")
        cuts = pd.qcut(score, quantiles, retbins=True, duplicates="drop")[1]
    n_strong = np.searchsorted(-desc, -cuts, side="right")  # prompts with score >= cut
    if quantiles is not None:
        n_strong[-1] = 0  # RouteLLM's `>` at the maximum
    k = np.unique(np.concatenate([[0, n], n_strong]))
    gain = np.concatenate([[0.0], np.cumsum((strong - weak)[order])])
    threshold = np.where(k > 0, desc[np.maximum(k - 1, 0)], np.inf)
    cost = None
    if cost_per_call is not None:
        c_weak, c_strong = per_prompt_cost(cost_per_call, n)
        extra = np.concatenate([[0.0], np.cumsum((c_strong - c_weak)[order])])
        cost = c_weak.mean() + extra[k] / n
    return Curve(k / n, weak.mean() + gain[k] / n, threshold, cost)


def auc(curve: Curve) -> float:
    """Trapezoid area under the curve over its own strong-fraction range."""
    return float(trapezoid(curve.quality, curve.strong_fraction))  # np.trapz's rule, as RouteLLM's


def apgr(curve: Curve, weak_mean: float, strong_mean: float) -> float:
    """Average performance gap recovered: (AUC - weak area) / (strong area - weak area).

    The reference areas are flat lines at each model's mean over the curve's own range, as RouteLLM computes
    them; on a curve from `sweep` that range is [0, 1]. Random routing gives 0.5. NaN when the means are equal.
    """
    width = curve.strong_fraction[-1] - curve.strong_fraction[0]
    gap = (strong_mean - weak_mean) * width
    return float((auc(curve) - weak_mean * width) / gap) if gap != 0 else float("nan")


def quality_target(weak_mean: float, strong_mean: float, p: float) -> float:
    return weak_mean + p * (strong_mean - weak_mean)


def first_crossing(curve: Curve, target: float) -> tuple[int, float] | None:
    """(i, t): the curve first reaches `target` at t in (0, 1] of the way from point i - 1 to point i (i = 0, t = 1
    when it starts there); None when it never does. Later dips below the target are ignored."""
    reached = curve.quality >= target - TOL
    if not reached.any():
        return None
    i = int(np.argmax(reached))
    if i == 0:
        return 0, 1.0
    q0, q1 = curve.quality[i - 1 : i + 1]
    return i, min(1.0, (target - q0) / (q1 - q0))


def _at(values: np.ndarray, i: int, t: float) -> float:
    return float(values[0] if i == 0 else values[i - 1] + t * (values[i] - values[i - 1]))


def cpt(curve: Curve, weak_mean: float, strong_mean: float, p: float) -> float:
    """Call-performance threshold, ours: the strong fraction where the curve first reaches weak + p * gap.

    Linear between the two points that bracket the first crossing, so a later dip does not move it.
    NaN when the curve never reaches the target.
    """
    hit = first_crossing(curve, quality_target(weak_mean, strong_mean, p))
    return float("nan") if hit is None else _at(curve.strong_fraction, *hit)


def cpt_routellm(curve: Curve, weak_mean: float, strong_mean: float, p: float) -> float:
    """Call-performance threshold as RouteLLM's script computes it: `np.interp(target, quality, strong_fraction)`.

    np.interp assumes quality rises with the strong fraction; where the curve dips it may pick a later crossing,
    and it never returns NaN (a target above every point gives the last point's fraction).
    """
    return float(np.interp(quality_target(weak_mean, strong_mean, p), curve.quality, curve.strong_fraction))


def cost_saving(curve: Curve, strong_mean: float, share: float = 0.95) -> tuple[float, float]:
    """(saving vs all-strong, strong fraction) where the curve first reaches quality share * strong_mean.

    Saving = 1 - cost there / cost of the all-strong point. Cost and fraction are linear between the bracketing
    points, like `cpt` (between two thresholds, or across a tie group, that is what random tie-breaking achieves).
    Needs a curve swept with `cost_per_call`; NaNs when the target is never reached.
    """
    if curve.cost is None:
        raise DataError("cost saving needs a curve swept with cost_per_call")
    hit = first_crossing(curve, share * strong_mean)
    if hit is None:
        return float("nan"), float("nan")
    return 1.0 - _at(curve.cost, *hit) / float(curve.cost[-1]), _at(curve.strong_fraction, *hit)
