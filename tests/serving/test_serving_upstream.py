"""Misbehaving upstreams against the service (in process): insane usage, malformed or endless streams, huge bodies, a locked
spend store, 429 cool-downs. The spend store and cost metrics only ever see finite, bounded, non-negative amounts."""

from __future__ import annotations

import asyncio
import json
import math
import re
import sqlite3
import time

import pytest

from clirun import cli
from learned_router.serving.providers import NoAnswer, Upstream
from serving_fixtures import (
    needs_router,
    CLIENT_KEY,
    ROUTER_DIR,
    FakeProvider,
    provider_entry,
    service_config,
    in_process,
    two_tiers,
    wait_for,
)

pytestmark = needs_router

STRONG, WEAK = "gpt-4-1106-preview", "mixtral-8x7b"
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
PROMPT = "Name three prime numbers."
WEAK_FIRST = {"model": "router-0", "messages": [{"role": "user", "content": PROMPT}]}
ANSWER = {"role": "assistant", "content": "2, 3 and 5."}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    store = tmp_path_factory.mktemp("spend") / "spend.sqlite"
    with FakeProvider(name="weak", model=WEAK) as weak, FakeProvider(name="strong", model=STRONG) as strong:
        cfg = service_config(
            two_tiers(
                [provider_entry("weak", weak, None, WEAK, (0.6, 0.6), timeout_s=2)],
                [provider_entry("strong", strong, None, STRONG, (10, 30), timeout_s=2)],
            ),
            limits={"max_upstream_body_bytes": 1 << 20, "max_stream_seconds": 1.5},
            circuit_breaker={"failures": 100, "cooldown_s": 60},
            budget={"period": "month", "usd": 1000.0, "store": str(store)},
        )
        with in_process(cfg) as service:
            yield {
                "http": service,
                "service": service.app.state.service,
                "weak": weak,
                "strong": strong,
                "store": store,
            }


@pytest.fixture(autouse=True)
def healthy(stack):
    for f in (stack["weak"], stack["strong"]):
        f.control(mode="ok", usage=None, raw_body="", raw_events=[], reset_stats=True)
    for p in stack["service"].upstream.providers():
        p.breaker.success()


def metrics(stack) -> str:
    return stack["http"].get("/metrics").text


def metric_sum(stack, name: str, **labels) -> float:
    total = 0.0
    for line in metrics(stack).splitlines():
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def stored_spend(stack) -> float:
    with sqlite3.connect(stack["store"]) as db:
        return sum(row[0] for row in db.execute("SELECT usd FROM spend"))


def sse(text: str) -> list:
    return [
        json.loads(line[6:]) if line[6:] != "[DONE]" else "[DONE]"
        for line in text.splitlines()
        if line.startswith("data: ")
    ]


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": -5, "completion_tokens": 3},
        {"prompt_tokens": 1e308, "completion_tokens": 1e308},
        {"prompt_tokens": "12", "completion_tokens": "3"},
        {"prompt_tokens": 1.5, "completion_tokens": 2},
        {"prompt_tokens": True, "completion_tokens": 1},
        {"prompt_tokens": 10**30, "completion_tokens": 1},
        [1, 2],
        "lots",
        -1,
        {"prompt_tokens": 12},
    ],
)
def test_insane_usage_is_billed_by_the_estimate_and_metered(stack, usage):
    stack["weak"].control(usage=usage)
    before = metric_sum(stack, "router_usage_estimated_total", provider="weak", reason="invalid")
    r = stack["http"].post("/v1/chat/completions", json=WEAK_FIRST, headers=AUTH)
    shown = r.json()["usage"]  # the counts it was billed for, not the provider's words
    assert r.status_code == 200 and r.headers["x-router-usage"] == "estimated" and shown != usage
    assert (
        shown["total_tokens"] == shown["prompt_tokens"] + shown["completion_tokens"] and 0 < shown["total_tokens"] < 100
    )
    cost = float(r.headers["x-router-cost-usd"])
    assert 0 < cost < 1e-3 and len(r.headers["x-router-cost-usd"]) < 16
    assert metric_sum(stack, "router_usage_estimated_total", provider="weak", reason="invalid") == before + 1
    total = metric_sum(stack, "router_cost_usd_total")
    assert math.isfinite(total) and 0 <= total < 1
    wait_for(lambda: math.isfinite(s := stored_spend(stack)) and 0 < s < 1)


