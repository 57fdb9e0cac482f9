"""`learned-router eval` on real benchmark slices: unseen prompts only, baselines on the same prompts, clear errors."""

import json
import shutil

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from clirun import cli
from conftest import STRONG, WEAK
from learned_router.errors import DataError, RouterError
from learned_router.evals.protocol import BenchmarkEvaluator, difficulty_ceiling, load_benchmark, run_eval
from learned_router.progress import quiet


def evaluate(router, data, strong, weak, out, **kw):
    """`run_eval` handed the benchmark's evaluator, as the CLI does."""
    return run_eval(router, BenchmarkEvaluator.from_file(data, strong, weak), out, **kw)


def slice_of(datasets_dir, name, n, tmp_path, **changes):
    df = pd.read_parquet(datasets_dir / f"{name}.parquet")
    ids = df["prompt_id"].drop_duplicates().iloc[:n]
    out = tmp_path / f"{name}.parquet"
    df[df["prompt_id"].isin(ids)].assign(**changes).to_parquet(out)
    return out


def test_benchmark_in_training_data_is_cross_validated(trained, datasets_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    bench = slice_of(datasets_dir, "routellm_gsm8k", 120, tmp_path)
    capsys.readouterr()
    res = evaluate(trained["path"], bench, STRONG, WEAK, tmp_path / "out", folds=2)
    steps = capsys.readouterr().err.splitlines()  # a log (not a terminal): one line per named step
    for named in (
        "reading routellm_gsm8k.parquet",
        "fold 1/2: fitting the recipe without",
        "fold 1/2: baselines",
        "fold 2/2: fitting the recipe without",
        "fold 2/2: baselines",
        "metrics of",
        "writing",
    ):
        assert any(line.startswith(named) for line in steps), (named, steps)
    r = res.report
    assert res.protocol.startswith("2-fold cross-validation by prompt")
    clean = pd.read_parquet(bench).drop_duplicates("prompt_id")
    assert res.n_prompts == r["n_prompts"] == int((~clean["contaminated"]).sum()) < 120  # contaminated dropped
    assert set(r["scorers"]) >= {
        "router",
        "difficulty",
        "prompt length",
        "kNN",
        "logistic",
        "random",
        "oracle",
        "optimal",
    }
    assert r["scorers"]["random"]["apgr"] == pytest.approx(0.5)
    assert r["scorers"]["optimal"]["apgr"] > max(r["scorers"][k]["apgr"] for k in ("router", "kNN", "logistic"))
    assert 0 <= r["scorers"]["router"]["roc_auc"] <= 1
    assert set(r["not_beaten"]) <= {"difficulty", "prompt length", "kNN", "logistic"}
    for b in ("prompt length", "kNN", "logistic"):  # bootstrap intervals around the router's APGR and its lead
        lo, hi = r["scorers"][b]["lead_ci"]
        assert lo <= r["scorers"]["router"]["apgr"] - r["scorers"][b]["apgr"] <= hi
    lo, hi = r["scorers"]["router"]["apgr_ci"]
    assert lo < r["scorers"]["router"]["apgr"] < hi and hi - lo < 1  # 120 GSM8K prompts: a wide interval, defined
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"metrics.json", "frontier.png", "table.md"}
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["benchmark"] == "routellm_gsm8k"
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| router |" in table and "APGR 95% CI" in table and "Beyond resampling noise" in table


