"""The routing rules end to end: data classes, latency budgets, explanations, a multi-tier router; fake providers."""

from __future__ import annotations

import re

import openai
import pytest

from learned_router import Router
from learned_router.serving.config import ConfigError, parse_config
from learned_router.serving.service import Service
from serving_fixtures import (
    needs_router,
    CLIENT_KEY,
    ROOT,
    ROUTER_DIR,
    FakeProvider,
    provider_entry,
    service_config,
    in_process,
    openai_client,
    two_tiers,
)

pytestmark = needs_router

NAMES = ["weak-a", "weak-b", "strong-a", "strong-c"]
DATA_CLASSES = {"restricted": ["weak-a", "strong-c"], "internal": ["strong-a"]}
TIERS_ROUTER = ROOT / "models" / "default"


@pytest.fixture(scope="module")
def fakes():
    fakes = {n: FakeProvider(name=n, model=f"{n}-model") for n in NAMES}
    for f in fakes.values():
        f.__enter__()
    yield fakes
    for f in fakes.values():
        f.__exit__(None, None, None)


@pytest.fixture(scope="module")
def router() -> Router:
    return Router(ROUTER_DIR)


@pytest.fixture
def healthy(fakes):
    """Every fake answers at once, with fresh stats."""
    for f in fakes.values():
        f.control(mode="ok", latency_ms=0, chunk_delay_ms=0, fail_rate=0, error_status=503, reset_stats=True)
    return fakes


@pytest.fixture
def service(healthy, router):
    """A fresh service (closed circuits, empty latency windows) on the healthy fakes."""
    fakes = healthy
    entry = {
        n: provider_entry(
            n,
            fakes[n],
            None,
            f"{n}-model",
            (10, 30) if n.startswith("strong") else (0.6, 0.6),
            timeout_s=2,
            connect_timeout_s=1,
            context_window=128000 if n.startswith("strong") else 2000,
        )
        for n in NAMES
    }
    cfg = service_config(
        two_tiers([entry["weak-a"], entry["weak-b"]], [entry["strong-a"], entry["strong-c"]]),
        data_classes=DATA_CLASSES,
        latency={"window": 10, "min_samples": 3},
        circuit_breaker={"failures": 3, "cooldown_s": 60},
    )
    with in_process(cfg, router=router) as s:
        yield s


@pytest.fixture
def client(service) -> openai.OpenAI:
    return openai_client(service, CLIENT_KEY)


def ask(client, text: str, model: str = "router-0", **kw):
    return client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": text}], **kw
    )


def refused(client, text: str, model: str = "router-0", **kw) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as e:
        ask(client, text, model, **kw)
    return e.value.status_code, e.value.response.json()["error"]


def metric(http, name: str, **labels) -> float:
    """The sum of `name`'s series that carry `labels` (others, such as task_type, may differ); NaN when none does."""
    want = {f'{k}="{v}"' for k, v in labels.items()}
    values = [
        float(m.group(2))
        for m in re.finditer(rf"^{name}{{(.*)}} (\S+)$", http.get("/metrics").text, re.M)
        if want <= set(m.group(1).split(","))
    ]
    return sum(values) if values else float("nan")


RESTRICTED = {"extra_body": {"router": {"data_class": "restricted"}}}


# ---- data classes -----------------------------------------------------------------------------------