@pytest.mark.parametrize(
    "usage", [{"prompt_tokens": 1e308, "completion_tokens": 1}, {"prompt_tokens": -5000000, "completion_tokens": 2}]
)
def test_a_streams_lying_usage_chunk_reaches_the_client_as_the_billed_counts(stack, usage):
    stack["weak"].control(usage=usage)
    r = stack["http"].post(
        "/v1/chat/completions",
        headers=AUTH,
        json={**WEAK_FIRST, "stream": True, "stream_options": {"include_usage": True}},
    )
    [shown] = [e["usage"] for e in sse(r.text) if isinstance(e, dict) and e.get("usage")]
    assert (
        shown["total_tokens"] == shown["prompt_tokens"] + shown["completion_tokens"] and 0 < shown["total_tokens"] < 100
    )


def test_valid_usage_is_passed_as_sent(stack):
    stack["weak"].control(usage={"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17})
    r = stack["http"].post("/v1/chat/completions", json=WEAK_FIRST, headers=AUTH)
    assert r.headers["x-router-usage"] == "upstream" and r.json()["usage"]["prompt_tokens"] == 12


def test_missing_usage_is_billed_by_the_estimate(stack):
    stack["weak"].control(mode="raw", raw_body=json.dumps({"choices": [{"index": 0, "message": ANSWER}]}))
    before = metric_sum(stack, "router_usage_estimated_total", provider="weak", reason="missing")
    r = stack["http"].post("/v1/chat/completions", json=WEAK_FIRST, headers=AUTH)
    assert r.status_code == 200 and float(r.headers["x-router-cost-usd"]) > 0
    assert metric_sum(stack, "router_usage_estimated_total", provider="weak", reason="missing") == before + 1


def ask(stack, messages: list[dict]):
    """Upstream.ask of the weak tier's chain, on an upstream apart from the service's (as label's and the shadow
    grader's): its Answer, or the NoAnswer it raised."""
    cfg = stack["service"].config

    async def go():
        up = Upstream.apart(cfg, [cfg.tiers[0]], {"weak": None})
        await up.start()
        try:
            return await up.ask(up.tiers[0], {"messages": messages, "max_tokens": 16}, cfg.routing.chars_per_token)
        except NoAnswer as e:
            return e
        finally:
            await up.stop()

    return asyncio.run(go())


def test_a_whole_answer_asked_outside_a_request_is_billed_by_its_usage_else_by_the_estimate(stack):
    weak = stack["service"].config.tiers[0].providers[0]
    stack["weak"].control(usage={"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500})
    answer = ask(stack, [{"role": "user", "content": PROMPT}])
    assert answer.text and answer.provider.name == "weak" and answer.billed.estimated is None
    assert answer.billed.usd == pytest.approx(weak.cost_usd(1000, 500))
    stack["weak"].control(usage={"prompt_tokens": 1e308, "completion_tokens": 1})  # a lie: the estimate instead
    answer = ask(stack, [{"role": "user", "content": "x" * 400}])
    assert answer.billed.estimated == "invalid" and 100 <= answer.billed.prompt_tokens < 120 and answer.billed.usd > 0
    stack["weak"].control(mode="raw", raw_body='{"choices":[{"message":{"content":null}}]}')  # no text: still billed
    answer = ask(stack, [{"role": "user", "content": PROMPT}])
    assert answer.text is None and answer.billed.estimated == "missing" and answer.billed.usd > 0


def test_no_whole_answer_is_no_answer_naming_what_happened(stack):
    stack["weak"].control(mode="error")
    failed = ask(stack, [{"role": "user", "content": PROMPT}])
    assert isinstance(failed, NoAnswer) and "weak/weak" in str(failed) and "503" in str(failed)


@pytest.mark.parametrize(
    "body",
    [
        '{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":NaN,"completion_tokens":1}}',
        "[1, 2]",
        '"a string"',
        '{"id": "no choices"}',
        '{"choices": "not a list"}',
        "not json",
        "",
        '{"choices":[null]}',
        '{"choices":[]}',
        '{"choices":[{"message":"hi"}]}',
        '{"choices":[{"index":0}]}',
    ],
)
def test_an_answer_that_is_not_a_chat_completion_is_a_bad_response_and_fails_over(stack, body):
    stack["weak"].control(mode="raw", raw_body=body)
    before = metric_sum(stack, "router_upstream_errors_total", provider="weak", kind="bad_response")
    r = stack["http"].post("/v1/chat/completions", json=WEAK_FIRST, headers=AUTH)
    assert r.status_code == 200 and r.json()["model"] == STRONG and r.headers["x-router-fallbacks"] == "1"
    assert (
        metric_sum(stack, "router_upstream_errors_total", provider="weak", kind="bad_response") == before + 2
    )  # retried once
    assert math.isfinite(metric_sum(stack, "router_cost_usd_total"))


def test_a_stream_that_never_ends_is_ended_at_max_stream_seconds(stack):
    stack["weak"].control(chunk_delay_ms=400)  # a chunk every 0.4 s: never idle long enough for a read timeout
    try:
        before = metric_sum(stack, "router_upstream_errors_total", provider="weak", kind="stream_too_long")
        started = time.monotonic()
        r = stack["http"].post("/v1/chat/completions", json={**WEAK_FIRST, "stream": True}, headers=AUTH)
        took = time.monotonic() - started
        events = sse(r.text)
    finally:
        stack["weak"].control(chunk_delay_ms=0)
    assert r.status_code == 200 and events[-1]["error"]["code"] == "stream_too_long", r.text
    assert "limits.max_stream_seconds" in events[-1]["error"]["message"] and 1.5 <= took < 3.0
    assert metric_sum(stack, "router_upstream_errors_total", provider="weak", kind="stream_too_long") == before + 1


def test_a_huge_answer_is_cut_at_the_limit_and_fails_over(stack):
    stack["weak"].control(mode="huge", huge_bytes=50 << 20)
    t0 = time.monotonic()
    r = stack["http"].post("/v1/chat/completions", json=WEAK_FIRST, headers=AUTH)
    assert r.status_code == 200 and r.json()["model"] == STRONG and time.monotonic() - t0 < 10


GOOD_CHUNK = json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "2, 3"}}]})


