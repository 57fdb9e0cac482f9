"""What routing cost in quality on the service's own traffic: the estimate from shadow-graded requests. numpy only.

Each shadow-graded request (serving/shadow.py) holds both answers' grades and costs: the weak side's (the tier it
was routed to, or the cheapest tier when it went to the strongest) and the strongest tier's, the weak side's pass
chance and the threshold in use. From a sample of them:

- retained quality: the routed answers' mean grade over the strongest tier's on the same prompts;
- cost ratio: what the routed answers cost over what the strongest tier's cost (savings = 1 - it);
- each with a 95% percentile interval from resampling the prompts;
- the frontier: every prompt re-decided at every threshold (weak when its pass chance >= the threshold), beside
  random routing and the oracle, and the threshold that keeps a quality target at the lowest cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95
MIN_TASK = 10  # graded requests of a task type before it gets an estimate of its own


@dataclass(frozen=True)
class Graded:
    """Shadow-graded requests, one entry each."""

    p_weak: np.ndarray  # the weak side's pass chance
    went_weak: np.ndarray  # bool: the client got the weak side's answer
    weak_grade: np.ndarray  # in [0, 1]
    strong_grade: np.ndarray
    weak_cost: np.ndarray  # USD
    strong_cost: np.ndarray
    task_type: np.ndarray  # str

    @classmethod
    def of(cls, rows: list[dict]) -> Graded:
        """From rows with the fields above (`went_weak` as 0/1)."""
        col = lambda k, t=float: np.array([r[k] for r in rows], dtype=t)  # noqa: E731
        return cls(
            col("p_weak"),
            col("went_weak", bool),
            col("weak_grade"),
            col("strong_grade"),
            col("weak_cost"),
            col("strong_cost"),
            col("task_type", object),
        )

    def __len__(self) -> int:
        return len(self.p_weak)

    def rows(self, index) -> Graded:
        return Graded(*(getattr(self, f)[index] for f in self.__dataclass_fields__))


def share(part: float, whole: float) -> float:
    """part / whole; NaN when the whole is not positive (nothing to retain, or nothing spent)."""
    return float(part / whole) if whole > 0 else float("nan")


def ratios(g: Graded, weak: np.ndarray, index: np.ndarray | None = None) -> tuple[float, float]:
    """(retained quality, cost ratio) of sending `weak` prompts to the weak side, on the prompts at `index`."""
    if index is not None:
        g, weak = g.rows(index), weak[index]
    q = np.where(weak, g.weak_grade, g.strong_grade).sum()
    c = np.where(weak, g.weak_cost, g.strong_cost).sum()
    return share(q, g.strong_grade.sum()), share(c, g.strong_cost.sum())


def interval(g: Graded, weak: np.ndarray, seed: int = 0) -> dict:
    """Retained quality and cost ratio, with their intervals over resampled prompts (each resample's sums from
    its prompts' counts, so 1,000 resamples of 100,000 requests take about a second)."""
    rng = np.random.default_rng(seed)
    n = len(g)
    sums = np.stack(
        [
            np.where(weak, g.weak_grade, g.strong_grade),
            g.strong_grade,
            np.where(weak, g.weak_cost, g.strong_cost),
            g.strong_cost,
        ]
    )
    boot = np.empty((RESAMPLES, 4))
    for b in range(RESAMPLES):
        boot[b] = sums @ np.bincount(rng.integers(0, n, n), minlength=n)
    with np.errstate(divide="ignore", invalid="ignore"):
        both = np.c_[boot[:, 0] / boot[:, 1], boot[:, 2] / boot[:, 3]]
    both[~np.isfinite(both)] = np.nan
    lo, hi = np.nanpercentile(both, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2], axis=0)
    retained, cost = ratios(g, weak)
    return {
        "prompts": n,
        "retained_quality": retained,
        "retained_quality_ci": [float(lo[0]), float(hi[0])],
        "cost_ratio": cost,
        "cost_ratio_ci": [float(lo[1]), float(hi[1])],
        "savings": 1 - cost,
        "weak_share": float(weak.mean()),
    }


def thinned(points: list[dict], most: int = 400) -> list[dict]:
    keep = sorted(set(np.linspace(0, len(points) - 1, min(len(points), most)).round().astype(int)))
    return [points[i] for i in keep]