def test_restricted_data_reaches_only_its_providers_on_fallback_and_with_circuits_open(client, service, fakes):
    assert ask(client, "RESTRICTED record 0", **RESTRICTED).headers["x-router-provider"] == "weak-a"
    r = ask(client, "RESTRICTED record 1", "router-1", extra_headers={"x-router-data-class": "restricted"})
    assert r.headers["x-router-provider"] == "strong-c"  # strong-a comes first in its tier, but may not see this class

    fakes["weak-a"].control(mode="error")
    r = ask(client, "RESTRICTED record 2", **RESTRICTED)
    assert r.headers["x-router-tier"] == "weak" and r.headers["x-router-provider"] == "strong-c"  # not weak-b
    assert ask(client, "an open question").headers["x-router-provider"] == "weak-b"  # unclassified data may go anywhere
    assert (
        metric(service, "router_circuit_state", provider="weak-a") == 2
    )  # 4 failed attempts: weak-a's circuit is open

    fakes["strong-c"].control(mode="error")  # every allowed provider is down; weak-b and strong-a are healthy
    status, err = refused(client, "RESTRICTED record 3", **RESTRICTED)
    assert status == 503 and err["code"] == "data_class_unavailable"
    assert (
        err["message"]
        == "no provider allowed for data class 'restricted' answered: weak/weak-a: circuit open; strong/strong-c: HTTP 503"
    )
    refused(client, "RESTRICTED record 4", **RESTRICTED)  # strong-c's third failed attempt opens its circuit too
    status, err = refused(client, "RESTRICTED record 5", **RESTRICTED)
    assert status == 503 and err["code"] == "data_class_unavailable"
    assert "weak/weak-a: circuit open; strong/strong-c: circuit open" in err["message"]
    assert ask(client, "another open question", "router-1").headers["x-router-provider"] == "strong-a"

    for name in ("weak-b", "strong-a"):
        assert fakes[name].stats()["prompts"] and not [p for p in fakes[name].stats()["prompts"] if "RESTRICTED" in p]
    for name in ("weak-a", "strong-c"):
        assert [p for p in fakes[name].stats()["prompts"] if "RESTRICTED" in p]
        assert "router" not in fakes[name].stats()["last_body"]  # the routing options are not forwarded


def test_a_tier_without_an_allowed_provider_is_skipped_by_the_data_class_rule(client, service):
    r = ask(client, "internal numbers", extra_headers={"x-router-data-class": "internal"})
    assert r.headers["x-router-tier"] == "strong" and r.headers["x-router-provider"] == "strong-a"
    assert r.headers["x-router-rule"] == "data_class" and r.headers["x-router-skipped"] == "weak=data_class"
    d = service.post(
        "/v1/route",
        json={
            "model": "router-0",
            "messages": [{"role": "user", "content": "x"}],
            "router": {"data_class": "internal"},
        },
        headers={"Authorization": f"Bearer {CLIENT_KEY}"},
    ).json()
    assert d["data_class"] == "internal" and d["fallback_chain"] == ["strong-a"]
    assert d["skipped"] == [
        {
            "tier": "weak",
            "rule": "data_class",
            "detail": "weak-a: not allowed for data class 'internal'; weak-b: not allowed for data class 'internal'",
        }
    ]


BAD_OPTIONS = [
    ({"router": {"data_class": "secret"}}, {}, "unknown data class 'secret'; configured classes: internal, restricted"),
    ({}, {"x-router-data-class": "secret"}, "unknown data class 'secret'"),
    ({"router": {"data_class": "restricted"}}, {"x-router-data-class": "internal"}, "disagree"),
    ({"router": {"latency_budget_ms": -5}}, {}, "router.latency_budget_ms: Input should be greater than 0"),
    ({"router": {"latency_budget_ms": "fast"}}, {}, "router.latency_budget_ms"),
    ({}, {"x-router-latency-budget-ms": "soon"}, "x-router-latency-budget-ms: must be a positive number"),
    ({"router": {"priority": 1}}, {}, "router.priority: Extra inputs are not permitted"),
    ({"router": "restricted"}, {}, "router: Input should be a valid dictionary"),
]


def test_bad_routing_options_are_400(service):
    for path in ("/v1/chat/completions", "/v1/route"):
        for body, headers, fragment in BAD_OPTIONS:
            r = service.post(
                path,
                json={"model": "router", "messages": [{"role": "user", "content": "hi"}], **body},
                headers={"Authorization": f"Bearer {CLIENT_KEY}", **headers},
            )
            assert r.status_code == 400 and fragment in r.json()["error"]["message"], (path, r.text)


# ---- latency budgets ------------------------------------------------------------------------------