@pytest.mark.parametrize(
    "bad",
    [
        '{"choices":[{"delta":"str"}]}',
        '{"choices":[{"delta":{"content":5}}]}',
        '{"choices":{"0":{}}}',
        '{"choices":[7]}',
        "not json",
        '{"choices":[{"delta":{"content":"x"}}],"usage":{"prompt_tokens":NaN}}',
    ],
)
def test_a_malformed_stream_chunk_ends_the_clients_stream_with_an_error_event(stack, bad):
    stack["weak"].control(mode="raw", raw_events=[GOOD_CHUNK, bad, GOOD_CHUNK, "[DONE]"])
    before = metric_sum(stack, "router_upstream_errors_total", provider="weak", kind="bad_response")
    served = metric_sum(stack, "router_served_total", provider="weak")
    r = stack["http"].post("/v1/chat/completions", json={**WEAK_FIRST, "stream": True}, headers=AUTH)
    events = sse(r.text)
    assert r.status_code == 200 and r.text.endswith("\n\n")  # a complete response, ended by the router
    assert events[0]["choices"][0]["delta"]["content"] == "2, 3" and len(events) == 2
    assert events[-1]["error"]["code"] == "bad_response" and "weak" in events[-1]["error"]["message"]
    assert metric_sum(stack, "router_upstream_errors_total", provider="weak", kind="bad_response") == before + 1
    assert metric_sum(stack, "router_served_total", provider="weak") == served  # not counted as served


