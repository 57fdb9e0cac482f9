"""The learning curve of a two-level router on one graded table: how its routing quality grows with the user's
labelled prompts, next to the prior alone and the plain methods that learn only from those prompts.

For each size N, `draws` random draws of N training prompts from the table (the held-out prompts never among them);
each method is fitted on the draw and scored on the same held-out prompts: APGR, averaged over the draws, with a 95%
percentile interval from resampling the held-out prompts (the draws' mean on each resample, paired across methods).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import residual as top
from ..errors import DataError
from ..outputs import pass_chances
from ..parity import apgr_of
from ..progress import step
from .baselines import knn_scores, prompt_length_scores
from .protocol import BenchmarkEvaluator, folds_of

METHODS = ("prior", "kNN", "ridge", "prompt length", "two-level")
RESAMPLES = 500


@dataclass
class Table:
    """A pair's graded prompts with the prior graph's outputs on them."""

    bench: pd.DataFrame
    base: np.ndarray  # (n, 2): the prior's base output for (weak, strong)
    base_names: list[str]
    prior_p: np.ndarray  # (n,): the prior's weak pass chance for the pair (generic where it does not know both)
    emb: np.ndarray
    lengths: np.ndarray

    @property
    def grades(self) -> np.ndarray:
        return self.bench[["weak_q", "strong_q"]].to_numpy(np.float32)


def prepare(prior: Path, bench: pd.DataFrame) -> Table:
    """The table of `load_benchmark` with the prior router's outputs on its prompts."""
    from ..prior import prior_outputs
    from ..scorer import Router

    router = Router(prior)
    quality, difficulty, emb = prior_outputs(router, bench["prompt"].tolist())
    pair = [bench["weak_model"].iloc[0], bench["strong_model"].iloc[0]]
    base, names = top.bases(quality, difficulty, router.graph_models, pair)
    known = all(m in router.graph_models for m in pair)
    prior_p = pass_chances(base[:, 0], base[:, 1]) if known else 1.0 - difficulty
    return Table(bench, base, names, prior_p, emb, top.log_length(bench["prompt"].tolist()))


def ridge_p(emb, lengths, label, train, test) -> np.ndarray:
    """Ridge regression of the pair's label on the embedding and log length, strength by built-in CV."""
    from sklearn.linear_model import RidgeCV

    x = np.c_[emb, (lengths - lengths[train].mean()) / (lengths[train].std() or 1.0)]
    model = RidgeCV(alphas=np.logspace(-1, 3, 9)).fit(x[train], label[train])
    return np.clip(model.predict(x[test]), 0.0, 1.0)


