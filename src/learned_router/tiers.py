"""Multi-tier routers: one output per candidate model, P(that model's answer passes).

Trained on long tables where many models answered the same prompts (AlpacaEval: 56 models x 683 prompts). Each
grade in [0, 1] is the target probability that the answer passes: 0/1 for exact-match grades, the judge's
preference probability for AlpacaEval. A model with no grade for a prompt leaves that target out of the loss.
The tier policy that routes with it is `scorer.choose_tier`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .data import assign_splits, checked_scores, group_of, load_source
from .errors import DataError
from .model import FitConfig, HeadConfig, fit_head
from .tracking import DEFAULT_EXPERIMENT, start_run

DEFAULT_THRESHOLD = 0.5  # "more likely than not to pass": which tiers a service offers is its config's choice


@dataclass
class GradeTable:
    """Prompts x models: grades (NaN where a model has none) and answer lengths in characters (NaN: unknown)."""

    prompts: pd.DataFrame  # prompt, group, source, contaminated, category
    models: list[str]
    scores: np.ndarray
    output_chars: np.ndarray
    sources: list[dict]

    def columns(self, models: list[str]) -> list[int]:
        missing = [m for m in models if m not in self.models]
        if missing:
            raise DataError(f"model(s) {', '.join(missing)} not in the data; models there: {', '.join(self.models)}")
        return [self.models.index(m) for m in models]


def load_grades(paths: list[str], models: list[str] | None = None) -> GradeTable:
    """One row per prompt text, one column per model, from long tables (prompt, model, score [, output_chars])."""
    frames, prints, owner = [], [], {}
    for path in paths:
        src = load_source(path)
        if src.fmt != "long":
            raise DataError(f"{path}: a multi-tier router needs graded answers (columns prompt, model, score); "
                            f"this file has the '{src.fmt}' shape")
        t = src.table
        scores = checked_scores(src)
        for m in t["model"].astype(str).unique():
            if m in owner:
                raise DataError(f"model '{m}' is graded in both {owner[m]} and {path}: grades from different judges "
                                "cannot share an output; train on one of them")
            owner[m] = path
        frames.append(pd.DataFrame({
            "prompt": t["prompt"], "model": t["model"].astype(str), "score": scores, "source": src.name,
            "contaminated": t["contaminated"].fillna(False).astype(bool) if "contaminated" in t else False,
            "category": t["category"] if "category" in t else None,
            "output_chars": pd.to_numeric(t["output_chars"], errors="coerce") if "output_chars" in t else np.nan,
        }))
        prints.append(src.fingerprint())
    long = pd.concat(frames, ignore_index=True)
    names = sorted(long["model"].unique()) if models is None else list(models)
    missing = [m for m in names if m not in owner]
    if missing:
        raise DataError(f"model(s) {', '.join(missing)} not in the data; models there: {', '.join(sorted(owner))}")
    long = long[long["model"].isin(names)]
    prompts = (long.groupby("prompt", sort=True)
               .agg(source=("source", "first"), contaminated=("contaminated", "any"), category=("category", "first"))
               .reset_index())
    prompts["group"] = prompts["prompt"].map(group_of)
    row = pd.Series(np.arange(len(prompts)), index=prompts["prompt"])
    col = {m: j for j, m in enumerate(names)}
    scores = np.full((len(prompts), len(names)), np.nan, dtype=np.float32)
    chars = np.full_like(scores, np.nan)
    # one grade per (prompt, model): a repeated prompt text (or turn) counts as the mean of its grades
    per = long.groupby(["prompt", "model"]).agg(score=("score", "mean"), chars=("output_chars", "mean")).reset_index()
    i, j = row[per["prompt"]].to_numpy(), per["model"].map(col).to_numpy()
    scores[i, j], chars[i, j] = per["score"].to_numpy(), per["chars"].to_numpy()
    return GradeTable(prompts, names, scores, chars, prints)


@dataclass
class TierSpec:
    data: list[str]
    out: Path
    models: list[str] | None = None  # None: every model in the data
    encoder: str | None = None
    max_seq_length: int | None = None
    head: HeadConfig = field(default_factory=HeadConfig)  # its dim and outputs are set from the data
    fit: FitConfig = field(default_factory=lambda: FitConfig(batch_size=64))
    val: float = 0.1
    test: float = 0.1
    variants: list[str] = field(default_factory=lambda: ["fp32", "int8"])
    name: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    overwrite: bool = False


def tier_spec_from(info: dict, **changes) -> TierSpec:
    """The TierSpec recorded in a checkpoint's training.json (with `changes` applied)."""
    s = {**info["spec"], **changes}
    return TierSpec(**{**s, "out": Path(s["out"]), "head": HeadConfig(**s["head"]), "fit": FitConfig(**s["fit"])})


