"""Training on real slices, the quality model, the exported router folder, parity with torch, atomic writes."""

import json
import logging
import shutil

import numpy as np
import onnx
import pytest
import torch

from conftest import STRONG, TRAIN_SOURCES, WEAK
from learned_router import Router, RouterError, RouterFolderError
from learned_router.export import PROBES, export
from learned_router.manifest import CALIBRATION_SHARES, RouterFolder
from learned_router.model import QualityModel, fit_head
from learned_router.parity import GATES, Graded, judge, share_tolerance
from learned_router.recipe import Recipe
from learned_router.train import train


def test_router_folder_and_manifest(trained):
    folder, m = trained["path"], trained["manifest"]
    assert {p.name for p in folder.iterdir()} == {
        "router.json",
        "tokenizer.json",
        "model.onnx",
        "model.int8.onnx",
        "checkpoint",
    }
    assert (m.strong, m.weak) == (STRONG, WEAK) and m.outputs[-1] == "generic"
    # every graded model of every source is an output, by one name: the arena battles' gpt-4 is gpt-4-0314
    assert {"gpt-4-0314", "gpt-4-0613", "gpt-3.5-turbo-0125", "claude-2", "vicuna-13b", STRONG, WEAK} <= set(m.models)
    assert {d["name"] for d in m.data} == set(TRAIN_SOURCES) - {"arena_hard_v01_battles"} | {
        "arena_hard_v01"
    }  # its source column
    assert {d["name"]: d["scheme"] for d in m.data}["alpaca_eval"] == "versus"
    assert m.encoder.max_seq_length == 128 and m.encoder.dim == 384 and m.encoder.layers == 3
    assert m.parity["fused_Attention"] == 3.0  # the 3 of MiniLM's 6 layers the recipe keeps, fused
    # calibration: per output, thresholds rising with the share of strong calls, on held-out chat prompts
    c = m.calibration
    assert "arena_bench_v1" in c.mix and c.prompts >= 50 and set(c.thresholds) == set(m.outputs)
    for t in c.thresholds.values():
        assert len(t) == len(CALIBRATION_SHARES) and all(a <= b for a, b in zip(t, t[1:]))
    assert abs(m.strong_fraction_at(m.threshold_for(0.3)) - 0.3) < 0.06
    assert m.default_threshold == pytest.approx(m.threshold_for(0.5), abs=1e-4)
    aucs = [v for k, v in m.metrics.items() if k.startswith("test_auc_")]  # ~8 test prompts a source: noisy
    assert len(aucs) >= 4 and all(0 <= v <= 1 for v in aucs) and sum(aucs) / len(aucs) > 0.55


def test_exported_graph_matches_torch(trained):
    folder = RouterFolder(trained["path"])
    prompts = PROBES + ["What is the derivative of x^3 sin(x)?", "Tell me a joke about databases."]
    torch_out = QualityModel.load(folder.path).predict(prompts)
    fp32, int8 = (Router(folder.path, variant=v).predict(prompts) for v in ("fp32", "int8"))
    assert (
        np.max(np.abs(fp32.quality - torch_out.quality)) < 1e-4
        and np.max(np.abs(fp32.difficulty - torch_out.difficulty)) < 1e-4
    )
    assert np.array_equal(fp32.pass_chances().shape, torch_out.pass_chances().shape) and fp32.models == torch_out.models
    assert np.mean(np.abs(int8.quality - torch_out.quality)) < GATES["int8"]["mean_abs_diff"]
    m = trained["manifest"]
    assert m.parity["fp32_max_abs_diff"] < 1e-4 and m.parity["fp32_strong_share_shift"] == 0.0
    assert m.check.passed == {"fp32": True, "int8": True} and m.check.cpu and m.check.probes == PROBES
    # router.json keeps the torch model's outputs on the built-in probes, and each Router compares with them on load
    pair = [m.models.index(WEAK), m.models.index(STRONG)]
    assert np.allclose(m.check.quality, torch_out.quality[: len(PROBES)][:, pair], atol=1e-6)
    assert Router(folder.path, variant="fp32").check.max_abs_diff < 1e-4 and Router(folder.path).check.passed
    quantized = [n.name for n in onnx.load(str(folder.model_path("int8"))).graph.node if n.op_type == "MatMulInteger"]
    assert quantized and not [n for n in quantized if n.startswith("/head/")]  # the encoder int8, the head fp32


