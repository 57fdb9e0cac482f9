"""Multi-tier routers on real AlpacaEval grades: data, policy, training + ONNX export, scoring, the dollar frontier."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from learned_router.cli import app
from learned_router.errors import DataError, RouterError
from learned_router.evals.multitier import Frontier, oracle_points
from learned_router.model import FitConfig
from learned_router.scorer import Router
from learned_router.scorer import choose_tier
from learned_router.tiers import TierSpec, load_grades, train_tiers

LADDER = ["FuseChat-Llama-3.2-1B-Instruct", "FuseChat-Llama-3.2-3B-Instruct", "FuseChat-Qwen-2.5-7B-Instruct",
          "FuseChat-Gemma-2-9B-Instruct"]
runner = CliRunner()
DEFAULT_ROUTER = str(Path(__file__).resolve().parents[1] / "models" / "default")


@pytest.fixture(scope="module")
def tier_router(tmp_path_factory, mlflow_server, datasets_dir):
    """A multi-tier router for 6 AlpacaEval 2 models, trained and exported (fp32 + int8), logged to the MLflow server."""
    import os

    out = tmp_path_factory.mktemp("tiers") / "six"
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    try:
        manifest, run_id = train_tiers(TierSpec(data=[str(datasets_dir / "alpaca_eval.parquet")], out=out,
                                                models=LADDER + ["gpt4_1106_preview", "claude-2"], fit=FitConfig(epochs=30, batch_size=64),
                                                experiment="tests"))
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    return {"path": out, "manifest": manifest, "run_id": run_id}


def test_grade_table_from_real_alpacaeval(datasets_dir):
    t = load_grades([str(datasets_dir / "alpaca_eval.parquet")], LADDER)
    assert t.models == LADDER and t.scores.shape == (683, 4)
    assert np.nanmean(t.scores[:, 3]) == pytest.approx(0.7036, abs=1e-3)  # FuseChat-Gemma's AlpacaEval 2 mean
    assert np.isfinite(t.output_chars).mean() > 0.99
    assert t.prompts["group"].is_unique


def test_bad_grade_tables(datasets_dir, tmp_path):
    with pytest.raises(DataError, match="not-a-model not in the data"):
        load_grades([str(datasets_dir / "alpaca_eval.parquet")], ["not-a-model", "claude-2"])
    with pytest.raises(DataError, match="graded in both"):  # two judges never share an output
        load_grades([str(datasets_dir / "alpaca_eval.parquet"), str(datasets_dir / "alpaca_eval_v1.parquet")])
    bad = tmp_path / "bad.jsonl"
    pd.DataFrame({"prompt": ["a", "b"], "model": ["m", "n"], "score": [0.5, 7.0]}).to_json(bad, orient="records", lines=True)
    with pytest.raises(DataError, match=r"bad.jsonl: row 1: field 'score' must be a number in \[0, 1\], got 7.0"):
        load_grades([str(bad)])
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"prompt": ["a"], "label": [1]}).to_csv(labels, index=False)
    with pytest.raises(DataError, match="needs graded answers"):
        load_grades([str(labels)])


def test_policy_takes_the_cheapest_tier_that_clears_else_the_likeliest():
    p = np.array([[0.9, 0.95, 0.2],   # the cheapest clears
                  [0.1, 0.7, 0.99],   # the middle one is the first to clear
                  [0.1, 0.3, 0.2]])   # none clears: the most likely to pass
    assert choose_tier(p, 0.6).tolist() == [0, 1, 1]
    assert choose_tier(p, 0.0).tolist() == [0, 0, 0]
    assert choose_tier(p, 1.0).tolist() == [1, 2, 1]


def test_oracle_frontier_is_the_limit():
    scores = np.array([[1.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    costs = np.array([[1.0, 10.0]] * 3)
    f = Frontier.of(oracle_points(scores, costs))
    assert f.quality.max() == pytest.approx(1.0)
    assert f.cost_at(1.0) == pytest.approx(7.0 * 1000)  # the cheap model where it suffices: (1 + 10 + 10) / 3 per call
    assert f.cost_at(1.01) is None


def test_train_export_and_score(tier_router, mlflow_server):
    import mlflow

    m = tier_router["manifest"]
    assert m.kind == "tiers" and m.models == LADDER + ["gpt4_1106_preview", "claude-2"]  # the order asked for
    assert m.parity["fp32_max_abs_diff"] <= 1e-3 and m.parity["int8_decision_agreement"] >= 0.95
    assert 0.5 < m.metrics["test_auc_mean"] < 1.0
    prompts = ["What is 2+2?", "Write a sonnet about the sea, then explain its rhyme scheme in detail."]
    for variant in ("fp32", "int8"):
        r = Router(tier_router["path"], variant=variant)
        p = r.score(prompts)
        assert p.shape == (2, 6) and r.models == m.models
        assert ((p > 0) & (p < 1)).all()
    gemma, claude = m.models.index("FuseChat-Gemma-2-9B-Instruct"), m.models.index("claude-2")
    assert (p[:, gemma] > p[:, claude]).all()  # the judge prefers FuseChat-Gemma's answers (0.70 vs 0.17 on average)
    with pytest.raises(RouterError, match="route\\(\\) is for binary routers"):
        r.route(prompts)
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(tier_router["run_id"])
    assert run.data.params["kind"] == "tiers" and "best_val_loss" in run.data.metrics
    history = client.get_metric_history(run.info.run_id, "val_loss")  # the MLP's epochs, in order
    assert len(history) >= 2 and [h.step for h in history] == sorted(h.step for h in history)
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == len(history)


def test_score_command_prints_each_models_pass_chance(tier_router):
    res = runner.invoke(app, ["score", "--router", str(tier_router["path"]), "Name three primes."])
    assert res.exit_code == 0, res.output
    line = json.loads(res.output.strip().splitlines()[-1])
    assert set(line["p_pass"]) == set(tier_router["manifest"].models)


def test_eval_tiers_command(tier_router, datasets_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "ev"
    res = runner.invoke(app, ["eval-tiers", "--router", str(tier_router["path"]), "--data",
                              str(datasets_dir / "alpaca_eval.parquet"), "--tiers", ",".join(LADDER), "--folds", "2",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "metrics.json").read_text())
    assert r["best_single"] == "FuseChat-Gemma-2-9B-Instruct" and r["n_prompts"] >= 680
    assert {"router", "oracle"} <= set(r["scorers"]) and any(k.startswith("two-model") for k in r["scorers"])
    oracle, router = r["scorers"]["oracle"], r["scorers"]["router"]
    assert oracle["saving_at_best_quality"] > 0.4  # the limit: far below the best single model's cost
    assert router["max_quality"] <= oracle["max_quality"]
    assert (out / "frontier.png").stat().st_size > 10_000 and "| router |" in (out / "table.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--tiers", "FuseChat-Gemma-2-9B-Instruct,FuseChat-Llama-3.2-1B-Instruct"], "must be listed cheapest first"),
    (["--tiers", "FuseChat-Llama-3.2-1B-Instruct,nope"], "nope not in the data"),
    (["--tiers", "claude-2,gpt4_1106_preview", "--prices", "PRICES"], "no price for tier"),
    (["--tiers", "FuseChat-Llama-3.2-1B-Instruct", ], "at least 2 distinct models"),
    (["--router", DEFAULT_ROUTER, "--tiers", "FuseChat-Llama-3.2-1B-Instruct,claude-2"], "not a multi-tier router"),
])
def test_eval_tiers_bad_input(tier_router, datasets_dir, tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    prices = tmp_path / "prices.yaml"
    prices.write_text("models:\n  claude-2: {input_per_1m: 8, output_per_1m: 24}\n")
    args = [str(prices) if a == "PRICES" else a for a in args]
    base = ["eval-tiers", "--data", str(datasets_dir / "alpaca_eval.parquet"), "--out", str(tmp_path / "out")]
    if "--router" not in args:
        base += ["--router", str(tier_router["path"])]
    res = runner.invoke(app, base + args)
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "out").exists()
