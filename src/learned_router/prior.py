"""`train --prior`: a router folder in service as the prior, the user's own grades fitted on top (residual.py).

The prior's ONNX graph scores the user's prompts once (quality, difficulty and embedding, no torch); the top level
is fitted on those outputs and the grades, and the new folder is the prior's graph and tokenizer with residual.npz
beside them. Models the prior does not know get outputs of their own; models the user's data does not grade stay
exactly the prior's.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import residual as top
from .data import grade_table, load_grades
from .evaluator import RoutingEvaluator
from .errors import DataError, RouterError
from .export import staged_folder, versions
from .manifest import Calibration, Manifest, ResidualInfo, RouterFolder
from .outputs import Outputs
from .progress import step
from .tasktypes import FILE as TYPES_FILE
from .tracking import DEFAULT_EXPERIMENT, start_run


def prior_outputs(router, prompts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The prior graph's (quality, difficulty, embedding) on the prompts, its own residual left out."""
    if not router.has_embedding:
        raise RouterError(
            f"{router.path}: its graph has no embedding output; re-export it (learned-router export) to "
            "use it as a prior"
        )
    out = []
    with step(f"scoring {len(prompts):,} prompts with the prior", total=len(prompts)) as bar:
        for i in range(0, len(prompts), 256):
            out.append(router.graph(prompts[i : i + 256]))
            bar.advance(len(out[-1][0]))
    return tuple(np.concatenate(parts) for parts in zip(*out))


def fit_on_prior(
    router,
    prompts: list[str],
    grades: np.ndarray,
    models: list[str],
    strong: str,
    weak: str,
    seed: int = 0,
) -> tuple[top.Residual, Outputs]:
    """The top level over `router` (a prior Router) for the prompts' grades (prompts x models, NaN where ungraded),
    and the prior graph's outputs on the prompts (pass chances against `strong`) that it corrects."""
    quality, difficulty, emb = prior_outputs(router, prompts)
    base, names = top.bases(quality, difficulty, router.graph_models, models)
    pair = (models.index(weak), models.index(strong)) if weak in models and strong in models else None
    with step("choosing the top level by 5-fold cross-validation"):
        fitted = top.fit(base, top.log_length(prompts), emb, grades, models, names, pair, seed)
    return fitted, Outputs(tuple(router.graph_models), strong, quality, difficulty, emb)


def version_of(folder: RouterFolder) -> str:
    return hashlib.sha256(folder.manifest_path.read_bytes()).hexdigest()[:12]


def train_on_prior(
    prior: Path,
    data: list[str],
    out: Path,
    strong: str | None = None,
    weak: str | None = None,
    strong_fraction: float = 0.5,
    name: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    overwrite: bool = False,
    seed: int = 0,
    evaluators: Sequence[RoutingEvaluator] = (),
) -> tuple[Manifest, str]:
    """Fit the top level on `data` over the router folder `prior` and write the two-level router to `out`. Each of
    `evaluators` scores the written router without the prompts of `data`."""
    import mlflow

    from .scorer import Router

    base_router = Router(prior)
    if base_router.manifest.residual is not None:
        raise RouterError(
            f"{prior}: already a two-level router (prior {base_router.manifest.residual.prior}); use its prior"
        )
    with step(f"reading {len(data)} data file{'s' * (len(data) > 1)}"):
        grades_all = load_grades(data, val=0.0, test=0.0, seed=seed)
    table = grade_table(grades_all.obs)
    models = list(table.columns)
    m = base_router.manifest
    strong, weak = strong or m.strong, weak or m.weak
    outputs = list(m.models) + [x for x in models if x not in m.models]
    for role, model in (("strong", strong), ("weak", weak)):
        if model not in outputs:
            raise DataError(
                f"--{role} {model!r} is neither graded in --data nor known to the prior; graded: "
                f"{', '.join(models[:12])}"
            )
    if strong == weak:
        raise DataError(f"--strong and --weak name the same model {strong!r}")
    prompts = list(table.index)
    fitted, graph_outputs = fit_on_prior(base_router, prompts, table.to_numpy(np.float32), models, strong, weak, seed)
    prints = [s.fingerprint() for s in grades_all.sources]
    name = name or Path(out).name
    prior_folder = RouterFolder(prior)
    with staged_folder(Path(out), overwrite) as tmp, start_run(experiment, name) as run:
        folder = RouterFolder(tmp)
        keep = [e.path for k, e in m.files.items()] + (
            [TYPES_FILE] if (prior_folder.path / TYPES_FILE).is_file() else []
        )
        for f in keep:
            shutil.copyfile(prior_folder.path / f, folder.path / f)
        fitted.save(folder.path)
        info = ResidualInfo(
            prior=f"{m.name}@{version_of(prior_folder)}",
            prior_path=str(prior),
            graph_models=list(m.models),
            models=fitted.models,
            base=fitted.base,
            prompts=len(prompts),
            use_base=fitted.choice.use_base,
            ridge=fitted.choice.ridge,
            width=fitted.choice.width,
            shrink=fitted.choice.shrink,
            objective=fitted.choice.objective,
            tried=fitted.choice.tried,
        )
        manifest = m.model_copy(
            update={
                "name": name,
                "models": outputs,
                "strong": strong,
                "weak": weak,
                "residual": info,
                "data": prints,
                "files": m.files | {"residual": folder.entry(top.FILE)},
                "versions": versions(),
                "metrics": {},
                "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            }
        )
        folder.write_manifest(manifest)
        calibration = Calibration.of(  # the written router's pass chances: the same graph, its top level on top
            fitted.apply(graph_outputs, prompts, outputs).pass_chances(),
            manifest.outputs,
            f"the {len(prompts)} prompts of {', '.join(s['name'] for s in prints)}",
        )
        manifest.calibration = calibration
        manifest.default_threshold = round(calibration.threshold_for(strong_fraction, weak), 4)
        if evaluators:
            with step(f"routing figures on {len(evaluators)} graded sets"):
                seen = set(grades_all.obs["group"])
                written = Router(folder.path)
                manifest.metrics = {k: v for e in evaluators for k, v in e.without(seen)(written).items()}
            mlflow.log_metrics(manifest.metrics)
        folder.write_manifest(manifest)
        mlflow.log_params(
            {
                "prior": info.prior,
                "prompts": len(prompts),
                "graded_models": ",".join(models)[:500],
                "strong": strong,
                "weak": weak,
                "use_base": fitted.choice.use_base,
                "ridge": fitted.choice.ridge,
                "width": fitted.choice.width,
                "shrink": fitted.choice.shrink,
                "objective": fitted.choice.objective,
                **{f"data_{p['name']}_sha256": p["sha256"][:16] for p in prints},
            }
        )
        mlflow.log_metrics(
            {
                "cv_" + k.replace("=", "_").replace(" ", "_").replace(".", "p"): v
                for k, v in fitted.choice.tried.items()
                if v == v
            }
        )
        mlflow.log_dict(json.loads(manifest.model_dump_json()), "router.json")
    mlflow.MlflowClient().log_artifacts(run.info.run_id, str(out), artifact_path="router")
    return manifest, run.info.run_id