def test_unseen_benchmark_is_scored_by_the_shipped_router(trained, datasets_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    bench = slice_of(datasets_dir, "routellm_mmlu", 80, tmp_path)  # the small router never saw MMLU
    capsys.readouterr()
    with quiet():  # the CLI's --quiet: no progress
        res = evaluate(trained["path"], bench, STRONG, WEAK, tmp_path / "out")
    assert capsys.readouterr().err == ""
    assert res.protocol.startswith("the shipped router")
    assert res.n_prompts == 80


def test_leave_one_source_out_refits_without_the_source_or_its_prompts(
    trained, datasets_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("CI", "true")  # no progress in CI
    capsys.readouterr()
    res = evaluate(
        trained["path"], datasets_dir / "arena_bench_v1.parquet", STRONG, WEAK, tmp_path / "out", by="source"
    )
    assert res.protocol.startswith("leave one source out") and capsys.readouterr().err == ""
    assert res.n_prompts == 292  # every prompt with both models' grades
    r = res.report["scorers"]
    assert r["optimal"]["apgr"] == pytest.approx(0.875, abs=0.002)  # the datasets README's oracle for this pair
    assert {"router", "difficulty", "kNN", "logistic"} <= set(r)
    # routing by the 14 other models' grades of the same prompts: 0.630 (measured), below the oracle, above random
    assert res.report["difficulty_ceiling"] == pytest.approx(0.630, abs=0.005)


def test_battles_against_whichever_opponent(trained, datasets_dir, tmp_path):
    res = evaluate(
        trained["path"], datasets_dir / "arena_battles_1k.parquet", "gpt-4", "*", tmp_path / "out", by="source"
    )
    assert res.report["strong"] == "gpt-4-0314" and res.report["pairs"] > 5  # gpt-4 met many opponents
    assert 100 < res.n_prompts < 200
    assert res.report["difficulty_ceiling"] is None  # one battle per prompt: no other models to read


def test_eval_command_logs_to_mlflow(trained, datasets_dir, tmp_path):
    bench = slice_of(datasets_dir, "routellm_mmlu", 300, tmp_path)  # enough prompts for defined intervals
    env = {"MLFLOW_TRACKING_URI": trained["url"], "HF_HUB_OFFLINE": "1"}
    out = cli(
        "eval",
        "--router",
        trained["path"],
        "--data",
        bench,
        "--out",
        tmp_path / "o",
        "--name",
        "mmlu-slice",
        "--experiment",
        "eval-tests",
        env=env,
    )
    assert out.returncode == 0, out.stderr
    client = MlflowClient(trained["url"])
    run = client.search_runs([client.get_experiment_by_name("eval-tests").experiment_id])[0]
    assert run.data.params["prompts"] == "300" and "apgr_router" in run.data.metrics
    scorers = json.loads((tmp_path / "o" / "metrics.json").read_text())["scorers"]
    logged = {
        (name, k): [run.data.metrics.get(f"{k}_{end}_{name.replace(' ', '_')}") for end in ("low", "high")]
        for name, s in scorers.items()
        for k in ("apgr_ci", "lead_ci")
        if k in s
    }
    assert ("router", "apgr_ci") in logged and ("kNN", "lead_ci") in logged  # the intervals, where defined
    assert logged[("router", "apgr_ci")][0] is not None
    for (name, k), v in logged.items():
        assert v == (scorers[name][k] if None not in scorers[name][k] else [None, None])
    assert {"frontier.png", "metrics.json", "table.md"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


def test_bad_benchmarks(trained, datasets_dir, tmp_path):
    with pytest.raises(DataError, match=r"model\(s\) nope not graded there; models: gpt-4-1106-preview"):
        evaluate(
            trained["path"], slice_of(datasets_dir, "routellm_gsm8k", 20, tmp_path), STRONG, "nope", tmp_path / "o"
        )
    with pytest.raises(DataError, match="no battle between 'gpt-4-1106-preview' and 'nope'"):
        evaluate(trained["path"], datasets_dir / "arena_battles_1k.parquet", STRONG, "nope", tmp_path / "o")
    with pytest.raises(DataError, match="is for battles between varying models"):
        evaluate(trained["path"], slice_of(datasets_dir, "routellm_gsm8k", 20, tmp_path), STRONG, "*", tmp_path / "o")
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"prompt": ["a", "b"], "label": [0, 1]}).to_csv(labels, index=False)
    with pytest.raises(DataError, match="unrecognised columns"):
        evaluate(trained["path"], labels, STRONG, WEAK, tmp_path / "o")
    dirty = slice_of(datasets_dir, "routellm_gsm8k", 20, tmp_path, contaminated=True)
    with pytest.raises(DataError, match="no prompt left to evaluate"):
        evaluate(trained["path"], dirty, STRONG, WEAK, tmp_path / "o")
    with pytest.raises(RouterError, match="--by must be"):
        clean = slice_of(datasets_dir, "routellm_gsm8k", 20, tmp_path)
        evaluate(trained["path"], clean, STRONG, WEAK, tmp_path / "o", by="vibes")
    assert not (tmp_path / "o").exists()


def test_router_for_another_encoder(trained, datasets_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(trained["path"], other)
    record = json.loads((other / "checkpoint" / "training.json").read_text())
    record["encoder"]["fingerprint"] = "0" * 64
    (other / "checkpoint" / "training.json").write_text(json.dumps(record))
    with pytest.raises(RouterError, match="trained on another encoder"):
        evaluate(other, slice_of(datasets_dir, "routellm_gsm8k", 20, tmp_path), STRONG, WEAK, tmp_path / "o")


def test_tier_policy_in_dollars(trained, datasets_dir, tmp_path):
    from learned_router.evals.tiers import TierEvaluator, run_tier_eval

    bench = slice_of(datasets_dir, "alpaca_eval", 60, tmp_path)
    tiers = [
        "gemma-2b-it",
        "mistralai/Mixtral-8x7B-Instruct-v0.1",
        "gpt4_1106_preview",
    ]  # the baseline, by its one name
    prices = tmp_path / "prices.yaml"
    prices.write_text(
        "models:\n  gemma-2b-it: {input_price_per_1m: 0.1, output_price_per_1m: 0.1}\n"
        "  Mixtral-8x7B-Instruct-v0.1_concise: {input_price_per_1m: 0.6, output_price_per_1m: 0.6}\n"
        "  mistralai/Mixtral-8x7B-Instruct-v0.1: {input_price_per_1m: 0.6, output_price_per_1m: 0.6}\n"
        "  gpt-4-1106-preview: {input_price_per_1m: 10, output_price_per_1m: 30}\n"
    )
    with pytest.raises(DataError, match="tier model\\(s\\) mistralai/Mixtral-8x7B-Instruct-v0.1 not graded there"):
        TierEvaluator.from_file(bench, tiers, prices)
    tiers[1] = "Mixtral-8x7B-Instruct-v0.1_concise"
    r = run_tier_eval(trained["path"], TierEvaluator.from_file(bench, tiers, prices), tmp_path / "o", folds=2)
    assert (
        r["n_prompts"] == 60
        and r["best_single"] == "gpt-4-1106-preview"
        and r["single"]["gpt-4-1106-preview"]["quality"] == 0.5
    )
    oracle, router = r["scorers"]["oracle"], r["scorers"]["router"]
    assert (
        oracle["max_quality"] >= router["max_quality"]
        and oracle["cost_at_best_quality"] <= r["single"]["gpt-4-1106-preview"]["cost"]
    )
    assert {p.name for p in (tmp_path / "o").iterdir()} == {"metrics.json", "frontier.png", "table.md"}
    with pytest.raises(RouterError, match="cheapest first"):
        TierEvaluator.from_file(bench, tiers[::-1], prices)


def test_difficulty_ceiling_reads_the_other_models_grades(datasets_dir):
    bench = load_benchmark(datasets_dir / "routerbench_mbpp.parquet", STRONG, "mistralai/mixtral-8x7b-chat")
    assert bench["others_q"].between(0, 1).all()  # 9 other models' mean pass rate per task
    assert difficulty_ceiling(bench.assign(others_q=bench["weak_q"] - bench["strong_q"])) > 1.2  # the oracle: 1.348
    assert difficulty_ceiling(bench.assign(others_q=bench["strong_q"] - bench["weak_q"])) < 0  # backwards
    assert difficulty_ceiling(bench) == pytest.approx(0.581, abs=0.005)  # measured


def test_report_only_runs_one_benchmark_and_keeps_the_others_figures(trained, datasets_dir, tmp_path):
    mmlu = slice_of(datasets_dir, "routellm_mmlu", 60, tmp_path)  # the small router never saw MMLU: scored as shipped
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        json.dumps(
            {
                "router": str(trained["path"]),
                "benchmarks": [
                    {"name": "MMLU A", "data": str(mmlu), "strong": STRONG, "weak": WEAK},
                    {"name": "MMLU B", "data": str(mmlu), "strong": STRONG, "weak": WEAK},
                ],
            }
        )
    )

    def report(*extra):
        return cli("report", "--config", suite, "--out", tmp_path / "r", "--quiet", *extra)

    r = report("--only", "MMLU A")
    assert r.returncode == 2 and "MMLU B was never run into" in r.stderr and "without --only" in r.stderr
    assert not (tmp_path / "r").exists()  # nothing ran
    assert report().returncode == 0
    a, b = (tmp_path / "r" / "results" / name / "metrics.json" for name in ("mmlu-a", "mmlu-b"))
    before = a.stat().st_mtime_ns, b.read_text()
    assert report("--only", "MMLU A").returncode == 0
    assert a.stat().st_mtime_ns != before[0] and b.read_text() == before[1]  # A ran again, B's figures were read
    text = (tmp_path / "r" / "RESULTS.md").read_text()
    assert "## MMLU A" in text and "## MMLU B" in text
    r = report("--only", "MMLU C")
    assert r.returncode == 2 and "no 'MMLU C' in the suite; one of: MMLU A, MMLU B" in r.stderr
