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
