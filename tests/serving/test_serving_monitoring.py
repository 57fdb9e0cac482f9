"""Drift and monitoring: a shift in real traffic moves the drift gauges and a stable mix does not; the shipped alert
rules parse and, like the Grafana dashboard, query only metrics the service exports."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from learned_router.serving.config import ConfigError, DriftConfig
from learned_router.manifest import RouterFolder
from learned_router.serving.drift import DriftMonitor, calibration_reference, psi, read_reference
from learned_router.serving.errors import APIError
from serving_fixtures import (
    needs_router,
    CLIENT_KEY,
    ROOT,
    ROUTER_DIR,
    FakeProvider,
    provider_entry,
    service_config,
    in_process,
    two_tiers,
)
from learned_router.serving.config import hash_key

DATASETS = ROOT.parent / "shared" / "datasets"
MIXED = ("alpaca_eval", "arena_battles_1k", "routellm_mmlu", "routellm_gsm8k", "routerarena", "arena_hard_v01_battles")
WINDOW, PER_SOURCE = 300, 50
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
ADMIN_KEY = "sk-router-test-admin-drift"
ALERTS, DASHBOARD = ROOT / "serving" / "alerts.yaml", ROOT / "serving" / "grafana-dashboard.json"

needs_service = pytest.mark.skipif(
    not (ROUTER_DIR / "router.json").is_file() or not DATASETS.is_dir(),
    reason=f"no trained router at {ROUTER_DIR} or no shared datasets",
)


@pytest.fixture(scope="module")
def traffic() -> dict[str, list[str]]:
    """Two disjoint mixed samples (PER_SOURCE prompts of each of six sources) and WINDOW coding prompts (MBPP)."""
    a, b = [], []
    for name in MIXED:
        prompts = pd.read_parquet(DATASETS / f"{name}.parquet", columns=["prompt"])["prompt"].drop_duplicates()
        picked = prompts.sample(2 * PER_SOURCE, random_state=0).tolist()
        a += picked[:PER_SOURCE]
        b += picked[PER_SOURCE:]
    code = pd.read_parquet(DATASETS / "routerbench_mbpp.parquet", columns=["prompt"])["prompt"].drop_duplicates()
    return {"mixed": a, "mixed_again": b, "code": code.sample(WINDOW, random_state=0).tolist()}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("monitoring")
    with (
        FakeProvider(name="weak-a", model="weak-model") as weak,
        FakeProvider(name="strong-a", model="strong-model") as strong,
    ):
        cfg = service_config(
            two_tiers(
                [provider_entry("weak-a", weak, None, "weak-model", (0.6, 0.6))],
                [provider_entry("strong-a", strong, None, "strong-model", (10, 30))],
            ),
            budget={"period": "day", "usd": 100, "store": str(tmp / "spend.sqlite")},
            drift={"window": WINDOW, "min_requests": 200, "threshold": 0.25, "reference": str(tmp / "reference.json")},
            admin={"keys": [{"name": "ops", "sha256": hash_key(ADMIN_KEY)}]},
        )
        with in_process(cfg) as s:
            yield {"http": s, "config": cfg, "reference": tmp / "reference.json"}


def send(http, prompts: list[str]) -> None:
    with ThreadPoolExecutor(8) as pool:
        statuses = list(
            pool.map(
                lambda p: (
                    http.post(
                        "/v1/route",
                        json={"model": "router", "messages": [{"role": "user", "content": p}]},
                        headers=AUTH,
                    ).status_code
                ),
                prompts,
            )
        )
    assert statuses == [200] * len(prompts)


def gauges(http) -> dict[str, float]:
    text = http.get("/metrics").text
    return {
        m.group(1): float(m.group(2)) for m in re.finditer(r'^router_drift_psi\{signal="(\w+)"\} (\S+)$', text, re.M)
    }


@needs_service
def test_code_only_traffic_after_a_mixed_reference_moves_the_drift_gauge_and_a_stable_mix_does_not(
    service, traffic, caplog
):
    http = service["http"]
    send(http, traffic["mixed"])
    r = http.post("/v1/drift/reference", headers=AUTH)  # a client key cannot say what counts as drift
    assert r.status_code == 401 and not service["reference"].exists(), r.text
    r = http.post("/v1/drift/reference", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200 and r.json()["requests"] == WINDOW
    assert json.loads(service["reference"].read_text())["task_type"] == r.json()["task_type"]
    assert len(r.json()["task_type"]) >= 5  # a mix: most types are there

    with caplog.at_level(logging.INFO, logger="learned_router.serving"):
        send(http, traffic["mixed_again"])  # other prompts of the same sources
        stable = gauges(http)
        assert set(stable) == {"pass_chance", "task_type", "tier"}
        assert all(v < 0.25 for v in stable.values()), stable
        assert not [m for m in caplog.messages if m.startswith("drift:") and "PSI" in m]

        send(http, traffic["code"])
        shifted = gauges(http)
    assert shifted["task_type"] > 0.25 and shifted["pass_chance"] > 0.25, shifted  # coding prompts score apart too
    assert any(m.startswith("drift: task_type PSI") and "> 0.25" in m for m in caplog.messages)
    state = http.get("/v1/drift", headers=AUTH).json()
    assert (
        state["psi"]["task_type"] == pytest.approx(shifted["task_type"]) and state["window"]["task_type"]["code"] > 0.8
    )


@needs_service
def test_a_restarted_service_reads_its_reference_and_the_alerts_query_what_it_exports(service):
    from learned_router.serving.config import parse_config
    from learned_router.serving.service import Service

    s = Service(parse_config(service["config"]))
    assert s.drift.source == str(service["reference"]) and set(s.drift.reference) == {
        "pass_chance",
        "task_type",
        "tier",
    }

    families = {f.name: f.type for f in text_string_to_metric_families(service["http"].get("/metrics").text)}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    exported = {name + s for name, kind in families.items() for s in suffixes.get(kind, ("",))}
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [r["expr"] for r in rules] + [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for q in queries for name in re.findall(r"\b(router_[a-z0-9_]+)\b", q)}
    assert used and used <= exported, used - exported
    for needed in (
        "router_drift_psi",
        "router_fallbacks_total",
        "router_upstream_errors_total",
        "router_budget_pace",
        "router_circuit_state",
        "router_quality_retained",
    ):
        assert any(needed in r["expr"] for r in rules), needed
    assert any("0.02" in r["expr"] for r in rules if "upstream_errors" in r["expr"])
    panels = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for needed in (
        "by (tier)",
        "by (task_type)",
        "router_cost_usd_total",
        "histogram_quantile(0.99",
        "router_fallbacks_total",
        "router_quality_retained",
    ):
        assert needed in panels, needed


def test_alert_rules_parse():
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    assert all({"alert", "expr", "for", "labels", "annotations"} <= set(r) for r in rules)
    for r in rules:  # a sanity check without promtool: brackets balance
        assert r["expr"].count("(") == r["expr"].count(")") and r["expr"].count("[") == r["expr"].count("]"), r["alert"]
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (apt-get install prometheus): only the YAML was checked")
    out = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert out.returncode == 0 and f"SUCCESS: {len(rules)} rules found" in out.stdout, out.stdout + out.stderr


def test_psi_and_the_window():
    assert psi({"a": 0.5, "b": 0.5}, {"a": 50, "b": 50}) == 0.0
    assert psi({"a": 0.5, "b": 0.5}, {"a": 100}) > 3  # one bucket emptied
    assert math.isnan(psi({"a": 1.0}, {}))
    m = DriftMonitor(DriftConfig(window=20, min_requests=10))
    for _ in range(9):
        m.observe(0.5, "code", "weak")
    assert all(math.isnan(v) for v in m.psi().values())  # too few requests, and no reference yet
    with pytest.raises(APIError, match="holds 9 requests; a reference needs at least 10"):
        m.snapshot()
    for _ in range(11):
        m.observe(0.5, "math", "strong")
    assert m.reference["tier"] == {"weak": 0.45, "strong": 0.55}  # the first full window
    for _ in range(20):
        m.observe(0.9, "code", "weak")
    assert len(m.window) == 20 and m.psi()["tier"] > 1 and m.drifted["tier"]
    m.cfg = DriftConfig(window=20, min_requests=10, reference="/nonexistent/folder/reference.json")
    before = m.reference
    with pytest.raises(APIError, match="cannot be written .*unchanged") as e:
        m.snapshot()
    assert m.reference is before and e.value.status == 503  # the folder went away while serving
    with pytest.raises(
        ConfigError, match="drift.reference /nonexistent/folder/reference.json: its folder is missing or not writable"
    ):
        DriftMonitor(m.cfg)  # found at start


def test_a_router_change_keeps_the_task_types_reference_and_takes_the_tiers_from_the_new_window(caplog):
    m = DriftMonitor(DriftConfig(window=20, min_requests=10), {"edges": [0.5], "shares": {"0": 0.5, "1": 0.5}})
    for _ in range(20):
        m.observe(0.9, "code", "weak")
    assert m.drifted["pass_chance"] and m.reference["tier"] == {"weak": 1.0}
    with caplog.at_level(logging.INFO, logger="learned_router.serving"):
        m.router_changed({"edges": [0.95], "shares": {"0": 0.5, "1": 0.5}}, "new@abc")
    assert len(m.window) == 0 and not any(m.drifted.values()) and all(math.isnan(v) for v in m.psi().values())
    assert m.reference == {"task_type": {"code": 1.0}, "pass_chance": {"edges": [0.95], "shares": {"0": 0.5, "1": 0.5}}}
    assert "new@abc" in m.source and any("new@abc serves" in r.message for r in caplog.records)
    for i in range(20):
        m.observe(0.9 + 0.1 * (i % 2), "code", "strong")
    assert m.reference["tier"] == {"strong": 1.0} and m.reference["task_type"] == {"code": 1.0}
    assert m.psi()["pass_chance"] == pytest.approx(0.0) and m.psi()["tier"] == pytest.approx(0.0)
    m.router_changed(None, "plain@def")  # no calibration mix: the pass chance too comes from the first full window
    for _ in range(20):
        m.observe(0.3, "code", "weak")
    assert m.reference["pass_chance"]["edges"] == [0.3] and m.psi()["tier"] == pytest.approx(0.0)


@needs_router
def test_the_calibration_mix_gives_a_pass_chance_reference_in_deciles():
    manifest = RouterFolder(ROUTER_DIR).manifest()
    ref = calibration_reference(manifest, manifest.weak)
    assert ref["edges"] == sorted(ref["edges"]) and len(ref["edges"]) == 9
    assert sum(ref["shares"].values()) == pytest.approx(1.0) and max(ref["shares"].values()) == pytest.approx(
        0.1, abs=0.01
    )
    assert calibration_reference(manifest, "no-such-output") is None


def test_a_reference_file_that_is_not_one_is_a_config_error(tmp_path):
    bad = tmp_path / "ref.json"
    bad.write_text('{"pass_chance": [1, 2]}')
    with pytest.raises(ConfigError, match="not a drift reference"):
        read_reference(bad)
