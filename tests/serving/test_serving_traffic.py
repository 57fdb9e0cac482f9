"""The traffic record, feedback, traffic export, calibrate and router reload/rollback: real uvicorn, the real router,
fake providers, the real openai client."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pandas as pd
import pytest
import yaml

from clirun import cli
from serving_fixtures import (
    needs_router,
    CLIENT_KEY,
    OTHER_KEY,
    PROVIDER_KEYS,
    ROUTER_DIR,
    FakeProvider,
    free_port,
    provider_entry,
    service_config,
    start_service,
    two_tiers,
    wait_for,
)
from learned_router.data import read_prompt_table
from learned_router.serving.config import TrafficConfig, hash_key
from learned_router.serving.traffic import TrafficLog, export_traffic, open_store

pytestmark = needs_router

ADMIN_KEY = "sk-router-test-admin-987654321"
STRONG_MODEL, WEAK_MODEL = "gpt-4-1106-preview", "mixtral-8x7b-instruct"


def copy_router(dst):
    """The served files of the test router (no checkpoint), in a folder of their own."""
    dst.mkdir(parents=True)
    for name in ("router.json", "tokenizer.json", "model.int8.onnx", "model.onnx", "task_types.yaml"):
        if (ROUTER_DIR / name).is_file():
            shutil.copy(ROUTER_DIR / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("traffic")
    router = copy_router(tmp / "router")
    with (
        FakeProvider(name="strong-a", model=STRONG_MODEL, api_key=PROVIDER_KEYS["TEST_STRONG_A_KEY"]) as strong,
        FakeProvider(name="weak-a", model=WEAK_MODEL, api_key=PROVIDER_KEYS["TEST_WEAK_A_KEY"]) as weak,
    ):
        cfg = service_config(
            two_tiers(
                [provider_entry("weak-a", weak, "TEST_WEAK_A_KEY", WEAK_MODEL, (0.6, 0.6))],
                [provider_entry("strong-a", strong, "TEST_STRONG_A_KEY", STRONG_MODEL, (10, 30))],
            ),
            router={"path": str(router)},
            traffic={"store": str(tmp / "traffic.sqlite"), "never_record": ["secret"], "feedback_per_minute": 30},
            admin={"keys": [{"name": "ops", "sha256": hash_key(ADMIN_KEY)}]},
        )
        cfg["data_classes"] = {"secret": ["strong-a"], "restricted": ["strong-a"]}
        with start_service(cfg) as service:
            yield {
                "url": service.url,
                "strong": strong,
                "weak": weak,
                "store": tmp / "traffic.sqlite",
                "router": router,
                "tmp": tmp,
                "service": service.app.state.service,
            }


def client(stack, key=CLIENT_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack["url"] + "/v1", api_key=key, max_retries=0)


def rows(stack) -> dict[str, dict]:
    with sqlite3.connect(stack["store"]) as db:
        db.row_factory = sqlite3.Row
        return {r["id"]: dict(r) for r in db.execute("SELECT * FROM requests")}


def chat(stack, text: str, key=CLIENT_KEY, **kwargs):
    raw = client(stack, key).chat.completions.with_raw_response.create(
        model="router", messages=[{"role": "user", "content": text}], **kwargs
    )
    return raw.headers["x-request-id"], raw


def test_each_chat_request_is_recorded_with_its_decision_answer_and_cost(stack):
    rid, raw = chat(stack, "Write a limerick about a cat who learns Rust.")
    sid, streamed = chat(stack, "Explain B-trees.", stream=True, stream_options={"include_usage": True})
    assert sum(1 for _ in streamed.parse()) > 1  # the row is written when the stream ends
    secret, _ = chat(stack, "my password is hunter2", extra_headers={"x-router-data-class": "secret"})
    got = wait_for(lambda: (r := rows(stack)).get(rid) and r.get(sid) and r)
    row = got[rid]
    assert row["text"] == "Write a limerick about a cat who learns Rust." and len(row["text_sha256"]) == 64
    assert row["client"] == "test" and row["tier"] == raw.headers["x-router-tier"] and row["outcome"] == "ok"
    assert row["router"] == raw.headers["x-router-version"] and row["status"] == 200
    assert row["model"] in (STRONG_MODEL, WEAK_MODEL) and row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
    assert row["cost_usd"] == pytest.approx(float(raw.headers["x-router-cost-usd"]))
    assert set(json.loads(row["pass_chances"])) == {"weak", "strong"} and row["latency_ms"] > 0
    assert got[sid]["outcome"] == "ok" and got[sid]["completion_tokens"] > 0
    time.sleep(0.2)
    assert secret not in rows(stack)  # a data class that is never recorded leaves no trace, not even a hash
    assert not any(r["text"] == "my password is hunter2" for r in rows(stack).values())


def test_a_failed_request_is_recorded_with_its_error(stack):
    stack["weak"].control(mode="error")
    stack["strong"].control(mode="error")
    try:
        with pytest.raises(openai.APIStatusError) as e:
            client(stack).chat.completions.create(model="router", messages=[{"role": "user", "content": "hello there"}])
        rid = e.value.response.headers.get("x-request-id")
    finally:
        stack["weak"].heal()
        stack["strong"].heal()
    assert e.value.status_code == 502
    failed = wait_for(lambda: [r for r in rows(stack).values() if r["text"] == "hello there"])
    assert failed[0]["outcome"] == "upstream_failed" and failed[0]["status"] == 502 and failed[0]["provider"] is None
    assert rid is None  # an error body carries no request id: nothing to give feedback on


def test_feedback_is_stored_beside_its_request_and_replaced_by_a_second(stack):
    rid, _ = chat(stack, "Suggest a name for a bakery.")

    def post(body, key=CLIENT_KEY):
        return httpx.post(
            stack["url"] + "/v1/feedback", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=10
        )

    assert post({"request_id": rid, "score": 0.25}).json() == {"request_id": rid, "score": 0.25}
    assert post({"request_id": rid, "thumbs": "up"}).json()["score"] == 1.0
    with sqlite3.connect(stack["store"]) as db:
        assert db.execute("SELECT score FROM feedback WHERE request_id = ?", (rid,)).fetchall() == [(1.0,)]
    assert post({"request_id": "0123456789abcdef", "score": 1}).status_code == 404  # unknown
    assert post({"request_id": rid, "score": 1}, OTHER_KEY).status_code == 404  # another client's request
    assert httpx.post(stack["url"] + "/v1/feedback", json={"request_id": rid, "score": 1}).status_code == 401
    for bad in (
        {"request_id": rid, "score": 1.5},
        {"request_id": rid},
        {"request_id": rid, "score": 1, "thumbs": "up"},
        {"request_id": rid, "score": "1"},
        {"request_id": rid, "thumbs": "sideways"},
        {"score": 1},
    ):
        r = post(bad)
        assert r.status_code == 400 and r.json()["error"]["message"], bad
    r = httpx.post(
        stack["url"] + "/v1/feedback",
        content=b'{"request_id": "\xff\xfe", "score": 1}',
        headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        timeout=10,
    )
    assert r.status_code == 400


def test_one_client_flooding_feedback_is_cut_off_at_its_own_limit(stack):
    rid, _ = chat(stack, "Name a river in France.", key=OTHER_KEY)
    started = time.monotonic()
    codes = [
        httpx.post(
            stack["url"] + "/v1/feedback",
            json={"request_id": rid, "score": 0.0},
            headers={"Authorization": f"Bearer {OTHER_KEY}"},
            timeout=10,
        )
        for _ in range(45)
    ]
    refill = (time.monotonic() - started) * 30 / 60  # traffic.feedback_per_minute: 30, a minute's worth at once
    stored = sum(r.status_code == 200 for r in codes)
    refused = [r for r in codes if r.status_code != 200]
    assert 25 <= stored <= 30 + refill + 1 and refused, (stored, refill)  # earlier tests spent a few of its calls
    assert {r.status_code for r in refused} == {429} and refused[0].json()["error"]["code"] == "feedback_limit_exceeded"
    assert int(refused[0].headers["retry-after"]) >= 1
    assert chat(stack, "And one in Spain?", key=OTHER_KEY)[0]  # the client's requests are not refused


def test_traffic_export_writes_prompts_with_feedback(stack, tmp_path):
    rid, _ = chat(stack, "What is the capital of Australia?")
    httpx.post(
        stack["url"] + "/v1/feedback",
        json={"request_id": rid, "thumbs": "down"},
        headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        timeout=10,
    ).raise_for_status()
    restricted, _ = chat(stack, "Our Q3 numbers are...", extra_headers={"x-router-data-class": "restricted"})
    wait_for(lambda: restricted in rows(stack))
    assert rows(stack)[restricted]["data_class"] == "restricted"  # recorded with its class ...
    df, left_out = export_traffic(stack["store"])
    assert restricted not in df["prompt_id"].tolist() and left_out >= 1  # ... and never exported
    assert {"prompt_id", "prompt", "time", "tier", "model", "feedback"} <= set(df.columns)
    assert df.set_index("prompt_id").loc[rid, "feedback"] == 0.0
    assert len(export_traffic(stack["store"], sample=2)[0]) == 2
    assert export_traffic(stack["store"], since=time.time() + 60)[0].empty
    for suffix in (".csv", ".jsonl"):  # written as the name asks, and read back by calibrate's reader
        out = tmp_path / f"traffic{suffix}"
        r = cli("traffic", "export", "--store", stack["store"], "--out", out)
        assert r.returncode == 0, r.stderr
        assert rid in read_prompt_table(out, text_columns=("prompt_id",))["prompt_id"].tolist()
    r = cli("traffic", "export", "--store", stack["store"], "--out", tmp_path / "traffic.txt")
    assert r.returncode == 2 and "expected a .parquet, .jsonl, .csv file" in r.stderr


def test_retention_and_hash_only_text(tmp_path):
    store = tmp_path / "t.sqlite"
    cfg = TrafficConfig(store=str(store), text="hash", retention_days=1.0, max_rows=3)
    log = TrafficLog(cfg)
    for i in range(5):
        log.record(
            {
                "id": f"r{i}",
                "time": time.time() - (3 * 86400 if i == 0 else 0) + i,
                "text": None,
                "text_sha256": log.text_fields(f"prompt {i}")[1],
            },
            None,
        )
    log.close()
    TrafficLog(cfg).close()  # pruned at start: the 3-day-old row, then the oldest beyond 3 rows
    db = open_store(store, create=False)
    assert [r[0] for r in db.execute("SELECT id FROM requests ORDER BY time")] == ["r2", "r3", "r4"]
    assert db.execute("SELECT count(*) FROM requests WHERE text IS NOT NULL").fetchone() == (0,)
    df, textless = export_traffic(store)
    assert df.empty and textless == 3


def admin(stack, path: str, body=None, key=ADMIN_KEY):
    return httpx.request(
        "GET" if path == "router" else "POST",
        f"{stack['url']}/admin/{path}",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )


def test_reload_swaps_a_checked_router_in_without_dropping_requests_and_rollback_restores_it(stack, tmp_path):
    before = admin(stack, "router").json()
    assert admin(stack, "router", key=CLIENT_KEY).status_code == 401  # a client key is not an admin key
    # a broken folder is refused and the router in service stays
    broken = copy_router(tmp_path / "broken")
    (broken / "model.int8.onnx").write_bytes(b"not a model")
    r = admin(stack, "reload", {"path": str(broken)})
    assert r.status_code == 422 and "corrupted" in r.json()["error"]["message"]
    assert admin(stack, "reload", {"path": str(tmp_path / "nowhere")}).status_code == 422
    r = admin(stack, "reload", {"path": "x" * 4000})  # a name no file system takes: refused, never a 500
    assert r.status_code == 422 and "cannot be a router folder (File name too long)" in r.json()["error"]["message"]
    assert admin(stack, "router").json()["router"] == before["router"]
    # a recalibrated copy: another version and threshold, swapped in under load with no request failing
    new = copy_router(tmp_path / "new")
    manifest = json.loads((new / "router.json").read_text())
    manifest["default_threshold"] = 0.0
    (new / "router.json").write_text(json.dumps(manifest))
    failures, done, stop = [], [0], threading.Event()

    def load():
        c = client(stack)
        while not stop.is_set():
            try:
                c.chat.completions.create(
                    model="router", messages=[{"role": "user", "content": "Sort a list in Python."}]
                )
                done[0] += 1
            except Exception as e:  # noqa: BLE001 - any failure is what the test counts
                failures.append(repr(e))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: done[0] >= 10)
        swapped = admin(stack, "reload", {"path": str(new)}).json()
        n = done[0]
        wait_for(lambda: done[0] >= n + 10)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert (
        swapped["previous"] == before["router"]
        and swapped["router"] != before["router"]
        and swapped["threshold"] == 0.0
    )
    assert "workers" not in swapped  # one process: swapped in place
    _, raw = chat(stack, "Prove Fermat's little theorem.")
    assert raw.headers["x-router-version"] == swapped["router"] and raw.headers["x-router-tier"] == "weak"
    metrics = httpx.get(stack["url"] + "/metrics").text
    assert f'router_info{{version="{swapped["router"]}"}} 1.0' in metrics
    assert f'router_info{{version="{before["router"]}"}} 0.0' in metrics
    back = admin(stack, "rollback").json()
    assert back["router"] == before["router"] and back["previous"] == swapped["router"]
    assert chat(stack, "hi")[1].headers["x-router-version"] == before["router"]


def test_a_swapped_router_restarts_the_drift_signals_it_changes_against_its_own_calibration(stack, tmp_path):
    drift = lambda: httpx.get(stack["url"] + "/v1/drift", headers={"Authorization": f"Bearer {CLIENT_KEY}"}).json()  # noqa: E731
    for text in ("hi", "Sort a list in Python.", "Prove that there are infinitely many primes."):
        chat(stack, text)
    before = drift()
    assert before["requests"] >= 3 and before["reference"]["pass_chance"]["edges"]
    # a copy whose calibration mix put every pass chance lower: another version, another reference
    new = copy_router(tmp_path / "recalibrated")
    manifest = json.loads((new / "router.json").read_text())
    manifest["calibration"]["thresholds"] = {
        k: [round(t * t, 6) for t in v] for k, v in manifest["calibration"]["thresholds"].items()
    }
    (new / "router.json").write_text(json.dumps(manifest))
    swapped = admin(stack, "reload", {"path": str(new)}).json()
    after = drift()
    assert after["requests"] == 0 and swapped["router"] in after["reference_source"]
    assert set(after["reference"]) <= {"pass_chance", "task_type"}  # the tier's reference comes from the new window
    edges = before["reference"]["pass_chance"]["edges"]
    assert after["reference"]["pass_chance"]["edges"] == pytest.approx([e * e for e in edges], abs=1e-3)
    chat(stack, "hi")
    assert drift()["requests"] == 1
    assert admin(stack, "rollback").json()["router"] == swapped["previous"]
    back = drift()
    assert back["requests"] == 0 and back["reference"]["pass_chance"]["edges"] == pytest.approx(edges)


def test_admin_endpoints_are_off_without_admin_keys(tmp_path):
    with FakeProvider(name="s", model=STRONG_MODEL) as strong, FakeProvider(name="w", model=WEAK_MODEL) as weak:
        cfg = service_config(
            two_tiers(
                [provider_entry("w", weak, "TEST_WEAK_A_KEY", WEAK_MODEL, (0.6, 0.6))],
                [provider_entry("s", strong, "TEST_STRONG_A_KEY", STRONG_MODEL, (10, 30))],
            )
        )
        with start_service(cfg) as service:
            r = httpx.post(service.url + "/admin/reload", headers={"Authorization": f"Bearer {CLIENT_KEY}"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "admin_off"
            r = httpx.post(
                service.url + "/v1/feedback",
                json={"request_id": "x", "score": 1},
                headers={"Authorization": f"Bearer {CLIENT_KEY}"},
            )
            assert r.status_code == 404 and r.json()["error"]["code"] == "traffic_off"


@pytest.mark.slow
def test_calibrate_fits_the_table_to_a_prompt_file_and_checks_it_on_held_out_prompts(tmp_path, datasets_dir):
    router = copy_router(tmp_path / "router")
    before = json.loads((router / "router.json").read_text())
    prompts = pd.read_parquet(datasets_dir / "arena_battles_1k.parquet", columns=["prompt"]).drop_duplicates().head(400)
    prompts.to_parquet(tmp_path / "traffic.parquet")
    r = cli("calibrate", "--router", router, "--prompts", tmp_path / "traffic.parquet", "--strong-fraction", "0.3")
    assert r.returncode == 0, r.stderr
    after = json.loads((router / "router.json").read_text())
    assert (
        "traffic.parquet" in after["calibration"]["mix"]
        and after["calibration"]["thresholds"] != before["calibration"]["thresholds"]
    )
    assert after["files"] == before["files"] and after["default_threshold"] != before["default_threshold"]
    weak = next(line for line in r.stdout.splitlines() if line.startswith(before["weak"][:40]))
    shares = r.stdout.splitlines()[2].split("->)")[1].split()
    achieved = dict(zip(map(float, shares), map(float, weak.split()[-len(shares) :])))
    assert abs(achieved[0.3] - 0.3) < 0.1, r.stdout  # ~200 held-out prompts: a sampling error of ~0.03
    from learned_router.scorer import Router

    assert Router(router).manifest.threshold_for(0.3) == pytest.approx(after["default_threshold"], abs=1e-4)
    # bad input: one line, exit 2, router.json untouched
    (tmp_path / "few.txt").write_text("one\ntwo\nthree\n")
    for args in (
        ("--prompts", tmp_path / "few.txt"),
        ("--prompts", tmp_path / "none.parquet"),
        ("--prompts", tmp_path / "traffic.parquet", "--strong-fraction", "1.5"),
    ):
        bad = cli("calibrate", "--router", router, *args)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr, (
            bad.stderr
        )
    assert json.loads((router / "router.json").read_text()) == after
    bad = cli("calibrate", "--router", router, "--prompts", tmp_path / "traffic.parquet", "--max-seq-length", "4")
    assert bad.returncode == 2 and "--max-seq-length must be between 16 and 512 tokens, got 4" in bad.stderr
    # a token budget: the folder reads that many tokens from now on, calibrated at it
    r = cli("calibrate", "--router", router, "--prompts", tmp_path / "traffic.parquet", "--max-seq-length", "64")
    assert r.returncode == 0, r.stderr
    short = json.loads((router / "router.json").read_text())
    assert (
        short["encoder"]["max_seq_length"] == 64
        and short["calibration"]["thresholds"] != after["calibration"]["thresholds"]
    )
    read = Router(router)
    long = "Explain the history of the printing press in detail. " * 40
    assert read.max_seq_length == read.n_tokens(long) == 64 and read.check.passed  # its probes are judged alike


def served_version(url: str) -> str | None:
    """The router version a service at `url` routes "hi" with; None while it does not answer."""
    try:
        r = httpx.post(
            url + "/v1/route",
            json={"model": "router", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
            timeout=5,
        )
        return r.json()["router"] if r.status_code == 200 else None
    except httpx.HTTPError:
        return None


@dataclass
class Served:
    """A `learned-router serve` process and its URL; `output`, once it has ended: what it printed."""

    proc: subprocess.Popen
    url: str
    output: str = ""


@contextmanager
def serve_process(tmp_path: Path, router: Path, *options: str, **config):
    """`learned-router serve` in a process of its own, with these options, on a config of two fake tiers and the router
    folder `router`; ended on leaving."""
    with FakeProvider(name="s", model=STRONG_MODEL) as strong, FakeProvider(name="w", model=WEAK_MODEL) as weak:
        cfg = service_config(
            two_tiers(
                [provider_entry("w", weak, "TEST_WEAK_A_KEY", WEAK_MODEL, (0.6, 0.6))],
                [provider_entry("s", strong, "TEST_STRONG_A_KEY", STRONG_MODEL, (10, 30))],
            ),
            router={"path": str(router)},
            **config,
        )
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "learned_router", "serve", "--config", tmp_path / "config.yaml", "--port", str(port)]
            + ["--log-level", "warning", *options],
            env={**os.environ, **PROVIDER_KEYS},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        served = Served(proc, f"http://127.0.0.1:{port}")
        try:
            yield served
        finally:
            proc.terminate()
            served.output = proc.communicate(timeout=60)[0]


@pytest.mark.slow
def test_sighup_reloads_the_router_from_its_folder(tmp_path):
    router = copy_router(tmp_path / "router")
    with serve_process(tmp_path, router) as served:
        first = wait_for(lambda: served_version(served.url), timeout=60)
        manifest = json.loads((router / "router.json").read_text())
        manifest["default_threshold"] = 0.01
        (router / "router.json").write_text(json.dumps(manifest))
        served.proc.send_signal(signal.SIGHUP)
        second = wait_for(lambda: (v := served_version(served.url)) != first and v, timeout=30)
        (router / "model.int8.onnx").write_bytes(b"broken")  # a failed reload keeps the router in service
        served.proc.send_signal(signal.SIGHUP)
        time.sleep(2)
        assert served_version(served.url) == second and served.proc.poll() is None
    out = served.output
    assert "router reload failed" in out and "corrupted" in out and "Traceback" not in out


@pytest.mark.slow
def test_with_several_workers_an_admin_reload_replaces_every_worker_and_what_one_cannot_do_for_all_is_refused(tmp_path):
    router = copy_router(tmp_path / "router")
    admins = {"keys": [{"name": "ops", "sha256": hash_key(ADMIN_KEY)}]}
    with serve_process(tmp_path, router, "--workers", "2", admin=admins) as served:
        stack, pid = {"url": served.url}, served.proc.pid

        def version():
            return served_version(served.url)

        def workers() -> set[int]:
            """The worker processes uvicorn's supervisor (the served process) runs now."""
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                return {int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()}
            except OSError:  # a worker that went between the two reads
                return set()

        first = wait_for(version, timeout=90)
        before = wait_for(lambda: w if len(w := workers()) == 2 else None, timeout=60)
        r = admin(stack, "rollback")
        assert r.status_code == 409 and r.json()["error"]["code"] == "rollback_unavailable"
        for other in (str(copy_router(tmp_path / "other")), "a\u0000b"):
            r = admin(stack, "reload", {"path": other})
            assert r.status_code == 409 and "2 worker processes" in r.json()["error"]["message"]
        manifest = json.loads((router / "router.json").read_text())
        manifest["default_threshold"] = 0.01
        (router / "router.json").write_text(json.dumps(manifest))
        r = admin(stack, "reload")
        assert r.status_code == 202 and r.json()["workers"] == 2 and r.json()["previous"] == first, r.text
        second = r.json()["router"]
        assert second != first
        wait_for(lambda: len(w := workers()) == 2 and not w & before, timeout=120)  # every worker replaced
        assert all(version() == second for _ in range(20))
        config = (tmp_path / "config.yaml").read_text()
        (tmp_path / "config.yaml").write_text(config + "router: [broken\n")  # a config that no longer loads:
        after = workers()
        assert admin(stack, "reload").status_code == 202
        wait_for(lambda: len(workers()) > 2, timeout=30)  # a replacement is tried ...
        wait_for(lambda: workers() == after, timeout=90)  # ... fails, and the workers serving stay
        assert all(version() == second for _ in range(10))
        (tmp_path / "config.yaml").write_text(config)
        (router / "model.int8.onnx").write_bytes(b"broken")  # a folder that fails the check restarts nothing
        r = admin(stack, "reload")
        assert r.status_code == 422 and "corrupted" in r.json()["error"]["message"]
        time.sleep(2)
        assert all(version() == second for _ in range(10)) and served.proc.poll() is None
    assert "worker not started: " in served.output and "not valid YAML" in served.output
    assert "Traceback" not in served.output, served.output
