"""Graded answers from every shape and scheme as one table of observations, one name per model, splits, errors."""

import json

import numpy as np
import pandas as pd
import pytest

from conftest import STRONG, WEAK
from learned_router.data import canonical, load_grades, load_source, observations, read_prompt_table, write_table
from learned_router.errors import DataError


def long_table(path, rows, **extra):
    pd.DataFrame(rows, columns=["prompt_id", "prompt", "model", "score"]).assign(**extra).to_parquet(path)
    return path


def test_each_shared_source_gets_its_grading_scheme(datasets_dir):
    schemes = {
        name: load_source(datasets_dir / f"{name}.parquet").scheme
        for name in (
            "routellm_mmlu",
            "arena_bench_v1",
            "routerbench_mbpp",
            "vicuna_bench",
            "routerarena",
            "mmlu_pro",
            "alpaca_eval",
            "alpaca_eval_v1",
            "arena_battles_1k",
            "arena_hard_v01_battles",
        )
    }
    assert schemes == {
        "routellm_mmlu": "absolute",
        "arena_bench_v1": "absolute",
        "routerbench_mbpp": "absolute",
        "vicuna_bench": "absolute",
        "routerarena": "absolute",
        "mmlu_pro": "absolute",
        "alpaca_eval": "versus",
        "alpaca_eval_v1": "versus",
        "arena_battles_1k": "versus",
        "arena_hard_v01_battles": "versus",
    }


def test_preferences_are_grades_against_their_baseline(datasets_dir):
    alp = observations(load_source(datasets_dir / "alpaca_eval.parquet"))
    assert set(alp["opponent"]) == {STRONG}  # gpt4_1106_preview, the judge's baseline, by its one name
    assert STRONG not in set(alp["model"])  # the baseline against itself says nothing
    mixtral = alp[alp["model"] == "Mixtral-8x7B-Instruct-v0.1_concise"]  # a different prompting keeps its own name
    assert len(mixtral) == 683 and abs((mixtral["grade"] >= 0.5).mean() - 0.133) < 0.01  # the README's figure
    hard = observations(load_source(datasets_dir / "arena_hard_v01_battles.parquet"))
    assert set(hard["opponent"]) == {"gpt-4-0314"} and hard["model"].nunique() == 16
    raw = pd.read_parquet(datasets_dir / "arena_hard_v01_battles.parquet")
    assert hard["grade"].mean() == pytest.approx(
        raw["score_model_b"].mean(), abs=1e-6
    )  # each opponent's graded preference


def test_human_votes_are_battles(tmp_path):
    battles = [
        {"prompt": f"q{i}", "model_a": a, "model_b": b, "winner": w}
        for i, (a, b, w) in enumerate(
            [
                ("gpt-4", "mixtral", "model_a"),
                ("mixtral", "gpt4", "model_a"),
                ("gpt-4", "mixtral", "tie"),
                ("claude", "llama", "tie (bothbad)"),
            ]
        )
    ]
    path = tmp_path / "battles.jsonl"
    path.write_text("\n".join(json.dumps(b) for b in battles))
    obs = observations(load_source(path)).set_index("prompt")
    assert obs["grade"].to_dict() == {"q0": 1.0, "q1": 1.0, "q2": 0.5, "q3": 0.5}
    assert obs.loc["q0", "model"] == obs.loc["q1", "opponent"] == "gpt-4-0314"  # both spellings, one model
    assert set(obs["scheme"]) == {"versus"}


def test_one_name_per_model_across_sources(datasets_dir):
    mbpp = observations(load_source(datasets_dir / "routerbench_mbpp.parquet"))
    assert {STRONG, WEAK} <= set(mbpp["model"])  # mistralai/mixtral-8x7b-chat there
    assert canonical("gpt4_1106_preview") == STRONG and canonical("something-new") == "something-new"


def test_splits_are_by_prompt_text_seeded_and_contaminated_prompts_only_train(datasets_dir):
    mmlu = [datasets_dir / "routellm_mmlu.parquet"]
    g = load_grades(mmlu)
    assert g.obs.groupby("group")["split"].nunique().max() == 1
    assert g.obs["prompt"].duplicated().sum() > 100  # two models per prompt, and repeated question texts
    assert not g.obs.loc[g.obs["split"] != "train", "contaminated"].any()
    shares = g.prompts["split"].value_counts(normalize=True)
    assert 0.07 < shares["test"] < 0.13 and 0.07 < shares["val"] < 0.13
    gsm = [datasets_dir / "routellm_gsm8k.parquet"]
    a, b, c = load_grades(gsm, seed=0), load_grades(gsm, seed=0), load_grades(gsm, seed=1)
    assert a.obs["split"].tolist() == b.obs["split"].tolist() != c.obs["split"].tolist()


def test_held_out_prompts_leave_every_source(datasets_dir):
    g = load_grades([datasets_dir / "alpaca_eval.parquet", datasets_dir / "alpaca_eval_v1.parquet"])
    groups = set(g.obs.loc[g.obs["source"] == "alpaca_eval", "group"])
    assert g.without(groups).obs.empty  # AlpacaEval 1 and 2 share their instructions


