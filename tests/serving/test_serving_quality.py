"""Shadow grading (`quality:` block) on the fakes: a weak model that fails some prompts, a strong one, a judge that
grades as the rubric does. The estimate's interval covers the true retained quality; the cap, exclusions and data
classes hold; a hanging or lying judge changes nothing for clients and is counted."""

from __future__ import annotations

import random
import time

import httpx
import numpy as np
import pandas as pd
import pytest

from learned_router import quality
from learned_router.tools.fake_provider import fails
from serving_fixtures import (
    judged_fakes,
    CLIENT_KEY,
    OTHER_KEY,
    provider_entry,
    router_output,
    service_config,
    in_process,
    two_tiers,
    wait_for,
)

FAIL = ["code", "python", "function", "math", "calculate", "solve", "equation", "number", "write"]
LOW, HIGH = 1 / 9, 8 / 9  # the fake judge's Rating [[2]] (the weak model's "I cannot answer that") and [[9]]
ADMIN_KEY = "sk-router-test-admin-quality"


@pytest.fixture(scope="module")
def fakes():
    with judged_fakes(FAIL) as fakes:
        yield fakes


@pytest.fixture(autouse=True)
def healed(fakes):
    yield
    for f in fakes:
        f.heal()


@pytest.fixture(scope="module")
def prompts(datasets_dir) -> list[str]:
    """Real chat prompts: arena-bench-v1's, a share of them with the weak model's fail words."""
    df = pd.read_parquet(datasets_dir / "arena_bench_v1.parquet", columns=["prompt"])
    return [p for p in df["prompt"].drop_duplicates() if len(p) < 2000][:240]


def config(fakes, tmp_path, **quality_block) -> dict:
    weak, strong, judge = fakes
    from learned_router.serving.config import hash_key

    return service_config(
        two_tiers(
            [provider_entry("weak-a", weak, "TEST_WEAK_A_KEY", "weak-model", (0.2, 0.2))],
            [provider_entry("strong-a", strong, "TEST_STRONG_A_KEY", "strong-model", (10.0, 30.0))],
        ),
        judge={
            "provider": {
                "name": "judge",
                "base_url": judge.base_url,
                "model": "judge-model",
                "input_price_per_1m": 1.0,
                "output_price_per_1m": 1.0,
                "timeout_s": 1.0,
            },
            "max_tokens": 64,
            "answer_max_tokens": 64,
        },
        quality={
            "sample": 1.0,
            "store": str(tmp_path / "quality.sqlite"),
            "queue_size": 1000,
            "refresh_s": 0.2,
            **quality_block,
        },
        retry={"attempts": 1},
        admin={"keys": [{"name": "ops", "sha256": hash_key(ADMIN_KEY)}]},
        data_classes={"internal": ["weak-a", "strong-a"], "judged": ["weak-a", "strong-a", "judge"]},
    )


def chat(server, text: str, key: str = CLIENT_KEY, **router) -> httpx.Response:
    body = {"model": "router", "messages": [{"role": "user", "content": text}], "max_tokens": 32}
    if router:
        body["router"] = router
    return server.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})


