"""The training pipeline: graded answers -> embeddings -> quality model -> export, logged to MLflow."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .data import Grades, load_grades
from .embed import Encoder
from .evaluator import RoutingEvaluator
from .errors import DataError
from .export import export_into, staged_folder
from .manifest import Calibration, EncoderInfo, Manifest, RouterFolder, TrainingRecord
from .model import QualityModel, auc, fit_head, observation_weights
from .progress import no_library_bars, step
from .recipe import Recipe
from .tracking import DEFAULT_EXPERIMENT, start_run

log = logging.getLogger(__name__)


def numbered(prints: list[dict]) -> list[tuple[dict, int]]:
    """Each data fingerprint with how many files of its source name came before it (0: the first)."""
    seen: dict[str, int] = {}
    out = []
    for p in prints:
        out.append((p, seen.get(p["name"], 0)))
        seen[p["name"]] = seen.get(p["name"], 0) + 1
    return out


def encoder_for(recipe: Recipe, device: str = "cpu") -> Encoder:
    return Encoder(recipe.encoder, recipe.max_seq_length, recipe.encoder_layers, device)


def indexed(obs: pd.DataFrame, models: list[str], sources: list[str]) -> tuple[list[str], dict[str, np.ndarray]]:
    """The observations' distinct prompts, and their int arrays prompt (a row of those), model, opponent (0 for
    absolute rows), source, and float grade: what `QualityHead.grade_logits` and `fit_head` take."""
    prompts = pd.unique(obs["prompt"])
    row = pd.Series(np.arange(len(prompts)), index=prompts)
    col = {m: i for i, m in enumerate(models)}
    return list(prompts), {
        "prompt": row[obs["prompt"]].to_numpy(),
        "model": obs["model"].map(col).to_numpy(),
        "opponent": obs["opponent"].map(lambda m: col.get(m, 0)).to_numpy(),
        "source": obs["source"].map({s: i for i, s in enumerate(sources)}).to_numpy(),
        "grade": obs["grade"].to_numpy(float),
    }


def fit(grades: Grades, enc: Encoder, recipe: Recipe, on_step=lambda step, loss: None) -> QualityModel:
    """The recipe's quality model on the observations of `grades`' train split."""
    obs = grades.only("train")
    if obs.empty:
        raise DataError("no training observations left")
    models = sorted(set(obs["model"]) | set(obs["opponent"].dropna()))
    sources = sorted(obs["source"].unique())
    schemes = [obs.loc[obs["source"] == s, "scheme"].iloc[0] for s in sources]
    weight_of = {s.name: s.weight for s in grades.sources}
    prompts, arrays = indexed(obs, models, sources)
    arrays["weight"] = observation_weights(
        arrays["source"], arrays["prompt"], obs["source"].map(weight_of).to_numpy(float), recipe.source_balance
    )
    x = enc.features(prompts, recipe.length_input)
    return QualityModel(enc, fit_head(x, arrays, models, sources, schemes, recipe, on_step), recipe.strong)


def test_metrics(model: QualityModel, grades: Grades) -> dict[str, float]:
    """Per source on the test split: ROC-AUC of the predicted grade against "the answer passed" (an absolute grade >=
    0.5, a won comparison; ties and mid grades left out), with the source's own link and offsets."""
    import torch

    head = model.head
    obs = grades.only("test")
    obs = obs[
        obs["source"].isin(head.cfg.sources)
        & obs["model"].isin(head.cfg.models)
        & (obs["opponent"].isna() | obs["opponent"].isin(head.cfg.models))
    ]
    if obs.empty:
        return {}
    prompts, arrays = indexed(obs, head.cfg.models, head.cfg.sources)
    x = torch.from_numpy(model.features(prompts).astype(np.float32))
    t = {k: torch.tensor(arrays[k], dtype=torch.int64) for k in ("prompt", "model", "opponent", "source")}
    with torch.no_grad():
        logits = head.grade_logits(x, t["prompt"], t["model"], t["opponent"], t["source"]).numpy()
    out = {}
    for name, idx in obs.groupby("source").indices.items():
        g = obs["grade"].to_numpy()[idx]
        clear = g != 0.5
        out[f"test_auc_{name}"] = auc(g[clear] > 0.5, logits[idx][clear])
    return {k: v for k, v in out.items() if v == v}