def test_a_stream_of_valid_oddities_is_passed_through(stack):
    events = [
        GOOD_CHUNK,
        '{"choices":[]}',
        '{"choices":[{"index":0,"delta":null,"finish_reason":"stop"}]}',
        '{"choices":[{"delta":{"content":null,"tool_calls":[]}}]}',
        "[DONE]",
    ]
    stack["weak"].control(mode="raw", raw_events=events)
    r = stack["http"].post("/v1/chat/completions", json={**WEAK_FIRST, "stream": True}, headers=AUTH)
    assert r.headers["x-router-provider"] == "weak" and len(sse(r.text)) == 5 and sse(r.text)[-1] == "[DONE]"


def test_a_stream_without_done_is_interrupted_not_served(stack):
    stack["weak"].control(mode="raw", raw_events=[GOOD_CHUNK, GOOD_CHUNK])
    before = metric_sum(stack, "router_upstream_errors_total", provider="weak", kind="stream_interrupted")
    served = metric_sum(stack, "router_served_total", provider="weak")
    r = stack["http"].post("/v1/chat/completions", json={**WEAK_FIRST, "stream": True}, headers=AUTH)
    events = sse(r.text)
    assert len(events) == 3 and events[-1]["error"]["code"] == "stream_interrupted"
    assert metric_sum(stack, "router_upstream_errors_total", provider="weak", kind="stream_interrupted") == before + 1
    assert metric_sum(stack, "router_served_total", provider="weak") == served
    stack["weak"].control(mode="ok")
    served_before = metric_sum(stack, "router_served_total", provider="weak")
    ok = stack["http"].post("/v1/chat/completions", json={**WEAK_FIRST, "stream": True}, headers=AUTH)
    assert sse(ok.text)[-1] == "[DONE]"
    wait_for(lambda: metric_sum(stack, "router_served_total", provider="weak") == served_before + 1)


def test_a_malformed_first_chunk_fails_over_before_anything_is_sent(stack):
    stack["weak"].control(mode="raw", raw_events=['{"choices":[{"delta":"str"}]}', "[DONE]"])
    r = stack["http"].post("/v1/chat/completions", json={**WEAK_FIRST, "stream": True}, headers=AUTH)
    events = sse(r.text)
    assert r.headers["x-router-provider"] == "strong" and events[-1] == "[DONE]"


def test_an_endless_stream_is_cut_at_the_limit_with_an_error_event(stack):
    stack["weak"].control(mode="huge", huge_bytes=50 << 20)
    t0 = time.monotonic()
    r = stack["http"].post("/v1/chat/completions", json={**WEAK_FIRST, "stream": True}, headers=AUTH)
    assert len(r.content) < 2 << 20 and time.monotonic() - t0 < 10
    error = sse(r.text)[-1]["error"]
    assert error["code"] == "bad_response" and "limit" in error["message"]


def test_insane_stream_usage_is_billed_by_the_estimate(stack):
    usage = json.dumps({"choices": [], "usage": {"prompt_tokens": -1e308, "completion_tokens": 5}})
    stack["weak"].control(mode="raw", raw_events=[GOOD_CHUNK, usage, "[DONE]"])
    before = metric_sum(stack, "router_usage_estimated_total", provider="weak", reason="invalid")
    r = stack["http"].post("/v1/chat/completions", json={**WEAK_FIRST, "stream": True}, headers=AUTH)
    assert sse(r.text)[-1] == "[DONE]"
    wait_for(lambda: metric_sum(stack, "router_usage_estimated_total", provider="weak", reason="invalid") == before + 1)
    assert math.isfinite(metric_sum(stack, "router_cost_usd_total"))