def frontier(g: Graded) -> dict[str, list[dict]]:
    """(cost ratio, retained quality) points: the router re-deciding every prompt at each threshold (weak when its
    pass chance >= it), random routing, and the oracle (the prompts where the strongest tier gains most go to it)."""
    n, strong_q, strong_c = len(g), g.strong_grade.sum(), g.strong_cost.sum()
    order = np.argsort(-g.p_weak, kind="stable")  # the first k go weak at any threshold in (p[k], p[k-1]]
    dq = np.r_[0.0, np.cumsum((g.weak_grade - g.strong_grade)[order])]
    dc = np.r_[0.0, np.cumsum((g.weak_cost - g.strong_cost)[order])]
    p = g.p_weak[order]
    ends = [0] + [k for k in range(1, n + 1) if k == n or p[k] != p[k - 1]]  # whole groups of equal pass chance
    router = []
    for k in ends:
        q, c = share(strong_q + dq[k], strong_q), share(strong_c + dc[k], strong_c)
        threshold = float(p[k - 1]) if k else float("inf")
        router.append({"threshold": threshold, "retained_quality": q, "cost_ratio": c, "weak_share": k / n})
    w, wc = share(g.weak_grade.sum(), strong_q), share(g.weak_cost.sum(), strong_c)
    shares = np.linspace(0, 1, 11)
    rand = [{"weak_share": float(s), "retained_quality": s * w + 1 - s, "cost_ratio": s * wc + 1 - s} for s in shares]
    gain = np.argsort(-(g.strong_grade - g.weak_grade), kind="stable")  # to the strongest tier first
    oq = np.r_[0.0, np.cumsum((g.strong_grade - g.weak_grade)[gain])]
    oc = np.r_[0.0, np.cumsum((g.strong_cost - g.weak_cost)[gain])]
    oracle = []
    for k in range(n + 1):
        q, c = share(g.weak_grade.sum() + oq[k], strong_q), share(g.weak_cost.sum() + oc[k], strong_c)
        oracle.append({"strong_prompts": k, "retained_quality": q, "cost_ratio": c})
    return {"router": router, "random": rand, "oracle": oracle}


def cheapest_keeping(points: list[dict], target: float) -> dict | None:
    """The router's point of lowest cost ratio whose retained quality is at least `target`; None if none is."""
    ok = [p for p in points if p["retained_quality"] >= target]
    return min(ok, key=lambda p: (p["cost_ratio"], -p["threshold"])) if ok else None


def estimate(g: Graded, target: float, seed: int = 0) -> dict:
    """The whole answer: at the thresholds in use (the decisions the clients got), per task type, the frontier and
    the threshold that keeps `target` at the lowest cost."""
    if len(g) == 0:
        return {
            "prompts": 0,
            "target": target,
            "in_use": None,
            "by_task_type": {},
            "frontier": None,
            "for_target": None,
        }
    by_task = {
        str(t): interval(g.rows(g.task_type == t), g.went_weak[g.task_type == t], seed)
        for t in sorted(set(g.task_type.tolist()))
        if (g.task_type == t).sum() >= MIN_TASK
    }
    curves = frontier(g)
    best = cheapest_keeping(curves["router"], target)
    return {
        "prompts": len(g),
        "target": target,
        "in_use": interval(g, g.went_weak, seed),
        "by_task_type": by_task,
        "frontier": {k: thinned(v) for k, v in curves.items()},
        "for_target": best,
    }


SIDES = ("weak", "strong")
RANGES = {"p_weak": 1, "weak_grade": 1, "strong_grade": 1, "weak_cost": 1e6, "strong_cost": 1e6}  # [0, high]
REQUEST_COLUMNS = ["p_weak", "went_weak", "weak_cost", "strong_cost", "weak_grade", "strong_grade", "task_type"]


def graded_table(rows: list[dict]):
    """Shadow-graded requests as a graded long table that `train --prior` reads (as `label` writes it: one row per
    prompt and graded model; in pairwise mode the strongest tier's answer is the baseline and has no row), each row
    also carrying its request's figures (REQUEST_COLUMNS, `threshold`), which `from_table` reads back."""
    import pandas as pd

    out = []
    for r in rows:
        pairwise = r["mode"] == "pairwise"
        for side in SIDES[:1] if pairwise else SIDES:
            out.append(
                {
                    "prompt": r["text"],
                    "prompt_id": r["id"],
                    "model": r[f"{side}_model"],
                    "score": r[f"{side}_grade"],
                    "source": "judge_pairwise" if pairwise else "judge_single",
                    "judge": r["judge"],
                    "baseline": r["strong_model"] if pairwise else None,
                    "client": r["client"],
                    "threshold": r["threshold"],
                    **{k: r[k] for k in REQUEST_COLUMNS},
                }
            )
    return pd.DataFrame(out)