def synthetic(seed=0, n=400, dim=8):
    """Prompts with a known difficulty (feature 0) and trait (feature 1); models with known abilities, one source of
    each scheme. The versus source's judge prefers model 2 whatever the prompt."""
    rng = np.random.default_rng(seed)
    x = np.c_[rng.normal(size=(n, dim)), np.full(n, 100.0)].astype(np.float32)
    ability = np.array([2.0, 0.0, -1.0])
    eta = ability[None, :] + np.outer(x[:, 1], [1.0, 0.0, -1.0]) - 1.5 * x[:, [0]]
    rows = {k: [] for k in ("prompt", "model", "opponent", "source", "grade")}
    for i in range(n):
        for m in range(3):
            rows["prompt"].append(i), rows["model"].append(m), rows["opponent"].append(0), rows["source"].append(0)
            rows["grade"].append(float(rng.random() < 1 / (1 + np.exp(-eta[i, m]))))
        for m in (1, 2):  # versus model 0 (the baseline)
            bias = 3.0 if m == 2 else 0.0
            p = 1 / (1 + np.exp(-(eta[i, m] - eta[i, 0] + bias)))
            rows["prompt"].append(i), rows["model"].append(m), rows["opponent"].append(0), rows["source"].append(1)
            rows["grade"].append(float(rng.random() < p))
    obs = {k: np.array(v) for k, v in rows.items()}
    obs["weight"] = np.ones(len(obs["grade"]))
    return x, obs, eta


def test_quality_model_recovers_abilities_difficulty_and_a_judges_taste():
    x, obs, eta = synthetic()
    recipe = Recipe(factors=2, steps=300, length_input=False, reference=["abs"], l2=1e-4)
    head = fit_head(x[:, :-1], obs, ["strong", "mid", "weak"], ["abs", "pref"], ["absolute", "versus"], recipe)
    quality, difficulty = head.predict(x[:, :-1])
    assert np.corrcoef(difficulty, x[:, 0])[0, 1] > 0.9  # the prompt's difficulty
    assert (quality[:, 0] > quality[:, 2]).mean() > 0.9  # abilities in order (the truth: 93% of prompts)
    true_gap, gap = eta[:, 0] - eta[:, 2], quality[:, 0] - quality[:, 2]
    assert np.corrcoef(true_gap, gap)[0, 1] > 0.7  # the trait: where the pair's gap is large
    # the judge's taste for model 2 went into that source's offset, not into model 2's ability
    with torch.no_grad():
        assert head.offset[1, 2] - head.offset[1, 1] > 1.0 and head.ability[2] < head.ability[1]
    again = fit_head(x[:, :-1], obs, ["strong", "mid", "weak"], ["abs", "pref"], ["absolute", "versus"], recipe)
    assert np.array_equal(again.predict(x[:, :-1])[0], quality)  # seeded


def test_versus_grades_never_move_the_difficulty():
    x, obs, _ = synthetic()
    keep = obs["source"] == 1
    only = {k: v[keep] for k, v in obs.items()}
    only["source"] = np.zeros(keep.sum(), dtype=int)
    head = fit_head(
        x[:, :-1],
        only,
        ["strong", "mid", "weak"],
        ["pref"],
        ["versus"],
        Recipe(factors=2, steps=100, length_input=False),
    )
    with torch.no_grad():
        assert float(head.difficulty.weight.abs().max()) == 0.0


def crowded(seed=0, n=60, models=3, width=0.04):
    """Torch outputs whose weak pass chances crowd the threshold 0.5, and an int8 copy moved by noise of the size
    measured on AVX2 and VNNI CPUs (max |dq| ~0.05-0.2, mean ~0.02)."""
    rng = np.random.default_rng(seed)
    strong = rng.uniform(0.5, 1.0, n)
    q_ref = np.c_[
        strong, np.zeros((n, models - 2)), strong - 0.5 + rng.uniform(-width, width, n)
    ]  # weak pass ~0.5 +- width
    d_ref = rng.uniform(0.2, 0.8, n)
    return (q_ref, d_ref), (q_ref + rng.normal(0, 0.025, q_ref.shape), d_ref + rng.normal(0, 0.02, n))