def budget_spent(stack) -> float:
    return stack["http"].post("/v1/route", json=WEAK_FIRST, headers=AUTH).json()["budget"]["spent_usd"]


def test_a_locked_spend_store_delays_only_the_accounting(stack):
    """Another process holds the store's write lock for 3 s: answers and /healthz are not held up; the spend lands later."""
    spent = wait_for(
        lambda: (s := budget_spent(stack)) == pytest.approx(stored_spend(stack)) and s
    )  # nothing unwritten
    errors = metric_sum(stack, "router_spend_store_errors_total")
    locker = sqlite3.connect(stack["store"], isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        t0 = time.monotonic()
        r = stack["http"].post("/v1/chat/completions", json=WEAK_FIRST, headers=AUTH)
        assert r.status_code == 200 and time.monotonic() - t0 < 1.0
        assert stack["http"].get("/healthz").status_code == 200 and time.monotonic() - t0 < 1.5
        cost = float(r.headers["x-router-cost-usd"])
        assert budget_spent(stack) == pytest.approx(spent + cost)  # the pacer counts it already
        time.sleep(2.5)
        assert stored_spend(stack) == pytest.approx(spent)  # not written yet
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    wait_for(lambda: stored_spend(stack) == pytest.approx(spent + cost), timeout=10)
    assert budget_spent(stack) == pytest.approx(spent + cost)  # counted once
    assert metric_sum(stack, "router_spend_store_errors_total") > errors


def test_a_429s_retry_after_is_that_providers_cool_down(stack):
    service = stack["service"]
    weak = next(p for p in service.upstream.providers() if p.name == "weak")
    weak.breaker.failures = 1
    try:
        stack["weak"].control(mode="429", retry_after=1)
        r = stack["http"].post("/v1/chat/completions", json=WEAK_FIRST, headers=AUTH)
        assert r.status_code == 200 and r.json()["model"] == STRONG and weak.breaker.state == "open"
        stack["weak"].control(mode="ok")
        time.sleep(1.1)  # the Retry-After, not the circuit's 60 s cool-down
        # a request or the half-open timer's probe (whichever takes the one try) closes the circuit well before 60 s
        wait_for(
            lambda: stack["http"].post("/v1/chat/completions", json=WEAK_FIRST, headers=AUTH).json()["model"] == WEAK,
            timeout=5,
        )
        assert weak.breaker.state == "closed"
    finally:
        weak.breaker.failures = 100


def test_cost_metrics_and_spend_stay_finite_after_everything(stack):
    text = metrics(stack)
    for line in text.splitlines():
        if line.startswith(("router_cost_usd_total{", "router_tokens_total{")):
            v = float(line.rsplit(" ", 1)[1])
            assert math.isfinite(v) and 0 <= v < 1e9, line
    assert re.search(r"^router_budget_spent_usd (\S+)$", text, re.M)
    assert math.isfinite(stored_spend(stack))


@pytest.mark.slow
def test_the_soak_command_accounts_for_every_request_through_its_fault_phases():
    from learned_router.tools.soak import PHASES, STRICT, run

    results = run(str(ROUTER_DIR), 16 * len(PHASES), concurrency=4)
    assert [name for name, _ in results] == [name for name, _ in PHASES]
    for name, counts in results:
        assert counts["sent"] == 16 and counts["lost"] == 0 and counts["500"] == 0, (name, counts)
        assert counts["answered"] + counts["refused"] + counts["stream_error"] + counts["5xx"] == 16
    assert (
        dict(results)[STRICT]["5xx"] == 0
    )  # the weak provider, half-open, takes every request the dead strong one fails
    out = cli("soak", "--requests", "5")
    assert (
        out.returncode == 2 and "--requests" in out.stderr and "Traceback" not in out.stderr
    )  # bounded: 100 to 50,000
