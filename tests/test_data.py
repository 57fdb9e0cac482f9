"""Data loading: the three input shapes, label policies, pair maps, splits by prompt, and clear errors."""

import json

import numpy as np
import pandas as pd
import pytest

from conftest import STRONG, WEAK
from learned_router.data import build_dataset, load_pair_map, load_source
from learned_router.errors import DataError
from learned_router.manifest import LabelPolicy


def long_table(path, rows):
    pd.DataFrame(rows, columns=["prompt_id", "prompt", "model", "score"]).to_parquet(path)
    return path


def test_label_policies_on_hand_made_scores(tmp_path):
    rows = []
    for i, (w, s) in enumerate([(0.9, 1.0), (0.5, 1.0), (1.0, 0.2), (0.0, 0.0), (0.6, 0.8)] * 4):
        rows += [(f"p{i:02d}", f"prompt {i}", "big", s), (f"p{i:02d}", f"prompt {i}", "small", w)]
    src = load_source(long_table(tmp_path / "t.parquet", rows))
    kw = dict(strong="big", weak="small", val=0.3, test=0.3)
    rel = build_dataset([src], policy=LabelPolicy(kind="relative", margin=0.0), **kw).sort_values("prompt_id")
    assert rel["label"].tolist()[:5] == [0, 0, 1, 1, 0]
    rel2 = build_dataset([src], policy=LabelPolicy(kind="relative", margin=0.2), **kw).sort_values("prompt_id")
    assert rel2["label"].tolist()[:5] == [1, 0, 1, 1, 1]
    ab = build_dataset([src], policy=LabelPolicy(kind="absolute", min_score=0.6, tie_target=0.5), **kw).sort_values("prompt_id")
    assert ab["label"].tolist()[:5] == [1, 0, 1, 0, 1]
    assert ab["target"].tolist() == ab["label"].tolist()  # ties mean nothing to an absolute bar
    # the training target: the label, except a tie (0.0 vs 0.0) trains toward tie_target; the label stays "passes"
    assert rel["target"].tolist() == rel["label"].tolist()
    half = build_dataset([src], policy=LabelPolicy(tie_target=0.5), **kw).sort_values("prompt_id")
    assert half["label"].tolist() == rel["label"].tolist()
    assert half["target"].tolist()[:5] == [0, 0, 1, 0.5, 0]


def test_shared_sources_with_pair_map(datasets_dir):
    sources = [load_source(datasets_dir / f) for f in ("routellm_gsm8k.parquet", "alpaca_eval.parquet", "arena_bench_v1.parquet")]
    df = build_dataset(sources, STRONG, WEAK, LabelPolicy(), load_pair_map())
    by = df.groupby("source")
    assert by.size().to_dict() == {"alpaca_eval": 683, "arena_bench_v1": 292, "routellm_gsm8k": 1319 - 12 + int(
        (df[(df.source == "routellm_gsm8k")].contaminated).sum())}
    # alpaca_eval: the stand-in pair from the shipped map; labels follow "weak >= strong" (0.5 = the baseline)
    alp = df[df.source == "alpaca_eval"]
    assert (alp["strong_score"] == 0.5).all()
    assert np.array_equal(alp["label"], (alp["weak_score"] >= 0.5).astype(int))
    assert abs(alp["label"].mean() - 0.133) < 0.01  # the README's "weak >= strong" share for this pair


def test_split_is_by_prompt_text_and_drops_contaminated_from_evaluation(datasets_dir):
    df = build_dataset([load_source(datasets_dir / "routellm_mmlu.parquet")], STRONG, WEAK, LabelPolicy())
    splits_per_text = df.groupby("group")["split"].nunique()
    assert splits_per_text.max() == 1
    dup = df[df.duplicated("prompt", keep=False)]
    assert len(dup) > 100  # MMLU repeats 105 question texts under different ids; they must share a split
    assert not df.loc[df["split"] != "train", "contaminated"].any()
    shares = df["split"].value_counts(normalize=True)
    assert 0.07 < shares["test"] < 0.13 and 0.07 < shares["val"] < 0.13