def test_int8_is_judged_by_routing_not_by_flips_near_the_threshold():
    reference, int8 = crowded()
    pair, t = (2, 0), 0.5  # (weak, strong) columns
    p = 1 - np.clip(int8[0][:, 0] - int8[0][:, 2], 0, 1)
    p_ref = 1 - np.clip(reference[0][:, 0] - reference[0][:, 2], 0, 1)
    clear = np.abs(p_ref - t) > 0.02
    assert np.mean((p >= t)[clear] == (p_ref >= t)[clear]) < 0.95  # the per-probe agreement gate refused this
    v = judge("int8", int8, reference, pair, t, calibration_prompts=500)
    assert v.passed and v.strong_share_shift_low < share_tolerance(500)  # flips both ways, a shift within noise
    # what a user would feel still fails: a broken graph, a strong share moved beyond noise, routing quality lost
    (q, d) = int8
    assert "mean |dq|" in judge("int8", (q + 0.3, d), reference, pair, t, 500).failures[0]
    biased = (np.c_[q[:, :2], q[:, 2] - 0.02], d)  # the weak model's quality down: more prompts go strong
    assert "strong share moves" in judge("int8", biased, reference, pair, t, 500).failures[0]
    assert judge("int8", biased, reference, pair, t, 20).passed  # inside a 20-prompt calibration's own error
    assert (
        share_tolerance(20) > 0.2 > share_tolerance(500) > share_tolerance(10**6) == GATES["int8"]["strong_share_shift"]
    )
    # routing quality on graded prompts: noise of that size leaves it be where the pass chances spread as a real
    # router's do, and a graph that reverses their order fails
    reference, int8 = crowded(n=200, width=0.3)
    (q, d), gap = int8, reference[0][:, 0] - reference[0][:, 2]
    weak_passes = np.random.default_rng(1).random(len(gap)) < (0.8 - gap) / 0.6  # likelier where the gap is small
    graded = Graded(np.arange(len(gap)), weak=weak_passes.astype(float), strong=np.ones(len(gap)))
    assert judge("int8", int8, reference, pair, t, 500, graded).passed
    reversed_ = (np.c_[q[:, :2], q[:, 0] - (2 * gap.mean() - gap)], d)  # the pair's gap in reverse order
    v = judge("int8", reversed_, reference, pair, t, 500, graded)
    assert v.apgr_shift < -0.3 and any("APGR lower" in f for f in v.failures)


def test_export_in_place_and_to_new_folder(trained, tmp_path, caplog):
    src = tmp_path / "r"
    shutil.copytree(trained["path"], src)
    caplog.set_level(logging.INFO)  # restored after the test
    m = export(src, tmp_path / "int8only", variants=["int8"])
    assert logging.getLogger().level == logging.INFO  # the quantizer's quiet root logger is put back
    assert {p.name for p in (tmp_path / "int8only").iterdir()} == {
        "router.json",
        "tokenizer.json",
        "model.int8.onnx",
        "checkpoint",
    }
    assert set(m.files) == {"int8", "tokenizer"}
    with pytest.raises(RouterError, match="already exists"):
        export(src, tmp_path / "int8only", variants=["int8"])
    before = json.loads((src / "router.json").read_text())
    export(src, variants=["fp32"])  # in place
    after = json.loads((src / "router.json").read_text())
    assert set(after["files"]) == {"fp32", "tokenizer"} and before["calibration"] == after["calibration"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_int8_that_fails_its_check_is_left_out_and_fp32_written(trained, tmp_path, monkeypatch, caplog):
    import learned_router.parity as parity

    monkeypatch.setitem(parity.GATES, "int8", {**parity.GATES["int8"], "mean_abs_diff": 1e-9})
    m = export(trained["path"], tmp_path / "fallback", variants=["int8"])
    assert set(m.files) == {"fp32", "tokenizer"} and m.check.passed == {"fp32": True, "int8": False}
    assert {p.name for p in (tmp_path / "fallback").iterdir()} == {
        "router.json",
        "tokenizer.json",
        "model.onnx",
        "checkpoint",
    }
    assert "mean |dq|" in m.check.reasons["int8"] and m.parity["int8_mean_abs_diff"] > 0
    [line] = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "int8 left out" in r.getMessage()
    ]
    assert m.check.cpu in line and "--variants int8" in line and "\n" not in line
    assert Router(tmp_path / "fallback").variant == "fp32"

    monkeypatch.setitem(parity.GATES, "fp32", {"max_abs_diff": 0.0})  # fp32 must match: a real bug, nothing written
    with pytest.raises(
        RouterError, match=r"fp32 export disagrees with the torch model on .* max \|dq\|.*nothing written"
    ):
        export(trained["path"], tmp_path / "drift", variants=["int8"])
    assert not (tmp_path / "drift").exists()


def test_a_router_loaded_on_another_cpu_checks_itself(trained, tmp_path, caplog):
    moved = tmp_path / "moved"
    shutil.copytree(trained["path"], moved)
    record = json.loads((moved / "router.json").read_text())
    for row in record["check"]["quality"]:  # (weak, strong): as if this CPU's int8 kernels put the strong model higher
        row[1] -= 0.3
    (moved / "router.json").write_text(json.dumps(record))
    caplog.set_level(logging.WARNING)
    r = Router(moved)
    assert not r.check.passed and r.check.mean_abs_diff > 0.01
    [line] = [x.getMessage() for x in caplog.records if "routes unlike the torch model" in x.getMessage()]
    assert f"{r.check.mean_abs_diff:.4f}" in line and record["check"]["cpu"] in line