@pytest.mark.parametrize(
    "rows, message",
    [
        ([("p0", "", "big", 1.0)], "row 0: field 'prompt' is empty or not text"),
        ([("p0", "q", "big", float("nan"))], "row 0: field 'score' must be a number in [0, 1] (got nan)"),
        ([("p0", "q", "big", 3.0)], "row 0: field 'score' must be a number in [0, 1] (got 3.0)"),
    ],
)
def test_bad_rows_are_named(tmp_path, rows, message):
    with pytest.raises(DataError) as e:
        load_grades([long_table(tmp_path / "t.parquet", rows)])
    assert message in str(e.value) and "t.parquet" in str(e.value)


def test_file_and_field_errors(tmp_path, datasets_dir):
    with pytest.raises(DataError, match="no such file"):
        load_source(tmp_path / "missing.parquet")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type"):
        load_source(tmp_path / "x.txt")
    pd.DataFrame({"question": ["a"], "answer": ["b"]}).to_csv(tmp_path / "wrong.csv", index=False)
    with pytest.raises(DataError, match="unrecognised columns"):
        load_source(tmp_path / "wrong.csv")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "model": "m", "score": 1}\n{not json')
    with pytest.raises(DataError, match=r"broken.jsonl: line 2: not valid JSON \(Expecting property name"):
        load_source(tmp_path / "broken.jsonl")
    (tmp_path / "list.jsonl").write_text('{"prompt": "a", "model": "m", "score": 1}\n\n[1, 2]\n')
    with pytest.raises(DataError, match="list.jsonl: line 3: expected a JSON object, got list"):
        load_source(tmp_path / "list.jsonl")
    for name in ("empty.csv", "empty.jsonl"):
        (tmp_path / name).write_text("\n")
        with pytest.raises(DataError, match=f"{name}: empty file \\(no rows\\)"):
            load_source(tmp_path / name)
        with pytest.raises(DataError, match=f"{name}: empty file \\(no rows\\)"):
            read_prompt_table(tmp_path / name)
    bad_winner = tmp_path / "b.jsonl"
    bad_winner.write_text(json.dumps({"prompt": "a", "model_a": "x", "model_b": "y", "winner": "x"}))
    with pytest.raises(DataError, match="row 0: field 'winner' must be one of"):
        load_grades([bad_winner])
    half = long_table(tmp_path / "half.parquet", [("p0", "q", "a", 1.0), ("p1", "r", "b", 0.0)], baseline=["a", None])
    with pytest.raises(DataError, match="needs a 'baseline' column on every row"):
        load_grades([half])
    with pytest.raises(DataError, match="--weight names unknown source"):
        load_grades([datasets_dir / "vicuna_bench.parquet"], weights={"nope": 2})
    with pytest.raises(DataError, match="vicuna_bench.parquet more than once: each file's grades count once"):
        load_grades([datasets_dir / "vicuna_bench.parquet"] * 2)
    assert np.isfinite(load_grades([datasets_dir / "vicuna_bench.parquet"]).obs["grade"]).all()


def test_a_source_in_several_files_is_one_source_graded_one_way(tmp_path):
    """Two label runs' outputs both hold `feedback` rows: their rows join one source; a clash of scheme is refused."""
    week1 = long_table(
        tmp_path / "week1.parquet", [("a", "hi", "m", 1.0), ("b", "prove it", "m", 0.0)], source="feedback"
    )
    week2 = long_table(
        tmp_path / "week2.parquet", [("c", "sort a list", "m", 1.0), ("b", "prove it", "m", 0.0)], source="feedback"
    )
    grades = load_grades([week1, week2])
    assert [s.name for s in grades.sources] == ["feedback", "feedback"]
    assert set(grades.obs["source"]) == {"feedback"} and sorted(grades.obs["prompt"]) == [
        "hi",
        "prove it",
        "prove it",
        "sort a list",
    ]
    assert len(load_grades([week1, week2], weights={"feedback": 2.0}).obs) == 4
    versus = long_table(tmp_path / "versus.parquet", [("d", "hello", "m", 1.0)], source="feedback", baseline="n")
    with pytest.raises(
        DataError,
        match=r"source 'feedback' is in .*week1.parquet \(long, absolute, weight 1.0\) and in "
        r".*versus.parquet \(long, versus, weight 1.0\): one source is graded and weighted one way",
    ):
        load_grades([week1, versus])
    with pytest.raises(DataError, match=r"weight 2.0\) and in .*week2.parquet \(long, absolute, weight 1.0\)"):
        load_grades([week1, week2], weights={"week1": 2.0})


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_a_table_is_written_as_its_name_asks_and_reads_back(tmp_path, suffix):
    df = pd.DataFrame({"prompt": ['Write a haiku, "quoted"\nover two lines', "é ✓"], "prompt_id": ["007", "8"]})
    write_table(df, tmp_path / f"t{suffix}")
    back = read_prompt_table(tmp_path / f"t{suffix}", text_columns=("prompt_id",))
    assert back["prompt"].tolist() == df["prompt"].tolist() and back["prompt_id"].tolist() == ["007", "8"]
    with pytest.raises(DataError, match=r"t.txt: unsupported file type '.txt'"):
        write_table(df, tmp_path / "t.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"t{suffix}"]
