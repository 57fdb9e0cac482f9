"""MLflow set-up: a local sqlite store in the working directory unless MLFLOW_TRACKING_URI says otherwise."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_EXPERIMENT = "learned-router"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def start_run(experiment: str, run_name: str | None):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment)
    return mlflow.start_run(run_name=run_name)