def calibrate(model: QualityModel, grades: Grades, recipe: Recipe) -> Calibration:
    """Each output's pass chances at the calibration shares, on the held-out prompts of the calibration sources (all
    held-out prompts when those are fewer than 50)."""
    held = grades.obs[grades.obs["split"] != "train"]
    mix = held[held["source"].isin(recipe.calibration)]
    what = f"held-out prompts of {', '.join(sorted(mix['source'].unique()))}"
    if mix["prompt"].nunique() < 50:
        mix, what = held, "held-out prompts of every source"
    prompts = list(pd.unique(mix["prompt"]))
    if not prompts:
        raise DataError("no held-out prompts to calibrate on: raise --val")
    outputs = model.predict(prompts)
    return Calibration.of(outputs.pass_chances(), outputs.names, what)


def evaluate(
    model: QualityModel, grades: Grades, recipe: Recipe, evaluators: Sequence[RoutingEvaluator]
) -> dict[str, float]:
    """The figures of each evaluator on the model, without the data's prompts, and of the pair's test prompts."""
    test = graded_pair(grades, "test", recipe.weak, recipe.strong)
    own = RoutingEvaluator(
        "test_pair",
        test["prompt"].tolist(),
        test["weak"].to_numpy(),
        test["strong"].to_numpy(),
        recipe.weak,
        recipe.strong,
    )
    own = [own] if own.problem() is None else []
    seen = set(grades.obs["group"])
    return {k: v for e in [*own, *(e.without(seen) for e in evaluators)] for k, v in e(model).items()}


def graded_pair(grades: Grades, split: str, weak: str, strong: str) -> pd.DataFrame:
    """The split's prompts with absolute grades of both models: columns prompt, weak, strong (mean grades)."""
    obs = grades.obs[
        (grades.obs["split"] == split) & grades.obs["opponent"].isna() & grades.obs["model"].isin([weak, strong])
    ]
    wide = (
        obs.pivot_table(index="prompt", columns="model", values="grade", aggfunc="mean")
        .reindex(columns=[weak, strong])
        .dropna()
    )
    return pd.DataFrame(
        {"prompt": wide.index, "weak": wide[weak].to_numpy(float), "strong": wide[strong].to_numpy(float)}
    )


def warnings_for(grades: Grades, recipe: Recipe) -> list[str]:
    """What makes a router from this data unreliable, each with what to do: too few prompts, too small a test split,
    reference or calibration sources absent from the data."""
    sources = {s.name for s in grades.sources}
    split = grades.obs.drop_duplicates("prompt")["split"].value_counts()
    out = []
    if (n := int(split.sum())) < 1000:
        out.append(
            f"only {n:,} prompts: the quality model is fitted for many models and sources; to route your own pair "
            f"on them, fit them over a trained router instead: train --prior models/default --data ..."
        )
    if int(split.get("test", 0)) < 30:
        out.append(f"{int(split.get('test', 0))} test prompts: the test AUCs are noise; add prompts or raise --test")
    if not sources & set(recipe.reference):
        out.append(
            f"--reference {','.join(recipe.reference)} is not among the data's sources ({', '.join(sorted(sources))}): "
            f"the exported quality takes every absolute source's mean link; name yours with --reference"
        )
    if not sources & set(recipe.calibration):
        out.append(
            f"no --calibration source is in the data: the calibration mix is every held-out prompt "
            f"({int(split.get('val', 0) + split.get('test', 0))}); name yours with --calibration"
        )
    return out