def test_split_is_deterministic_and_seeded(datasets_dir):
    src = [load_source(datasets_dir / "routellm_gsm8k.parquet")]
    a, b = (build_dataset(src, STRONG, WEAK, LabelPolicy(), seed=0) for _ in range(2))
    c = build_dataset(src, STRONG, WEAK, LabelPolicy(), seed=1)
    assert a["split"].tolist() == b["split"].tolist()
    assert a["split"].tolist() != c["split"].tolist()


def test_battles_and_plain_labels(tmp_path):
    battles = [
        {"prompt": f"q{i}", "model_a": a, "model_b": b, "winner": w}
        for i, (a, b, w) in enumerate([("gpt-4", "mixtral", "model_a"), ("mixtral", "gpt-4", "model_a"),
                                       ("gpt-4", "mixtral", "tie"), ("claude", "llama", "model_b")] * 10)
    ]
    path = tmp_path / "battles.jsonl"
    path.write_text("\n".join(json.dumps(b) for b in battles))
    df = build_dataset([load_source(path)], "gpt-4", "mixtral", LabelPolicy(), val=0.3, test=0.3)
    labels = dict(zip(df["prompt"], df["label"]))
    assert len(df) == 30  # claude-vs-llama battles are not about this pair
    assert [labels[f"q{i}"] for i in range(3)] == [0, 1, 1]
    half = build_dataset([load_source(path)], "gpt-4", "mixtral", LabelPolicy(tie_target=0.5), val=0.3, test=0.3)
    assert [dict(zip(half["prompt"], half["target"]))[f"q{i}"] for i in range(3)] == [0, 1, 0.5]  # a tie counts half

    plain = tmp_path / "labels.csv"
    pd.DataFrame({"prompt": [f"x{i}" for i in range(40)], "label": [0, 1] * 20}).to_csv(plain, index=False)
    df = build_dataset([load_source(plain)], "a", "b", LabelPolicy(), val=0.3, test=0.3)
    assert df["label"].sum() == 20 and df["target"].tolist() == df["label"].tolist()


@pytest.mark.parametrize("rows, message", [
    ([("p0", "", "big", 1.0)], "row 0: field 'prompt' is empty"),
    ([("p0", "q", "big", float("nan"))], "row 0: field 'score' is NaN"),
    ([("p0", "q", "big", 3.0)], "row 0: field 'score' must be a number in [0, 1]"),
])
def test_bad_rows_are_named(tmp_path, rows, message):
    with pytest.raises(DataError, match=None) as e:
        build_dataset([load_source(long_table(tmp_path / "t.parquet", rows))], "big", "small", LabelPolicy())
    assert message in str(e.value) and "t.parquet" in str(e.value)


def test_unknown_model_lists_the_models_there(datasets_dir):
    with pytest.raises(DataError) as e:
        build_dataset([load_source(datasets_dir / "routellm_gsm8k.parquet")], "gpt-5", WEAK, LabelPolicy())
    assert "'gpt-5' is not in source 'routellm_gsm8k'" in str(e.value)
    assert "gpt-4-1106-preview, mistralai/Mixtral-8x7B-Instruct-v0.1" in str(e.value)


def test_file_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_source(tmp_path / "missing.parquet")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type"):
        load_source(tmp_path / "x.txt")
    pd.DataFrame({"question": ["a"], "answer": ["b"]}).to_csv(tmp_path / "wrong.csv", index=False)
    with pytest.raises(DataError, match="unrecognised columns"):
        load_source(tmp_path / "wrong.csv")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "label": 1}\n{not json')
    with pytest.raises(DataError, match="cannot be read"):
        load_source(tmp_path / "broken.jsonl")
    pd.DataFrame({"prompt": ["a", "b"], "label": [1, 7]}).to_csv(tmp_path / "l.csv", index=False)
    with pytest.raises(DataError, match="row 1: field 'label' must be 0 or 1"):
        build_dataset([load_source(tmp_path / "l.csv")], "a", "b", LabelPolicy())