def test_failed_training_leaves_nothing(tmp_path, datasets_dir):
    out = tmp_path / "never"
    with pytest.raises(RouterError, match="--weak 'no-such-model' is graded in none of the --data files"):
        train([str(datasets_dir / "routellm_gsm8k.parquet")], out, Recipe(weak="no-such-model"))
    with pytest.raises(RouterError, match="--factors must be 0 or more"):
        Recipe(factors=-1)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_and_export_needs_checkpoint(trained, tmp_path):
    with pytest.raises(RouterError, match="already exists"):
        train(trained["data"][:1], trained["path"], Recipe(max_prompts=20))
    bare = tmp_path / "bare"
    shutil.copytree(trained["path"], bare, ignore=shutil.ignore_patterns("checkpoint"))
    with pytest.raises(RouterError, match="checkpoint/training.json: missing"):
        export(bare)
    broken = tmp_path / "broken"
    shutil.copytree(trained["path"], broken)
    (broken / "checkpoint" / "head.pt").write_bytes(b"truncated")
    with pytest.raises(RouterError, match="head.pt"):
        export(broken, tmp_path / "out")
    (broken / "checkpoint" / "training.json").write_text("{not json")
    with pytest.raises(RouterError, match="training.json: not valid JSON"):
        export(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_broken_router_folders_are_named(trained, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(trained["path"], bad, ignore=shutil.ignore_patterns("checkpoint", "model.onnx"))
    with pytest.raises(RouterFolderError, match="model.onnx: missing"):
        Router(bad, variant="fp32")
    with pytest.raises(RouterFolderError, match="no 'bf16' model"):
        Router(bad, variant="bf16")
    with open(bad / "model.int8.onnx", "r+b") as f:
        f.seek(1000)
        f.write(b"garbage")
    with pytest.raises(RouterFolderError, match="model.int8.onnx: corrupted"):
        Router(bad)
    shutil.copyfile(trained["path"] / "model.int8.onnx", bad / "model.int8.onnx")
    (bad / "tokenizer.json").unlink()
    with pytest.raises(RouterFolderError, match="tokenizer.json: missing"):
        Router(bad)
    (bad / "router.json").write_text("{not json")
    with pytest.raises(RouterFolderError, match="router.json: not valid JSON"):
        Router(bad)
    (bad / "router.json").write_text('{"format_version": 2}')
    with pytest.raises(RouterFolderError, match="router.json: field 'name'"):
        Router(bad)
    (bad / "router.json").unlink()
    with pytest.raises(RouterFolderError, match="router.json: missing"):
        Router(bad)
    with pytest.raises(RouterFolderError, match="router.json: a file, not a router folder"):
        Router(trained["path"] / "router.json")


def test_the_trainer_scores_each_evaluator_it_is_handed_without_the_prompts_it_trained_on(trained, tmp_path):
    from learned_router.data import group_of, load_grades
    from learned_router.evaluator import RoutingEvaluator
    from learned_router.train import evaluate

    recipe = trained["recipe"]
    grades = load_grades(trained["data"], None, recipe.val, recipe.test, recipe.seed, recipe.max_prompts)
    source = next(d for d in trained["data"] if "gsm8k" in d)  # graded for the recipe's pair; 80 of its prompts trained
    whole = RoutingEvaluator.from_file(source, recipe.weak, recipe.strong)
    seen = set(grades.obs["group"])
    ours = np.array([group_of(p) in seen for p in whole.prompts])
    evaluator = whole.rows(ours | (np.cumsum(~ours) <= 200))  # the trained prompts and 200 others: fewer to embed
    unseen = evaluator.without(seen)
    assert ours.sum() >= 80 and len(unseen.prompts) == len(evaluator.prompts) - ours.sum() == 200
    figures = evaluate(QualityModel.load(trained["path"]), grades, recipe, [evaluator])
    assert figures[f"{evaluator.name}_prompts"] == len(unseen.prompts)
    assert (
        figures[f"{evaluator.name}_apgr_low"]
        <= figures[f"{evaluator.name}_apgr"]
        <= figures[f"{evaluator.name}_apgr_high"]
    )
    with pytest.raises(RouterError, match="at least 30 are needed"):
        evaluator.without({group_of(p) for p in evaluator.prompts})