def from_table(df, where: str) -> Graded:
    """The requests of a `graded_table` file (`where`: its name, for the error)."""
    missing = [c for c in ("prompt_id", *REQUEST_COLUMNS) if c not in df.columns]
    if missing:
        from .errors import DataError

        raise DataError(
            f"{where}: not a shadow-graded export: no column {', '.join(missing)} (learned-router quality export)"
        )
    import pandas as pd

    from .errors import first_bad

    df = df.drop_duplicates("prompt_id").reset_index(drop=True)
    for column, high in RANGES.items():
        values = pd.to_numeric(df[column], errors="coerce")
        first_bad(
            where,
            values.isna() | ~values.between(0, high),
            f"field '{column}' must be a number in [0, {high:g}]",
            df[column],
        )
    went = pd.to_numeric(df["went_weak"], errors="coerce")
    first_bad(where, ~went.isin([0, 1]), "field 'went_weak' must be 0 or 1", df["went_weak"])
    return Graded.of(df[REQUEST_COLUMNS].to_dict("records"))


def from_file(path) -> Graded:
    """The requests of a 'quality export' file."""
    from .data import read_table

    return from_table(read_table(path), str(path))


def strong_share_for(path, target: float) -> tuple[float, dict]:
    """The share of strong calls that keeps `target` of the quality at the lowest cost on a 'quality export' file,
    and that point of the frontier with the file's count of `prompts`; RouterError when no share keeps it."""
    from .errors import RouterError

    est = estimate(from_file(path), target)
    if est["for_target"] is None:
        raise RouterError(f"{path}: no share of weak calls keeps {target:g} of the quality there")
    return round(1 - est["for_target"]["weak_share"], 4), {**est["for_target"], "prompts": est["prompts"]}


def markdown(estimate: dict, title: str) -> str:
    """A short summary of an estimate, for people."""
    if not estimate["prompts"]:
        return f"# {title}\n\nNo graded requests yet.\n"
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    span = lambda v: f"{pct(v[0])} to {pct(v[1])}"  # noqa: E731
    now, best = estimate["in_use"], estimate["for_target"]
    lines = [
        f"# {title}",
        "",
        f"{estimate['prompts']} shadow-graded requests. Against sending every request to the strongest tier:",
        "",
        "| | estimate | 95% interval |",
        "| --- | ---: | --- |",
        f"| quality retained | {pct(now['retained_quality'])} | {span(now['retained_quality_ci'])} |",
        f"| cost | {pct(now['cost_ratio'])} | {span(now['cost_ratio_ci'])} |",
        f"| savings | {pct(now['savings'])} | {span([1 - now['cost_ratio_ci'][1], 1 - now['cost_ratio_ci'][0]])} |",
        "",
        f"Requests answered by the weak side: {pct(now['weak_share'])}.",
        "",
    ]
    if estimate["by_task_type"]:
        lines += ["| task type | requests | quality retained (95%) | cost (95%) |", "| --- | ---: | --- | --- |"]
        for t, m in estimate["by_task_type"].items():
            lines.append(
                f"| {t} | {m['prompts']} | {pct(m['retained_quality'])} ({span(m['retained_quality_ci'])}) | "
                f"{pct(m['cost_ratio'])} ({span(m['cost_ratio_ci'])}) |"
            )
        lines.append("")
    target = pct(estimate["target"])
    lines.append(
        f"To keep {target} of the quality at the lowest cost on these requests: route weak at pass chance >= "
        f"{best['threshold']:.4f} ({pct(best['weak_share'])} weak), keeping {pct(best['retained_quality'])} at "
        f"{pct(best['cost_ratio'])} of the cost."
        if best
        else f"No threshold keeps {target} of the quality on these requests but sending everything to the strongest."
    )
    return "\n".join(lines) + "\n"
