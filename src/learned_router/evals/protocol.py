"""The evaluation protocol: a graded benchmark, the router and baselines on the same unseen prompts, and the outputs.

Evaluations never score a prompt the router was trained on. When the benchmark's prompts (by text) are in the
router's training data, the router's recipe is retrained per fold of a k-fold cross-validation split by prompt
(or by category, e.g. MMLU subject) and every fold is scored by the head that never saw it; otherwise the shipped
ONNX router scores the benchmark directly. kNN and logistic regression are fit on exactly the rows the router's
head was fit on, over the same embeddings.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..data import group_of, label_long, load_pair_map, load_source, source_ids
from ..errors import DataError, RouterError
from .baselines import knn_scores, logistic_scores, prompt_length_scores
from .plots import plot_frontier
from .report import LEVEL, RESAMPLES, evaluate, markdown_table

BASELINES = ("prompt length", "kNN", "logistic")


@dataclass
class Prices:
    """USD per 1M input/output tokens, per model; calls are costed at chars/4 input and a fixed output length."""

    per_model: dict[str, tuple[float, float]] = field(default_factory=dict)
    output_tokens: int = 256

    @classmethod
    def load(cls, path: Path | None) -> "Prices | None":
        import yaml

        if path is None:
            return None
        if not Path(path).is_file():
            raise DataError(f"{path}: no such file")
        raw = yaml.safe_load(Path(path).read_text()) or {}
        models = raw.get("models")
        if not isinstance(models, dict):
            raise DataError(f"{path}: expected 'models: {{name: {{input_per_1m: X, output_per_1m: Y}}}}'")
        per_model = {}
        for name, p in models.items():
            try:
                per_model[name] = (float(p["input_per_1m"]), float(p["output_per_1m"]))
            except (TypeError, KeyError, ValueError):
                raise DataError(f"{path}: models.{name}: needs numbers input_per_1m and output_per_1m") from None
        return cls(per_model, int(raw.get("output_tokens", 256)))

    def cost(self, model: str, prompts: pd.Series) -> np.ndarray:
        if model not in self.per_model:
            raise DataError(f"no price for model '{model}'; priced models: {', '.join(sorted(self.per_model))}")
        p_in, p_out = self.per_model[model]
        return (prompts.str.len().to_numpy() / 4 * p_in + self.output_tokens * p_out) / 1e6


def load_benchmark(path: Path, strong: str, weak: str, policy, pair_map: dict, keep_contaminated: bool = False) -> pd.DataFrame:
    """One row per prompt: the first turn (what the router sees), and the pair's scores, each the mean of its turns."""
    src = load_source(path)
    if src.fmt != "long":
        raise DataError(f"{path}: an evaluation needs graded answers (columns prompt_id, prompt, model, score); "
                        f"this file has the '{src.fmt}' shape")
    df = label_long(src, strong, weak, policy, pair_map)
    if "contaminated" in df.columns and not keep_contaminated:
        df = df[~df["contaminated"].fillna(False).astype(bool)]
    if df.empty:
        raise DataError(f"{path}: no prompt left to evaluate after dropping contaminated prompts")
    return df.assign(group=df["prompt"].map(group_of), source=src.name).reset_index(drop=True)


def folds_of(keys: pd.Series, k: int, seed: int = 0) -> np.ndarray:
    return keys.map(lambda g: int(hashlib.sha1(f"fold{seed}:{g}".encode()).hexdigest()[:8], 16) % k).to_numpy()


