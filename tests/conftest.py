"""Shared fixtures: the real shared datasets, one MLflow server per run, one small router trained on real data (shared
by pytest-xdist's workers)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
from filelock import FileLock

from learned_router.tools.inprocess import free_port

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
STRONG, WEAK = "gpt-4-1106-preview", "mistralai/Mixtral-8x7B-Instruct-v0.1"
SHARED_ENV = "LEARNED_ROUTER_TESTS_SHARED"


SLOW_FIXTURES = {"trained", "mlflow_server"}  # they train a router or wait for `mlflow server`


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    """A test that trains a router or needs the MLflow server is `slow`, as are those marked so:
    `pytest -m "not slow"` is the quick loop."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_configure(config):
    """Nothing is fetched from a hub; the controller makes one folder for what the whole run shares (with
    pytest-xdist, every worker): the MLflow server's address and the small trained router."""
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if hasattr(config, "workerinput"):  # one xdist worker per core: one thread each for torch and onnxruntime
        os.environ["OMP_NUM_THREADS"] = "1"
    if not hasattr(config, "workerinput"):
        os.environ[SHARED_ENV] = tempfile.mkdtemp(prefix="learned-router-tests-")


def shared() -> Path:
    return Path(os.environ[SHARED_ENV])


def pytest_collection_finish(session):
    """Boot `mlflow server` as soon as the tests are collected, when any of them needs it (its sqlite migrations take
    about a minute, while the fast tests run); `pytest tests/test_prices.py` starts none."""
    if any("mlflow_server" in getattr(item, "fixturenames", ()) for item in session.items):
        mlflow_url()


def mlflow_url() -> str:
    """The run's one MLflow server: started by the first process that needs it, read by the others."""
    record = shared() / "mlflow.json"
    with FileLock(shared() / "mlflow.lock"):
        if record.is_file():
            return json.loads(record.read_text())["url"]
        tmp = shared() / "mlflow"
        tmp.mkdir()
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
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no job runners: no test uses them
            start_new_session=True,  # outlives the worker that started it; the controller stops it
        )
        url = f"http://127.0.0.1:{port}"
        record.write_text(json.dumps({"url": url, "pid": proc.pid}))
        return url


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput") or SHARED_ENV not in os.environ:
        return
    record = shared() / "mlflow.json"
    if record.is_file():
        pid = json.loads(record.read_text())["pid"]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    shutil.rmtree(shared(), ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server() -> str:
    url = mlflow_url()  # started already, unless a test asks for it by a route the collection did not see
    log = shared() / "mlflow" / "server.log"
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"mlflow server did not answer /health in 240 s: {log.read_text()[-2000:]}")


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
def trained(mlflow_server, datasets_dir):
    """A small router trained on real slices of six sources (absolute grades, preferences against a baseline, human
    votes), logged to the real MLflow server; trained once per run, whichever process asks first."""
    import torch

    from learned_router.manifest import read_manifest
    from learned_router.recipe import Recipe
    from learned_router.train import train

    out, record = shared() / "routers" / "small", shared() / "trained.json"
    data = [str(datasets_dir / f"{f}.parquet") for f in TRAIN_SOURCES]
    recipe = Recipe(max_prompts=80, steps=150)
    with FileLock(shared() / "trained.lock"):
        if not record.is_file():  # any other worker waits on the lock: the training may use every core
            threads = torch.get_num_threads()
            with pytest.MonkeyPatch.context() as env:
                env.setenv("MLFLOW_TRACKING_URI", mlflow_server)
                env.setenv("OMP_NUM_THREADS", str(os.cpu_count()))
                torch.set_num_threads(os.cpu_count())
                try:
                    _, run_id = train(data, out, recipe, experiment="tests")
                finally:
                    torch.set_num_threads(threads)
            record.write_text(json.dumps({"run_id": run_id}))
    run_id = json.loads(record.read_text())["run_id"]
    return {
        "path": out,
        "manifest": read_manifest(out),
        "run_id": run_id,
        "url": mlflow_server,
        "data": data,
        "recipe": recipe,
    }


def mmlu_table(datasets_dir, rows: slice) -> pd.DataFrame:
    """The MMLU prompts of a slice (in a fixed shuffle) with the pair's grades: a user's graded traffic, as `label`
    writes it (prompt, model, score)."""
    df = pd.read_parquet(datasets_dir / "routellm_mmlu.parquet")
    prompts = pd.Series(df["prompt"].unique()).sample(frac=1.0, random_state=0).iloc[rows]
    mine = df[df["prompt"].isin(set(prompts)) & df["model"].isin([STRONG, WEAK])]
    return mine[["prompt", "model", "score"]].reset_index(drop=True)
