"""Two-level routers: the user's own grades fitted on top of a prior router (`train --prior`), scored without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from clirun import cli as run_cli
from conftest import STRONG, WEAK, mmlu_table
from learned_router import Router
from learned_router import residual as top
from learned_router.evals.learning import apgr_of


def cli(*args, env=None, ok=True):
    return run_cli(*args, env=env, ok=ok)


def clusters(seed=0, n=600, dim=8):
    """Prompts in tight clusters around +-e1 .. +-e4; the weak model fails around +e1 and -e1 only: no linear function
    of the embedding sees that (the two sit opposite), and the prior cannot (its base output is flat)."""
    rng = np.random.default_rng(seed)
    centres = np.r_[np.eye(dim)[:4], -np.eye(dim)[:4]]
    label = rng.integers(0, 8, n)
    emb = centres[label] + 0.15 * rng.normal(size=(n, dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    weak = (rng.random(n) < np.where(label % 4 == 0, 0.1, 0.9)).astype(np.float32)
    strong = (rng.random(n) < 0.95).astype(np.float32)
    return emb.astype(np.float32), label, np.c_[weak, strong]


def test_the_top_level_learns_local_failures_and_keeps_the_prior_far_from_its_data():
    emb, label, grades = clusters()
    base = np.full((len(emb), 2), 0.7, np.float32)
    lengths = np.full(len(emb), 4.0, np.float32)
    train, test = np.arange(400), np.arange(400, 600)
    fitted = top.fit(
        base[train], lengths[train], emb[train], grades[train], ["weak", "strong"], ["weak", "strong"], (0, 1)
    )
    assert fitted.choice.width is not None and fitted.choice.objective == "pair gap MSE"  # the kernel won
    q = fitted.predict(base[test], lengths[test], emb[test])
    p_weak = 1 - np.clip(q[:, 1] - q[:, 0], 0, 1)
    assert apgr_of(p_weak, grades[test, 0], grades[test, 1]) > 0.8  # the flat prior is 0.5
    # a prompt far from every labelled one gets the (recalibrated) prior: the kernel's share is shrunk to nothing
    far = np.eye(emb.shape[1], dtype=np.float32)[6:7]  # orthogonal to every cluster
    alone = fitted.predict(base[:1], lengths[:1], far)
    linear = (
        top.design(base[:1, 0], np.zeros(1, np.float32), far, fitted.choice.ridge, fitted.choice.use_base)
        @ fitted.coef[0]
    )
    assert abs(float(alone[0, 0]) - float(np.clip(linear, 0, 1)[0])) < 0.01
    # saved and loaded, it predicts the same
    fitted.save(tmp := __import__("pathlib").Path(__import__("tempfile").mkdtemp()))
    again = top.Residual.load(tmp / top.FILE)
    assert np.allclose(again.predict(base[test], lengths[test], emb[test]), q)


def test_no_signal_in_the_grades_leaves_the_terms_out():
    emb, _, _ = clusters(seed=1)
    rng = np.random.default_rng(2)
    grades = (rng.random((len(emb), 2)) < 0.6).astype(np.float32)  # noise: nothing to learn
    base = np.full((len(emb), 2), 0.6, np.float32)
    fitted = top.fit(base, np.full(len(emb), 4.0, np.float32), emb, grades, ["a", "b"], ["a", "b"], None)
    assert fitted.choice.objective == "grade MSE" and fitted.choice.width is None  # a kernel within noise is not kept


def test_train_on_a_prior_learns_the_users_pair_and_keeps_everything_else(trained, tmp_path, datasets_dir):
    """1,000 MMLU prompts (a source the prior never saw) play the user's graded traffic; the router trained on them
    over the prior beats the prior on 500 fresh MMLU prompts, and scores every other model exactly as the prior."""
    mmlu_table(datasets_dir, slice(0, 1000)).to_parquet(tmp_path / "graded.parquet")
    fresh = mmlu_table(datasets_dir, slice(1000, 1500))
    mmlu_table(datasets_dir, slice(800, 1500)).to_parquet(tmp_path / "fresh.parquet")  # 200 trained on: left out
    out = cli(
        "train",
        "--prior",
        trained["path"],
        "--data",
        tmp_path / "graded.parquet",
        "--out",
        tmp_path / "ours",
        "--eval",
        tmp_path / "fresh.parquet",
        "--quiet",
        env={"MLFLOW_TRACKING_URI": trained["url"]},
    )
    assert "top level over small@" in out.stdout and "cross-validation (pair gap MSE) chose" in out.stdout
    folder = tmp_path / "ours"
    m = json.loads((folder / "router.json").read_text())
    assert m["residual"]["models"] == [STRONG, WEAK] and m["residual"]["prompts"] == 1000 and "residual" in m["files"]
    assert not (folder / "checkpoint").exists() and (folder / "residual.npz").is_file()

    code = (
        "import sys; from learned_router import Router; Router(sys.argv[1]).score(['hi']); "
        "print(sorted(m for m in ('torch', 'sklearn', 'scipy') if m in sys.modules))"
    )
    alone = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120)
    assert alone.stdout.strip() == "[]", alone.stdout + alone.stderr  # the top level scores with numpy alone
    ours, prior = Router(folder), Router(trained["path"])
    wide = fresh.pivot_table(index="prompt", columns="model", values="score")
    prompts = list(wide.index)
    o_prior = prior.predict(prompts)
    o_ours = ours.residual.apply(o_prior, prompts, ours.manifest.models)  # the same graph: its top level on top
    others = [i for i, name in enumerate(prior.manifest.models) if name not in (STRONG, WEAK)]
    assert np.array_equal(o_ours.quality[:, others], o_prior.quality[:, others])  # the prior, exactly
    assert np.array_equal(o_ours.difficulty, o_prior.difficulty)
    weak, strong = wide[WEAK].to_numpy(float), wide[STRONG].to_numpy(float)
    a_ours = apgr_of(o_ours.pair(WEAK, STRONG), weak, strong)
    a_prior = apgr_of(o_prior.pair(WEAK, STRONG), weak, strong)
    print(f"APGR on 500 fresh MMLU prompts: prior {a_prior:.3f}, trained over it {a_ours:.3f}")
    assert a_ours > a_prior + 0.03
    # the trainer's evaluator scored the written router on the same 500, the 200 it trained on left out
    assert m["metrics"]["eval_fresh_prompts"] == 500 and m["metrics"]["eval_fresh_apgr"] == pytest.approx(
        a_ours, abs=1e-6
    )
    assert m["metrics"]["eval_fresh_apgr_low"] < a_ours < m["metrics"]["eval_fresh_apgr_high"]
    assert (
        f"eval_fresh: APGR {a_ours:.3f} (95% " in out.stdout
        and "on 500 graded prompts it did not train on" in out.stdout
    )


def test_own_model_names_get_outputs_of_their_own(trained, tmp_path, datasets_dir):
    table = mmlu_table(datasets_dir, slice(0, 300))
    table["model"] = table["model"].map({STRONG: "my-big", WEAK: "my-small"})
    table.to_csv(tmp_path / "mine.csv", index=False)
    out = cli(
        "train",
        "--prior",
        trained["path"],
        "--data",
        tmp_path / "mine.csv",
        "--strong",
        "my-big",
        "--weak",
        "my-small",
        "--out",
        tmp_path / "mine",
        "--quiet",
        env={"MLFLOW_TRACKING_URI": trained["url"]},
    )
    assert "my-small vs my-big" in out.stdout
    r = Router(tmp_path / "mine")
    assert r.models[-3:] == ["my-big", "my-small", "generic"] and r.manifest.residual.base == ["generic", "generic"]
    p = r.pass_chance(["What is 2+2?", "Which of these is a noble gas?\nA. Oxygen\nB. Argon\nC. Nitrogen\nD. Iron"])
    assert p.shape == (2,) and np.isfinite(p).all()
    assert r.manifest.threshold_for(0.3) <= r.manifest.threshold_for(0.7)  # calibrated on the user's prompts

    bad = cli(
        "train",
        "--prior",
        trained["path"],
        "--data",
        tmp_path / "mine.csv",
        "--strong",
        "my-huge",
        "--out",
        tmp_path / "x",
        ok=False,
    )
    assert bad.returncode == 2 and "--strong 'my-huge' is neither graded in --data nor known to the prior" in bad.stderr
    battles = cli(
        "train",
        "--prior",
        trained["path"],
        "--data",
        datasets_dir / "arena_battles_1k.parquet",
        "--out",
        tmp_path / "y",
        ok=False,
    )
    assert battles.returncode == 2 and "battles between varying models" in battles.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