def fit_tiers(spec: TierSpec, x_fit: np.ndarray, y_fit: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, on_epoch=None):
    """The multi-output head of `spec` on these rows (early stopping on validation loss)."""
    kw = {"on_epoch": on_epoch} if on_epoch else {}
    return fit_head(spec.head, x_fit, y_fit, np.ones(len(x_fit)), x_val, y_val, spec.fit, **kw)


def splits(table: GradeTable, spec: TierSpec) -> np.ndarray:
    """By prompt text; contaminated prompts only ever train."""
    split = assign_splits(table.prompts["group"], spec.val, spec.test, spec.fit.seed)
    split = np.where(table.prompts["contaminated"].to_numpy() & (split != "train"), "train", split)
    for part in ("train", "val"):
        if not (split == part).any():
            raise DataError(f"the {part} split is empty ({len(split)} prompts): add data or change --val/--test")
    return split


def test_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Mean over models of ROC-AUC (label: grade >= 0.5) and of the absolute error of the predicted pass chance."""
    from .model import auc

    aucs = [auc(y[k, j] >= 0.5, p[k, j]) for j in range(y.shape[1]) if (k := ~np.isnan(y[:, j])).any()]
    aucs = [a for a in aucs if a == a]
    return {"test_auc_mean": float(np.mean(aucs)) if aucs else float("nan"),
            "test_mae": float(np.nanmean(np.abs(p - y)))}


def train_tiers(spec: TierSpec):
    """Train, export and log a multi-tier router; returns its manifest and the MLflow run id."""
    import mlflow

    from .embed import Encoder
    from .export import TRAINING_FILE, export_into, staged_folder
    from .model import write_json

    table = load_grades(spec.data, spec.models)
    split = splits(table, spec)
    enc = Encoder(spec.encoder, spec.max_seq_length)
    name = spec.name or Path(spec.out).name
    with staged_folder(Path(spec.out), spec.overwrite) as folder, start_run(spec.experiment, name) as run:
        mlflow.log_params({
            "kind": "tiers", "models": len(table.models), "encoder": enc.name, "encoder_fingerprint": enc.fingerprint[:16],
            "val": spec.val, "test": spec.test,
            **{f"head_{k}": v for k, v in asdict(spec.head).items() if k in ("hidden", "dropout")},
            **{f"fit_{k}": v for k, v in asdict(spec.fit).items()},
            **{f"data_{p['name']}_sha256": p["sha256"][:16] for p in table.sources},
        })
        mlflow.log_dict({"sources": table.sources, "models": table.models}, "data_fingerprints.json")
        x = enc.features(table.prompts["prompt"].tolist(), spec.head.length_input)
        parts = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
        y = table.scores
        head, fit = fit_tiers(spec, x[parts["train"]], y[parts["train"]], x[parts["val"]], y[parts["val"]],
                              on_epoch=lambda epoch, m: mlflow.log_metrics(m, step=epoch))
        p = head.predict(x)
        metrics = {**fit, **(test_metrics(y[parts["test"]], p[parts["test"]]) if len(parts["test"]) else {}),
                   **{f"{s}_prompts": len(v) for s, v in parts.items()}}
        metrics = {k: float(v) for k, v in metrics.items() if v == v}
        checkpoint = folder / "checkpoint"
        checkpoint.mkdir()
        head.save(checkpoint)
        write_json(checkpoint / TRAINING_FILE, {
            "name": name, "kind": "tiers", "models": table.models,
            "encoder": {"name": enc.name, "path": spec.encoder, "max_seq_length": enc.max_seq_length, "dim": enc.dim,
                        "fingerprint": enc.fingerprint},
            "default_threshold": DEFAULT_THRESHOLD, "data": table.sources, "metrics": metrics,
            "spec": {**asdict(spec), "out": str(spec.out)},
        })
        probes = table.prompts["prompt"].iloc[parts["val"][:256]].tolist()
        manifest = export_into(folder, checkpoint, spec.variants, probes=probes)
        mlflow.log_metrics({**metrics, **{f"parity_{k}": v for k, v in manifest.parity.items()}})
        mlflow.log_dict(json.loads(manifest.model_dump_json()), "router.json")
    mlflow.MlflowClient().log_artifacts(run.info.run_id, str(spec.out), artifact_path="router")
    return manifest, run.info.run_id