def cross_validate(bench: pd.DataFrame, train_df: pd.DataFrame, spec, enc, folds: int, by: str) -> dict[str, np.ndarray]:
    """p_weak of the router recipe and the learned baselines for every benchmark prompt, each from the fold's models."""
    from ..model import fit_head

    keys = bench["category"].fillna("") if by == "category" else bench["group"]
    fold = folds_of(keys, folds)
    if len(np.unique(fold)) < 2:
        raise DataError(f"cross-validation needs at least 2 non-empty folds; '{by}' gave {len(np.unique(fold))}")
    h_bench = enc.features(bench["prompt"].tolist(), spec.head.length_input, progress=False)
    h_train = enc.features(train_df["prompt"].tolist(), spec.head.length_input, progress=False)
    x_bench, x_train = h_bench[:, :enc.dim], h_train[:, :enc.dim]  # the baselines see the embeddings only
    b_bench, b_train = enc.bags(bench["prompt"].tolist()), enc.bags(train_df["prompt"].tolist())
    src = source_ids(train_df)
    y, t, w = train_df["label"].to_numpy(), train_df["target"].to_numpy(), train_df["weight"].to_numpy(float)
    out = {name: np.empty(len(bench)) for name in ("router", "kNN", "logistic")}
    for f in np.unique(fold):
        held = np.flatnonzero(fold == f)
        keep = ~train_df["group"].isin(set(bench["group"].iloc[held])).to_numpy()
        fit_rows = np.flatnonzero(keep & (train_df["split"] != "val").to_numpy())
        val_rows = np.flatnonzero(keep & (train_df["split"] == "val").to_numpy())
        head, _ = fit_head(spec.head, h_train[fit_rows], t[fit_rows], w[fit_rows], h_train[val_rows], y[val_rows], spec.fit,
                           sources=(src[fit_rows], src[val_rows]), bags=(b_train[fit_rows], b_train[val_rows]))
        out["router"][held] = head.predict(h_bench[held], b_bench[held])
        out["kNN"][held] = 1 - knn_scores(x_train[fit_rows], y[fit_rows], x_bench[held], sample_weight=w[fit_rows])
        out["logistic"][held] = 1 - logistic_scores(x_train[fit_rows], y[fit_rows], x_bench[held], sample_weight=w[fit_rows])
    return out


def direct(bench: pd.DataFrame, train_df: pd.DataFrame, router, enc) -> dict[str, np.ndarray]:
    """The shipped router on a benchmark it never saw; baselines fit on the rows its head was fit on."""
    rows = np.flatnonzero((train_df["split"] == "train").to_numpy())
    x_train = enc.embed(train_df["prompt"].iloc[rows].tolist(), progress=False)
    x_bench = enc.embed(bench["prompt"].tolist(), progress=False)
    y, w = train_df["label"].to_numpy()[rows], train_df["weight"].to_numpy(float)[rows]
    return {"router": router.score(bench["prompt"].tolist()),
            "kNN": 1 - knn_scores(x_train, y, x_bench, sample_weight=w),
            "logistic": 1 - logistic_scores(x_train, y, x_bench, sample_weight=w)}


@dataclass
class EvalResult:
    report: dict
    protocol: str
    n_prompts: int
    not_beaten: list[str]