def train(
    data: list[str],
    out: Path,
    recipe: Recipe | None = None,
    weights: dict[str, float] | None = None,
    variants: list[str] = ("fp32", "int8"),
    name: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    overwrite: bool = False,
    device: str = "cpu",
    evaluators: Sequence[RoutingEvaluator] = (),
) -> tuple[Manifest, str]:
    """Train, export and log one router; returns its manifest and the MLflow run id. `device` embeds the prompts
    (auto, cpu or cuda); the embedding cache does not depend on it. Each of `evaluators` scores the fitted model
    without the prompts of `data`, beside the pair's own held-out test prompts (`test_pair`, when there are enough)."""
    import mlflow

    recipe = recipe or Recipe()
    with step(f"reading {len(data)} data file{'s' * (len(data) > 1)}"):
        grades = load_grades(data, weights, recipe.val, recipe.test, recipe.seed, recipe.max_prompts)
    for role in ("strong", "weak"):
        if getattr(recipe, role) not in grades.models:
            raise DataError(
                f"--{role} {getattr(recipe, role)!r} is graded in none of the --data files; models there "
                f"include {', '.join(grades.models[:12])} ... ({len(grades.models)} in all)"
            )
    for line in warnings_for(grades, recipe):
        log.warning(line)
    enc = encoder_for(recipe, device)
    name = name or Path(out).name
    prints = [s.fingerprint() for s in grades.sources]
    with staged_folder(Path(out), overwrite) as tmp, start_run(experiment, name) as run:
        folder = RouterFolder(tmp)
        mlflow.log_params(
            {
                **{k: (",".join(v) if isinstance(v, list) else v) for k, v in recipe.to_dict().items()},
                "encoder_fingerprint": enc.fingerprint[:16],
                "variants": ",".join(variants),
                **{f"data_{p['name']}{f'_{i}' if i else ''}_sha256": p["sha256"][:16] for p, i in numbered(prints)},
                **{f"weight_{p['name']}": p["weight"] for p in prints},
            }
        )
        mlflow.log_dict({"sources": prints}, "data_fingerprints.json")
        counts = grades.obs.groupby(["source", "split"])["prompt"].nunique().unstack(fill_value=0)
        mlflow.log_text(counts.to_string(), "split_counts.txt")

        with step("fitting the quality model", total=recipe.steps) as bar:

            def log_step(i, loss):
                bar.advance()
                if i % 10 == 0 or i == recipe.steps - 1:
                    mlflow.log_metric("train_loss", loss, step=i)

            model = fit(grades, enc, recipe, log_step)
        folder.checkpoint.mkdir()
        model.save(folder.checkpoint)
        with step("calibrating and testing on the held-out prompts"):
            calibration = calibrate(model, grades, recipe)
            default = round(calibration.threshold_for(recipe.default_strong_fraction, recipe.weak), 4)
            split = grades.obs.drop_duplicates("prompt")["split"].value_counts()
            metrics = {
                **test_metrics(model, grades),
                "models": len(model.head.cfg.models),
                **{f"{s}_prompts": int(split.get(s, 0)) for s in ("train", "val", "test")},
            }
        with step(f"routing figures on {len(evaluators) + 1} graded sets"):
            metrics |= evaluate(model, grades, recipe, evaluators)
        speed = {
            "embedded_prompts": enc.embedded,
            "embedding_prompts_per_s": enc.embedded / enc.seconds if enc.seconds else 0.0,
        }
        record = TrainingRecord(
            name=name,
            recipe=recipe.to_dict(),
            data=prints,
            encoder_path=recipe.encoder,
            encoder=EncoderInfo(
                name=enc.name,
                max_seq_length=enc.max_seq_length,
                dim=enc.dim,
                layers=enc.layers,
                fingerprint=enc.fingerprint,
            ),
            strong=recipe.strong,
            weak=recipe.weak,
            default_threshold=default,
            calibration=calibration,
            metrics=metrics,
        )
        folder.write_record(record)
        probes = grades.obs.loc[grades.obs["split"] == "val", "prompt"].drop_duplicates().head(256).tolist()
        with step(f"exporting to ONNX ({', '.join(variants)}) and checking parity"), no_library_bars():
            manifest = export_into(
                folder, list(variants), probes, graded_pair(grades, "val", recipe.weak, recipe.strong)
            )
        # metrics: the test AUCs (beside the loss curve), what runs are compared by; params: counts and the export's
        # parity, a gate it passed (the UI charts every metric, and a count charted as a bar says nothing)
        facts = {**metrics, **{f"parity_{k}": v for k, v in manifest.parity.items()}}
        mlflow.log_metrics({k: v for k, v in facts.items() if k.startswith(("test_auc_", "test_pair_", "eval_"))})
        mlflow.log_params(
            {
                k: (int(v) if float(v).is_integer() else f"{v:.4g}")
                for k, v in (facts | speed).items()
                if not k.startswith(("test_auc_", "test_pair_", "eval_"))
            }
            | {"device": enc.device}
        )
        mlflow.log_dict(json.loads(manifest.model_dump_json()), "router.json")
    with step("logging the router folder to MLflow"):
        mlflow.MlflowClient().log_artifacts(run.info.run_id, str(out), artifact_path="router")
    return manifest, run.info.run_id