def scores_for_draw(t: Table, train: np.ndarray, test: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Each method's weak pass chance on the test rows after fitting on the train rows."""
    g = t.grades
    label = t.bench["label"].to_numpy(float)
    fitted = top.fit(
        t.base[train], t.lengths[train], t.emb[train], g[train], ["weak", "strong"], t.base_names, (0, 1), seed
    )
    q = fitted.predict(t.base[test], t.lengths[test], t.emb[test])
    out = {
        "prior": t.prior_p[test],
        "prompt length": 1.0 - prompt_length_scores(t.bench["prompt"].iloc[test].tolist()),
        "two-level": pass_chances(q[:, 0], q[:, 1]),
    }
    if len(np.unique(label[train])) == 2:
        out["kNN"] = 1.0 - knn_scores(t.emb[train], label[train], t.emb[test])
        out["ridge"] = ridge_p(t.emb, t.lengths, label, train, test)
    return out


def two_level_folds(prior: Path, bench: pd.DataFrame, fold: np.ndarray) -> dict[str, np.ndarray]:
    """p_weak of every benchmark prompt from a top level refit over `prior` without its fold ("router"), and of the
    prior and the baselines fitted on the same folds."""
    t = prepare(prior, bench)
    out: dict[str, np.ndarray] = {}
    for f in np.unique(fold):
        test, train = np.flatnonzero(fold == f), np.flatnonzero(fold != f)
        with step(f"fold {f + 1}/{len(np.unique(fold))}: fitting the top level and the baselines"):
            for name, p in scores_for_draw(t, train, test, int(f)).items():
                out.setdefault(name, np.full(len(bench), np.nan))[test] = p
    out["router"] = out.pop("two-level")
    out.pop("prompt length")  # run_eval adds its own
    return {k: v for k, v in out.items() if not np.isnan(v).any()}


@dataclass(frozen=True)
class HeldOutEvaluator:
    """Each method's APGR on the held-out prompts, averaged over the draws it was fitted on, with a 95% percentile
    interval from resampling the held-out prompts (the draws' mean on each resample, paired across methods)."""

    weak: np.ndarray  # the held-out prompts' grades of each side
    strong: np.ndarray
    seed: int = 0

    def __call__(self, per_draw: list[dict[str, np.ndarray]]) -> dict[str, dict]:
        """{method: {"apgr", "ci"}} for the methods every draw scored (p_weak on the held-out prompts)."""
        methods = [m for m in METHODS if all(m in s for s in per_draw)]
        w, s = self.weak, self.strong
        point = [np.mean([apgr_of(d[m], w, s) for d in per_draw]) for m in methods]
        rng = np.random.default_rng(self.seed)
        boot = np.empty((RESAMPLES, len(methods)))
        for b in range(RESAMPLES):
            i = rng.integers(0, len(w), len(w))
            boot[b] = [np.mean([apgr_of(d[m][i], w[i], s[i]) for d in per_draw]) for m in methods]
        lo, hi = np.nanpercentile(boot, [2.5, 97.5], axis=0)
        return {m: {"apgr": float(point[k]), "ci": [float(lo[k]), float(hi[k])]} for k, m in enumerate(methods)}


def curve(t: Table, sizes: list[int | None], draws: int = 5, test_share: float = 0.3, seed: int = 0) -> list[dict]:
    """One row per size (None: every training prompt): each method's mean APGR over the draws and its 95% interval."""
    bench = t.bench
    test = np.flatnonzero(folds_of(bench["group"], 10, seed) < round(test_share * 10))
    pool = np.setdiff1d(np.arange(len(bench)), test)
    held_out = HeldOutEvaluator(bench["weak_q"].to_numpy(float)[test], bench["strong_q"].to_numpy(float)[test], seed)
    if held_out.weak.mean() == held_out.strong.mean():
        raise DataError("the pair's mean grades are equal on the held-out prompts: APGR is undefined")
    rows = []
    for size in sizes:
        n = len(pool) if size is None else size
        if n > len(pool):
            continue
        per_draw = []
        with step(f"{n:,} training prompts: {draws} draws", total=draws) as bar:
            for d in range(draws):
                train = np.random.default_rng(seed + d).choice(pool, n, replace=False)
                per_draw.append(scores_for_draw(t, train, test, seed + d))
                bar.advance()
        rows.append({"size": n, "all": size is None, "test": len(test), "draws": draws, **held_out(per_draw)})
    return rows


def verdict(row: dict) -> tuple[float, bool]:
    """(the best other method's APGR, whether the two-level router is within 0.01 of it or above)."""
    best = max(row[m]["apgr"] for m in METHODS if m in row and m != "two-level")
    return best, row["two-level"]["apgr"] >= best - 0.01


def markdown(rows: list[dict], title: str) -> str:
    head = "| training prompts | " + " | ".join(METHODS) + " | two-level >= best - 0.01 |"
    lines = [
        f"**{title}** (held-out prompts: {rows[0]['test'] if rows else 0}; {rows[0]['draws'] if rows else 0} draws a size; "
        "APGR, 95% interval)",
        "",
        head,
        "|" + " --- |" * (len(METHODS) + 2),
    ]
    for r in rows:
        best, ok = verdict(r)
        cells = [f"{r[m]['apgr']:.3f} ({r[m]['ci'][0]:.3f} to {r[m]['ci'][1]:.3f})" if m in r else "–" for m in METHODS]
        lines.append(
            f"| {r['size']:,}{' (all)' if r['all'] else ''} | "
            + " | ".join(cells)
            + f" | {'yes' if ok else f'NO (best {best:.3f})'} |"
        )
    return "\n".join(lines)


def unseen(bench: pd.DataFrame, prior: Path) -> pd.DataFrame:
    """The benchmark without the prompts of the prior's training files (by normalised text), where those files are
    where router.json says."""
    from ..data import load_grades
    from ..manifest import RouterFolder

    paths = list(dict.fromkeys(d["path"] for d in RouterFolder(prior).manifest().data))
    if not paths or not all(Path(p).is_file() for p in paths):
        raise DataError(
            f"{prior}: its training files ({', '.join(paths) or 'none listed'}) are needed to drop the prompts it saw"
        )
    seen = set(load_grades(paths, val=0.0, test=0.0).obs["group"])
    return bench[~bench["group"].isin(seen)].reset_index(drop=True)


def run_learning_curve(
    prior: Path,
    evaluator: BenchmarkEvaluator,
    sizes: list[int | None],
    draws: int,
    out: Path,
    drop_seen: bool = False,
    reuse: bool = False,
) -> tuple[list[dict], str]:
    """The learning curve of the evaluator's table and pair over `prior`; writes learning_curve.json and .md into
    `out`. `drop_seen`: leave out the table's prompts that the prior trained on. `reuse`: an earlier run's rows in
    `out`, when it had the same data (by sha256), prior, pair, sizes and draws."""
    import json

    from ..manifest import sha256_file

    key = {
        "data": evaluator.data,
        "data_sha256": sha256_file(Path(evaluator.data)),
        "prior": str(prior),
        "strong": evaluator.strong,
        "weak": evaluator.weak,
        "sizes": sizes,
        "draws": draws,
        "drop_seen": drop_seen,
    }
    saved = Path(out) / "learning_curve.json"
    if reuse and saved.is_file():
        earlier = json.loads(saved.read_text())
        if earlier.get("key") == key:
            return earlier["rows"], markdown(earlier["rows"], earlier["title"])

    with step(f"scoring {evaluator.name} with the prior"):
        bench = evaluator.bench
        dropped = 0
        if drop_seen:
            kept = unseen(bench, prior)
            dropped, bench = len(bench) - len(kept), kept
        t = prepare(Path(prior), bench)
    rows = curve(t, sizes, draws)
    if not rows:
        raise DataError(f"{evaluator.data}: every size asked for is above the {len(t.bench)} prompts' training pool")
    title = f"{evaluator.name}: {evaluator.weak} vs {evaluator.strong}, prior {Path(prior).name}" + (
        f", {dropped} prompts it trained on dropped" if drop_seen else ""
    )
    text = markdown(rows, title)
    Path(out).mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps({"key": key, "title": title, "rows": rows}, indent=2) + "\n")
    (Path(out) / "learning_curve.md").write_text(text + "\n")
    return rows, text