def jobs(server) -> dict[str, float]:
    """router_shadow_jobs_total by outcome."""
    out = {}
    for line in server.get("/metrics").text.splitlines():
        if line.startswith("router_shadow_jobs_total{"):
            out[line.split('outcome="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return out


def settled(server) -> dict[str, float] | None:
    """`jobs` once no job is queued or being graded (router_shadow_pending 0), else None."""
    text = server.get("/metrics").text
    if "\nrouter_shadow_pending 0.0\n" not in text:
        return None
    return jobs(server)


def shadow_of(server):
    return server.app.state.service.shadow


@pytest.mark.slow
def test_the_estimate_covers_the_true_retained_quality(fakes, tmp_path, prompts):
    with in_process(config(fakes, tmp_path, sample=0.5)) as server:
        shadow_of(server).rng = random.Random(7)
        routed, strong = [], []
        for text in prompts:
            r = chat(server, text)
            assert r.status_code == 200
            went_weak = r.headers["x-router-tier"] == "weak"
            routed.append(LOW if went_weak and fails(text, FAIL) else HIGH)
            strong.append(HIGH)
        truth = np.mean(routed) / np.mean(strong)
        graded = wait_for(lambda: (c := settled(server)) and c.get("graded", 0) >= 0.35 * len(prompts) and c, 60)
        auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
        est = wait_for(
            lambda: (e := server.get("/v1/quality", headers=auth).json())["prompts"] == graded["graded"] and e,
            10,
        )
        assert est["prompts"] == graded["graded"] < len(prompts)  # a sample, not every request
        low, high = est["in_use"]["retained_quality_ci"]
        assert low <= truth <= high, (low, truth, high)
        assert 0.0 < truth < 1.0 and high - low < 0.2  # the fakes make routing cost quality; the interval says how much
        assert est["in_use"]["cost_ratio"] < 1.0  # and the weak answers cost less
        router = est["frontier"]["router"]
        assert router[0]["cost_ratio"] == pytest.approx(1.0) and router[0]["retained_quality"] == pytest.approx(1.0)
        best = est["for_target"]
        assert best is None or best["retained_quality"] >= est["target"]
        assert router[-1]["cost_ratio"] < 1.0  # every prompt re-decided: all weak at the lowest threshold
        # the gauges carry the same figures; the admin key reads the estimate too
        text = server.get("/metrics").text
        gauge = next(x for x in text.splitlines() if x.startswith('router_quality_retained{bound="low"}'))
        assert float(gauge.rsplit(" ", 1)[1]) == pytest.approx(low)
        admin = server.get("/v1/quality", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert admin.status_code == 200 and admin.json()["prompts"] == est["prompts"]
        assert server.get("/v1/quality").status_code == 401
        # every shadow call is the judge's or the other tier's: the client was billed only its own answer
        assert shadow_of(server).store.spent(time.time()) > 0


def test_cap_exclusions_and_data_classes_hold(fakes, tmp_path, prompts):
    cfg = config(fakes, tmp_path, max_usd_per_day=0.02, exclude_clients=["limited"])
    with in_process(cfg) as server:
        for text in prompts[:40]:
            assert chat(server, text).status_code == 200
        assert chat(server, prompts[0], key=OTHER_KEY).status_code == 200
        assert chat(server, prompts[1], data_class="internal").status_code == 200  # may not reach the judge
        counts = wait_for(lambda: (c := settled(server)) and c.get("over_cap", 0) > 0 and c, 30)
        assert counts["excluded_client"] == 1 and counts["data_class"] == 1
        spent = shadow_of(server).store.spent(time.time())
        assert spent <= 0.02 and counts.get("graded", 0) >= 1  # graded until the cap, then none started
        rows = shadow_of(server).store.rows()
        assert all(r["client"] == "test" for r in rows)
    with in_process(config(fakes, tmp_path / "t", exclude_tiers=["strong"])) as server:
        assert chat(server, prompts[2]).status_code == 200
        assert wait_for(lambda: jobs(server).get("excluded_tier"), 10) == 1


def test_a_hanging_or_lying_judge_changes_nothing_for_clients(fakes, tmp_path, prompts):
    weak, strong, judge = fakes
    with in_process(config(fakes, tmp_path, concurrency=1, queue_size=2)) as server:
        judge.control(mode="hang")
        answers = [chat(server, text) for text in prompts[:12]]
        assert all(r.status_code == 200 for r in answers)
        assert max(r.elapsed.total_seconds() for r in answers) < 0.9  # never waits for the judge's 1 s timeout
        counts = wait_for(lambda: (c := jobs(server)).get("judge_failed", 0) >= 1 and c, 20)
        assert counts.get("queue_full", 0) >= 1 and "graded" not in counts
        judge.control(mode="ok", judge_rating=42)  # outside 1-10: no grade
        wait_for(lambda: settled(server) is not None, 20)
        before = jobs(server).get("unparseable", 0)
        assert chat(server, prompts[20]).status_code == 200
        assert wait_for(lambda: jobs(server).get("unparseable", 0) > before, 10)
        judge.control(judge_rating=None, judge_garbage_rate=1.0)  # no verdict at all
        wait_for(lambda: settled(server) is not None, 20)
        before = jobs(server)["unparseable"]
        assert chat(server, prompts[21]).status_code == 200
        assert wait_for(lambda: jobs(server)["unparseable"] > before, 10)
        assert shadow_of(server).store.rows() == []  # nothing guessed


def test_off_without_the_block(fakes, tmp_path):
    cfg = config(fakes, tmp_path)
    del cfg["quality"]
    with in_process(cfg) as server:
        r = server.get("/v1/quality", headers={"Authorization": f"Bearer {CLIENT_KEY}"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "quality_off"


def test_the_estimate_maths_on_known_rows():
    rows = [
        {
            "p_weak": p,
            "went_weak": p >= 0.5,
            "weak_grade": w,
            "strong_grade": 1.0,
            "weak_cost": 1.0,
            "strong_cost": 10.0,
            "task_type": "chat",
        }
        for p, w in [(0.9, 1.0), (0.8, 1.0), (0.6, 0.0), (0.3, 0.0), (0.1, 1.0)] * 4
    ]
    est = quality.estimate(quality.Graded.of(rows), target=0.9)
    now = est["in_use"]
    # went weak: 0.9, 0.8 (grade 1), 0.6 (grade 0); strong: 0.3, 0.1 -> routed 4 of 5 = 0.8; cost (3 + 20) / 50
    assert now["retained_quality"] == pytest.approx(0.8) and now["cost_ratio"] == pytest.approx(23 / 50)
    assert now["retained_quality_ci"][0] <= 0.8 <= now["retained_quality_ci"][1]
    best = est["for_target"]  # weak at >= 0.8 keeps every grade at 28/50 of the cost
    assert best["threshold"] == pytest.approx(0.8) and best["retained_quality"] == pytest.approx(1.0)
    assert best["cost_ratio"] == pytest.approx((2 * 1 + 3 * 10) / 50)
    oracle = est["frontier"]["oracle"]
    assert min(o["cost_ratio"] for o in oracle if o["retained_quality"] >= 1.0) == pytest.approx((3 + 2 * 10) / 50)
    assert est["by_task_type"]["chat"]["prompts"] == 20


def test_a_streamed_answer_is_graded_as_the_client_got_it(fakes, tmp_path, prompts):
    with in_process(config(fakes, tmp_path)) as server:
        body = {"model": "router", "messages": [{"role": "user", "content": "hello there"}], "stream": True}
        with server.stream(
            "POST",
            "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        ) as r:
            assert r.status_code == 200 and "[DONE]" in r.read().decode()
        wait_for(lambda: jobs(server).get("graded"), 10)
        (row,) = shadow_of(server).store.rows()
        assert row["text"] == "hello there" and row["weak_grade"] == pytest.approx(HIGH)
        assert row["strong_grade"] == pytest.approx(HIGH) and row["weak_cost"] > 0 and row["strong_cost"] > 0


@pytest.mark.slow
def test_report_export_and_calibrate_read_the_store(fakes, tmp_path, prompts):
    import shutil

    from typer.testing import CliRunner

    from learned_router.cli import app
    from learned_router.data import load_grades
    from serving_fixtures import ROUTER_DIR

    with in_process(config(fakes, tmp_path)) as server:
        for text in prompts[:60]:
            assert chat(server, text).status_code == 200
        wait_for(lambda: jobs(server).get("graded", 0) >= 60, 30)
    store = tmp_path / "quality.sqlite"
    runner = CliRunner()
    r = runner.invoke(app, ["quality", "report", "--store", str(store), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    assert "60 shadow-graded requests" in r.output and "| quality retained |" in r.output
    assert {p.name for p in (tmp_path / "rep").iterdir()} == {"quality.png", "quality.md", "quality.json"}
    r = runner.invoke(app, ["quality", "export", "--store", str(store), "--out", str(tmp_path / "graded.parquet")])
    assert r.exit_code == 0, r.output
    again = runner.invoke(
        app, ["quality", "report", "--data", str(tmp_path / "graded.parquet"), "--out", str(tmp_path / "rep2")]
    )
    assert (
        again.exit_code == 0
        and (tmp_path / "rep2" / "quality.json").read_text() == (tmp_path / "rep" / "quality.json").read_text()
    )  # the export holds everything the estimate reads
    grades = load_grades([tmp_path / "graded.parquet"], val=0.0, test=0.0).obs  # what train --prior reads
    assert set(grades["model"]) == {router_output(), "strong-model"} and grades["prompt"].nunique() == 60
    router = tmp_path / "router"
    shutil.copytree(ROUTER_DIR, router)
    r = runner.invoke(
        app,
        [
            "calibrate",
            "--router",
            str(router),
            "--prompts",
            str(tmp_path / "graded.parquet"),
            "--quality-target",
            "0.9",
            "--graded",
            str(tmp_path / "graded.parquet"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "keep" in r.output and "with a strong share of" in r.output
    bad = runner.invoke(app, ["quality", "report", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "give one of --store" in bad.output
    table = pd.read_parquet(tmp_path / "graded.parquet")
    for column, value, message in (
        ("weak_grade", "abc", "field 'weak_grade' must be a number in [0, 1] (got 'abc')"),
        ("p_weak", 7.0, "field 'p_weak' must be a number in [0, 1] (got 7.0)"),
        ("strong_cost", float("inf"), "field 'strong_cost' must be a number in [0, 1e+06]"),
        ("went_weak", 0.5, "field 'went_weak' must be 0 or 1"),
    ):
        table.astype({column: object}).assign(**{column: value}).to_csv(tmp_path / "hostile.csv", index=False)
        bad = runner.invoke(
            app, ["quality", "report", "--data", str(tmp_path / "hostile.csv"), "--out", str(tmp_path / "h")]
        )
        assert bad.exit_code == 2 and message in bad.output and not (tmp_path / "h").exists(), bad.output


def test_the_shadow_graded_rows_teach_the_router(fakes, tmp_path, prompts, datasets_dir, mlflow_server, monkeypatch):
    """The loop the rows are for: a week of shadow grades exported, `train --prior`, and the router that comes out
    routes fresh prompts of another source better than the prior (the fakes' weak model fails the FAIL words)."""
    from learned_router.parity import apgr_of
    from learned_router.prior import train_on_prior
    from learned_router.scorer import Router
    from serving_fixtures import ROUTER_DIR

    with in_process(config(fakes, tmp_path)) as server:
        for text in prompts[:200]:
            assert chat(server, text).status_code == 200
        wait_for(lambda: jobs(server).get("graded", 0) >= 200, 60)
        rows = shadow_of(server).store.rows()
    quality.graded_table(rows).to_parquet(tmp_path / "shadow.parquet")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    train_on_prior(ROUTER_DIR, [str(tmp_path / "shadow.parquet")], tmp_path / "ours", "strong-model", router_output())
    fresh = pd.read_parquet(datasets_dir / "arena_battles_1k.parquet", columns=["prompt"])["prompt"].drop_duplicates()
    fresh = [p for p in fresh if len(p) < 2000][:300]
    weak = np.array([LOW if fails(p, FAIL) else HIGH for p in fresh])
    strong = np.full(len(fresh), HIGH)
    prior, ours = Router(ROUTER_DIR), Router(tmp_path / "ours")
    graph = prior.predict(fresh)  # the same graph in both: the trained router adds its top level
    before = apgr_of(graph.pair(router_output()), weak, strong)  # the prior's strong
    after = apgr_of(
        ours.residual.apply(graph, fresh, ours.manifest.models).pair(router_output(), "strong-model"), weak, strong
    )
    assert after > before + 0.1, (before, after)


def test_the_store_keeps_its_retention(tmp_path):
    from learned_router.serving.shadow import COLUMNS, ShadowStore

    store = ShadowStore(tmp_path / "q.sqlite")
    day = 86400.0
    for i, t in enumerate((1 * day, 50 * day, 99 * day)):
        store.add({c: None for c in COLUMNS} | {"id": str(i), "time": t})
        store.spend(0.5, t)
    assert store.prune(10 * day) == 1 and [r["id"] for r in store.rows()] == ["1", "2"]
    assert store.spent(1 * day) == 0.0 and store.spent(50 * day) == 0.5