def test_a_latency_budget_skips_slow_providers_then_slow_tiers(client, service, fakes):
    fakes["weak-a"].control(latency_ms=200)
    for i in range(3):
        assert ask(client, f"warm up {i}").headers["x-router-provider"] == "weak-a"
    assert metric(service, "router_provider_latency_p95_seconds", provider="weak-a") >= 0.2
    r = ask(client, "in a hurry", extra_headers={"x-router-latency-budget-ms": "120"})
    assert r.headers["x-router-tier"] == "weak" and r.headers["x-router-provider"] == "weak-b"
    assert fakes["weak-a"].stats()["requests"] == 3  # the slow provider was not even tried

    fakes["weak-a"].control(mode="error")  # fast failures say nothing about latency: weak-a's p95 stays 200 ms
    fakes["weak-b"].control(latency_ms=200)
    for i in range(3):
        assert ask(client, f"warm up b {i}").headers["x-router-provider"] == "weak-b"
    fakes["weak-a"].control(mode="ok")
    r = ask(client, "in a hurry", extra_body={"router": {"latency_budget_ms": 120}})
    assert r.headers["x-router-tier"] == "strong" and r.headers["x-router-provider"] == "strong-a"
    assert r.headers["x-router-rule"] == "latency" and r.headers["x-router-skipped"] == "weak=latency"
    assert "router" not in fakes["strong-a"].stats()["last_body"]
    assert ask(client, "no hurry").headers["x-router-provider"] == "weak-b"  # without a budget, weak as before


def test_fallbacks_get_only_what_is_left_of_the_latency_budget(client, service, fakes):
    fakes["strong-a"].control(mode="429", retry_after=30, latency_ms=200)  # fails after 200 ms, no retry
    fakes["strong-c"].control(latency_ms=200)  # answers after 200 ms: later than the ~100 ms left
    status, err = refused(client, "quick", "router-1", extra_headers={"x-router-latency-budget-ms": "300"})
    assert status == 504 and err["code"] == "latency_budget_exceeded"
    assert "the latency budget of 300 ms was spent" in err["message"] and "strong/strong-a: HTTP 429" in err["message"]
    assert "strong/strong-c: cut off after" in err["message"]
    assert fakes["strong-c"].stats()["requests"] == 1  # tried, with what was left instead of its 2 s timeout
    assert fakes["weak-a"].stats()["requests"] == 0  # the budget was spent: no further fallbacks
    assert metric(service, "router_circuit_state", provider="strong-c") == 0  # a cut-off is not the provider's fault
    assert ask(client, "quick", "router-1").headers["x-router-provider"] == "strong-c"  # without a budget it answers

    fakes["strong-a"].control(mode="hang", latency_ms=0)
    status, err = refused(client, "quick", "router-1", extra_body={"router": {"latency_budget_ms": 300}})
    assert status == 504 and "strong/strong-a: cut off after" in err["message"]
    assert fakes["strong-c"].stats()["requests"] == 2  # not tried this time: nothing was left


# ---- explanations ---------------------------------------------------------------------------------


def test_headers_and_route_explain_score_context_and_circuit_decisions(client, service, fakes):
    r = ask(client, "What is the capital of France?", "router-0.25")
    p_weak = float(r.headers["x-router-pass-chances"].split(", ")[0].removeprefix("weak="))
    assert (
        r.headers["x-router-tier"] == ("weak" if p_weak >= 0.25 else "strong") and r.headers["x-router-rule"] == "score"
    )
    assert r.headers["x-router-threshold"] == r.headers["x-router-effective-threshold"] == "0.2500"
    assert float(r.headers["x-router-estimated-cost-usd"]) > 0 and "x-router-cost-usd" in r.headers

    r = ask(client, "word " * 2000)  # ~2500 tokens: more than the weak providers' 2000
    assert (r.headers["x-router-tier"], r.headers["x-router-rule"], r.headers["x-router-skipped"]) == (
        "strong",
        "context",
        "weak=context",
    )

    for f in ("weak-a", "weak-b"):
        fakes[f].control(mode="error")
    ask(client, "open the circuits"), ask(client, "open the circuits")  # served by strong after the weak tier fails
    r = ask(client, "after the breakdown")
    assert (r.headers["x-router-tier"], r.headers["x-router-rule"], r.headers["x-router-skipped"]) == (
        "strong",
        "circuit_open",
        "weak=circuit_open",
    )
    d = service.post(
        "/v1/route",
        json={"model": "router-0", "messages": [{"role": "user", "content": "x"}]},
        headers={"Authorization": f"Bearer {CLIENT_KEY}"},
    ).json()
    assert d["rule"] == "circuit_open" and d["tier"] == "strong" and d["fallback_chain"] == ["strong-a", "strong-c"]
    assert d["skipped"] == [
        {"tier": "weak", "rule": "circuit_open", "detail": "weak-a: circuit open; weak-b: circuit open"}
    ]
    assert "weak cannot take it" in d["reason"] and d["pass_chances"]["strong"] == 1.0
    assert metric(service, "router_decisions_total", rule="circuit_open", tier="strong") >= 2


