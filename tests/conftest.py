"""Shared fixtures: the real shared datasets, one MLflow server per session, one small router trained on real data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from learned_router.tools.inprocess import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
STRONG, WEAK = "gpt-4-1106-preview", "mistralai/Mixtral-8x7B-Instruct-v0.1"
_server: dict = {}


SLOW_FIXTURES = {"trained", "mlflow_server"}  # they train a router or wait for `mlflow server`


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    """A test that trains a router or needs the MLflow server is `slow`, as are those marked so:
    `pytest -m "not slow"` is the quick loop."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_collection_finish(session):
    """Boot `mlflow server` as soon as the tests are collected, when any of them needs it (its sqlite migrations take
    about a minute, while the fast tests run); `pytest tests/test_prices.py` starts none."""
    if any("mlflow_server" in getattr(item, "fixturenames", ()) for item in session.items):
        start_mlflow()


def start_mlflow() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="mlflow-server-"))
    port = free_port()
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp / 'mlflow.db'}",
            "--artifacts-destination",
            str(tmp / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no job runner processes: no test uses them
    )
    _server.update(proc=proc, url=f"http://127.0.0.1:{port}", log=tmp / "server.log", dir=tmp)


def pytest_sessionfinish(session, exitstatus):
    if _server:
        _server["proc"].terminate()
        _server["proc"].wait(timeout=30)
        shutil.rmtree(_server["dir"], ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server() -> str:
    if not _server:  # a test that asks for it by a route the collection did not see
        start_mlflow()
    deadline = time.time() + 240
    while time.time() < deadline:
        if _server["proc"].poll() is not None:
            pytest.fail(f"mlflow server exited: {_server['log'].read_text()[-2000:]}")
        try:
            if httpx.get(_server["url"] + "/health", timeout=2).status_code == 200:
                return _server["url"]
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"mlflow server did not answer /health in 240 s: {_server['log'].read_text()[-2000:]}")


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    assert DATASETS.is_dir(), f"the shared datasets are expected at {DATASETS}"
    return DATASETS


TRAIN_SOURCES = (
    "routellm_gsm8k",
    "arena_bench_v1",
    "alpaca_eval",
    "arena_battles_1k",
    "arena_hard_v01_battles",
    "routerbench_mbpp",
)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, mlflow_server, datasets_dir):
    """A small router trained on real slices of six sources (absolute grades, preferences against a baseline, human
    votes), logged to the real MLflow server."""
    from learned_router.recipe import Recipe
    from learned_router.train import train

    out = tmp_path_factory.mktemp("routers") / "small"
    data = [str(datasets_dir / f"{f}.parquet") for f in TRAIN_SOURCES]
    recipe = Recipe(max_prompts=80, steps=150)
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    try:
        manifest, run_id = train(data, out, recipe, experiment="tests")
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    return {"path": out, "manifest": manifest, "run_id": run_id, "url": mlflow_server, "data": data, "recipe": recipe}
