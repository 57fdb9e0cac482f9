"""A two-level router evaluated on the user's data: the top level refit per fold over its prior, and the learning
curve of a top level over a prior beside the prior, kNN, ridge and prompt length."""

from __future__ import annotations

import json

import pytest

from clirun import cli as run_cli
from conftest import mmlu_table


def cli(*args, env=None, ok=True):
    return run_cli(*args, env=env, ok=ok)


def test_eval_refits_the_top_level_per_fold_and_the_learning_curve(trained, tmp_path, datasets_dir):
    mmlu_table(datasets_dir, slice(0, 300)).to_parquet(tmp_path / "graded.parquet")
    env = {"MLFLOW_TRACKING_URI": trained["url"]}
    cli(
        "train",
        "--prior",
        trained["path"],
        "--data",
        tmp_path / "graded.parquet",
        "--out",
        tmp_path / "ours",
        "--quiet",
        env=env,
    )
    cli(
        "eval",
        "--router",
        tmp_path / "ours",
        "--data",
        tmp_path / "graded.parquet",
        "--against",
        trained["path"],
        "--out",
        tmp_path / "eval",
        "--quiet",
        env=env,
    )
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert "the top level is refit over its prior" in report["protocol"]
    assert {"router", "prior", "kNN", "ridge", "router small"} <= set(report["scorers"])
    assert report["scorers"]["prior"]["apgr"] == pytest.approx(
        report["scorers"]["router small"]["apgr"]
    )  # the same prior

    lc = cli(
        "eval",
        "--router",
        trained["path"],
        "--data",
        tmp_path / "graded.parquet",
        "--learning-curve",
        "100,all",
        "--draws",
        "2",
        "--out",
        tmp_path / "lc",
        "--quiet",
        env=env,
    )
    assert "| 100 |" in lc.stdout and "(all) |" in lc.stdout
    rows = json.loads((tmp_path / "lc" / "learning_curve.json").read_text())["rows"]
    assert rows[0]["size"] == 100 and rows[1]["all"] and all(0 <= r["two-level"]["apgr"] < 2 for r in rows)
    bad = cli(
        "eval",
        "--router",
        trained["path"],
        "--data",
        tmp_path / "graded.parquet",
        "--learning-curve",
        "5,all",
        "--out",
        tmp_path / "x",
        ok=False,
    )
    assert bad.returncode == 2 and "--learning-curve: expected sizes of at least 20" in bad.stderr