# ---- a multi-tier router ---------------------------------------------------------------------------


def test_a_multi_tier_router_picks_the_cheapest_tier_that_clears_the_threshold(healthy):
    fakes = healthy
    tiers_router = Router(TIERS_ROUTER)
    scored = {"small": "gemma-2b-it", "medium": "gemma-7b-it"}
    entry = {
        n: provider_entry(n, fakes[n], None, f"{n}-model", price)
        for n, price in (("weak-a", (0.1, 0.1)), ("weak-b", (0.6, 0.6)), ("strong-a", (10, 30)))
    }
    tiers = [
        {"name": "small", "score": scored["small"], "providers": [entry["weak-a"]]},
        {"name": "medium", "score": scored["medium"], "providers": [entry["weak-b"]]},
        {"name": "top", "providers": [entry["strong-a"]]},
    ]
    cfg = service_config(tiers, router={"path": str(TIERS_ROUTER)}, routing={"threshold": 0.5})
    prompt = "Write a sonnet about the sea in the style of Shakespeare."
    expected = tiers_router.score([prompt])[0]
    small, medium = (float(expected[tiers_router.models.index(scored[t])]) for t in ("small", "medium"))
    assert small < medium < 1.0, "the test needs a prompt the medium tier is likelier to pass"
    with in_process(cfg, router=tiers_router) as service:
        c = openai_client(service, CLIENT_KEY)
        d = service.post(
            "/v1/route",
            json={"model": "router", "messages": [{"role": "user", "content": prompt}]},
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        ).json()
        assert d["pass_chances"] == pytest.approx({"small": small, "medium": medium, "top": 1.0}, abs=1e-6)
        # thresholds are printed to 6 decimals: small's is rounded down, so the small tier clears it
        for threshold, tier, skipped in (
            (small - 5e-7, "small", None),
            ((small + medium) / 2, "medium", "small=score"),
            (min(1.0, medium + 0.01), "top", "small=score, medium=score"),
        ):
            r = ask(c, prompt, f"router-{threshold:.6f}")
            assert r.headers["x-router-tier"] == tier and r.headers.get("x-router-skipped") == skipped, threshold
        fakes["weak-b"].control(mode="error")  # the medium tier fails: fall back up to the top tier first
        r = ask(c, prompt, f"router-{(small + medium) / 2:.6f}")
        assert r.headers["x-router-tier"] == "medium" and r.headers["x-router-provider"] == "strong-a"
        fakes["strong-a"].control(mode="error")  # then down to the cheaper tier
        r = ask(c, prompt, f"router-{(small + medium) / 2:.6f}")
        assert r.headers["x-router-provider"] == "weak-a" and r.headers["x-router-fallbacks"] == "2"


def test_a_share_of_strong_calls_needs_one_scored_tier_and_tiers_name_router_outputs(fakes):
    tiers_router = Router(TIERS_ROUTER)
    entry = provider_entry("weak-a", fakes["weak-a"], None, "m", (0.1, 0.1))
    tiers = [
        {"name": "small", "score": "gemma-2b-it", "providers": [entry]},
        {"name": "top", "providers": [{**entry, "name": "top"}]},
    ]
    one = Service(parse_config(service_config(tiers, routing={"strong_fraction": 0.3})), router=tiers_router)
    assert one.threshold == pytest.approx(tiers_router.manifest.threshold_for(0.3, "gemma-2b-it"))
    two = [{"name": "tiny", "score": "generic", "providers": [{**entry, "name": "tiny"}]}, *tiers]
    with pytest.raises(
        ConfigError, match=r"routing.strong_fraction: needs exactly one scored tier, this config scores 2"
    ):
        Service(parse_config(service_config(two, routing={"strong_fraction": 0.3})), router=tiers_router)
    tiers[0]["score"] = "gpt-5"
    with pytest.raises(
        ConfigError,
        match=r"tiers\[0\].score: the router outputs no 'gpt-5' \(\d+ outputs; closest: .*'generic' scores any",
    ):
        Service(parse_config(service_config(tiers)), router=tiers_router)
