"""MLflow set-up: a local sqlite store in the working directory unless MLFLOW_TRACKING_URI says otherwise; experiments
marked as model training, so MLflow 3 shows their runs table rather than its GenAI (traces) view."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_EXPERIMENT = "learned-router"
KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"  # the UI's "Machine learning" kind
UI = "http://127.0.0.1:5000"  # where `mlflow ui` listens


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def start_run(experiment: str, run_name: str | None):
    """A run in `experiment`, created as a model-training experiment when new (an experiment kind set by hand stays)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    exp = mlflow.set_experiment(experiment)
    if KIND_TAG not in exp.tags:
        mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, KIND_TAG, MODEL_TRAINING)
    return mlflow.start_run(run_name=run_name)


def run_link(run) -> str:
    """How to see a run's metrics: its page in the MLflow UI's model-training view, behind `mlflow ui` for a local
    store."""
    uri = tracking_uri()
    page = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/model-metrics?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {uri}, then {UI}/{page}"


def name_key(name: str) -> str:
    return name.replace(" ", "_")


def log_eval(params: dict, report: dict, out: Path) -> None:
    """An `eval` run's figures in the active run: per scorer its APGR, CPT, saving and AUC, the ends of its
    intervals, and the output folder as artifacts."""
    import mlflow

    m = report["scorers"]
    mlflow.log_params(params | {"prompts": report["n_prompts"]})
    mlflow.log_metrics(
        {
            f"{k}_{name_key(n)}": v
            for n, s in m.items()
            for k, v in s.items()
            if k in ("apgr", "apgr_routellm", "cpt50", "cpt80", "cost_saving", "roc_auc") and v is not None
        }
        | {
            f"{k}_{end}_{name_key(n)}": v[i]
            for n, s in m.items()
            for k, v in s.items()
            if k in ("apgr_ci", "lead_ci") and None not in v
            for i, end in enumerate(("low", "high"))
        }
    )
    mlflow.log_artifacts(str(out))


def log_tier_eval(params: dict, report: dict, out: Path) -> None:
    """A tier evaluation's figures in the active run: each policy's cost and quality at the best single model's."""
    import mlflow

    mlflow.log_params(params | {"prompts": report["n_prompts"]})
    mlflow.log_metrics(
        {f"{k}_{n.split(' ')[0]}": v for n, m in report["scorers"].items() for k, v in m.items() if v is not None}
    )
    mlflow.log_artifacts(str(out))


def log_learning_curve(params: dict, rows: list[dict], out: Path) -> None:
    """A learning curve in the active run: each method's APGR, stepped by the training size."""
    import mlflow

    mlflow.log_params(params)
    for r in rows:
        mlflow.log_metrics(
            {f"apgr_{name_key(m)}": v["apgr"] for m, v in r.items() if isinstance(v, dict)}, step=r["size"]
        )
    mlflow.log_artifacts(str(out))