def run_eval(router_dir: Path, data: Path, strong: str, weak: str, out: Path, prices: Path | None = None,
             folds: int = 5, by: str = "prompt", data_dir: Path | None = None, name: str | None = None) -> EvalResult:
    """Evaluate a router folder on a graded benchmark; writes metrics.json, frontier.png and table.md into `out`."""
    from ..embed import Encoder
    from ..export import TRAINING_FILE
    from ..manifest import read_manifest
    from ..scorer import Router
    from ..train import load_data, spec_from

    if by not in ("prompt", "category"):
        raise RouterError(f"--by must be 'prompt' or 'category', got {by!r}")
    if folds < 2:
        raise RouterError(f"--folds must be at least 2, got {folds}")
    manifest = read_manifest(router_dir)
    info_path = Path(router_dir) / "checkpoint" / TRAINING_FILE
    if not info_path.is_file():
        raise RouterError(f"{router_dir}: no checkpoint/{TRAINING_FILE}; eval needs the router's training record")
    spec = spec_from(json.loads(info_path.read_text()))
    enc = Encoder(spec.encoder, manifest.encoder.max_seq_length, manifest.encoder.layers)  # the base encoder: baselines and the recipe use it
    finetuned = (Path(router_dir) / "checkpoint" / "encoder").is_dir()
    if not finetuned and enc.fingerprint != manifest.encoder.fingerprint:
        raise RouterError(f"{router_dir} was trained on another encoder (weights sha256 {manifest.encoder.fingerprint[:12]}…) "
                          f"than {enc.path} ({enc.fingerprint[:12]}…)")
    if data_dir:  # the training files, found by name in another folder
        spec.data = [str(Path(data_dir) / Path(p).name) for p in spec.data]
    missing = [p for p in spec.data if not Path(p).is_file()]
    if missing:
        raise RouterError(f"the router's training data is needed to keep evaluation prompts unseen and to fit the "
                          f"baselines, but {', '.join(missing)} is missing; pass --data-dir with those files")
    pair_map = load_pair_map(spec.pair_map)
    bench = load_benchmark(data, strong, weak, spec.policy, pair_map)
    train_df, _ = load_data(spec)
    seen = bench["group"].isin(set(train_df["group"]))
    if seen.any() and finetuned:
        raise RouterError(f"{router_dir} fine-tuned its encoder on {int(seen.sum())} of this benchmark's prompts, so no "
                          "fold would be unseen; evaluate it on a benchmark outside its training data")
    if seen.any():
        protocol = (f"{folds}-fold cross-validation by {by} ({int(seen.sum())} of {len(bench)} prompts are in the "
                    f"router's training data): the router's recipe and the baselines are refit per fold without the fold's prompts")
        p = cross_validate(bench, train_df, spec, enc, folds, by)
    else:
        protocol = "the shipped router on prompts it never saw; baselines fit on its training rows"
        p = direct(bench, train_df, Router(router_dir), enc)
    scores = {"router": 1 - p["router"], "prompt length": prompt_length_scores(bench["prompt"].tolist()),
              "kNN": 1 - p["kNN"], "logistic": 1 - p["logistic"]}
    costs = None
    priced = Prices.load(prices)
    if priced:
        costs = {"strong": priced.cost(strong, bench["prompt"]), "weak": priced.cost(weak, bench["prompt"])}
    report = evaluate(scores, bench["weak_score"].to_numpy(), bench["strong_score"].to_numpy(), cost_per_call=costs,
                      labels=bench["label"].to_numpy(), p_weak={k: p[k] for k in ("router", "kNN", "logistic")},
                      routellm_random=True, lead_of="router")
    mine = report["scorers"]["router"]["apgr"]
    not_beaten = [b for b in BASELINES if (report["scorers"][b]["apgr"] or 0) >= mine]
    report |= {"benchmark": name or Path(data).stem, "data": str(data), "strong": strong, "weak": weak,
               "router": str(router_dir), "protocol": protocol, "not_beaten": not_beaten}
    write_outputs(report, Path(out))
    return EvalResult(report, protocol, len(bench), not_beaten)


def thinned(curve: dict, most: int = 500) -> dict:
    """At most `most` of the curve's own points (ends kept), values rounded: metrics.json stays small on big benchmarks."""
    n = len(curve["strong_fraction"])
    keep = sorted(set(np.linspace(0, n - 1, min(n, most)).round().astype(int)))
    return {k: None if v is None else [None if v[i] is None else round(v[i], 6) for i in keep] for k, v in curve.items()}


def write_outputs(report: dict, out: Path) -> None:
    """metrics.json (curves thinned), frontier.png (full curves) and table.md."""
    out.mkdir(parents=True, exist_ok=True)
    plot_frontier(report, out / "frontier.png", benchmark=report["benchmark"], strong_model=report["strong"],
                  weak_model=report["weak"])
    light = {**report, "curves": {k: {kind: thinned(c) for kind, c in v.items()} for k, v in report["curves"].items()}}
    (out / "metrics.json").write_text(json.dumps(light, indent=1, allow_nan=False) + "\n")
    (out / "table.md").write_text(f"### {report['benchmark']}: {report['strong']} vs {report['weak']}\n\n"
                                  f"{report['n_prompts']} prompts; {report['protocol']}.\n\n{markdown_table(report)}\n\n{verdict(report)}\n")


def verdict(report: dict) -> str:
    """Whether the router beats each baseline on APGR, and which leads the bootstrap interval of the difference
    tells apart from resampling noise."""
    line = ("The router beats every non-oracle baseline on APGR." if not report["not_beaten"] else
            f"**The router does not beat {', '.join(report['not_beaten'])} on APGR here.**")
    side = {"ahead of": [], "behind": [], "not distinguishable from": []}
    for b in BASELINES:
        lo, hi = report["scorers"][b]["lead_ci"]  # None: undefined on this set
        side["ahead of" if (lo or 0) > 0 else "behind" if (hi or 0) < 0 else "not distinguishable from"].append(b)
    parts = [f"{k} {', '.join(v)}" for k, v in side.items() if v]
    return (f"{line} Beyond resampling noise (the {LEVEL:.0%} bootstrap interval of the APGR difference, paired over "
            f"{RESAMPLES} resamples of the prompts, excludes 0): {'; '.join(parts)}.")
