"""Failure handling end to end: providers break and heal mid-run; fallbacks, circuits, timeouts, disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time

import httpx
import openai
import pytest

from serving_fixtures import (
    needs_router,
    CLIENT_KEY,
    FakeProvider,
    provider_entry,
    service_config,
    start_service,
    two_tiers,
    wait_for,
)

pytestmark = [
    needs_router,
    pytest.mark.slow,  # the service on a real socket: connections, concurrency and streams cut mid-way are the subject
]

NAMES = ["strong-a", "strong-b", "weak-a", "weak-b"]
MODELS = {
    "strong-a": "gpt-4-1106-preview",
    "strong-b": "gpt-4-backup",
    "weak-a": "mixtral-8x7b",
    "weak-b": "mixtral-backup",
}
COOLDOWN = 0.5
USER = [{"role": "user", "content": "Summarise the causes of the first world war in two sentences."}]


@contextlib.contextmanager
def serving(weak: list[str], strong: list[str], timeout_s: float, circuit: dict):
    """Fake providers by name (weak tier, strong tier) behind a service of their own."""
    fakes = {n: FakeProvider(name=n, model=MODELS[n]) for n in [*strong, *weak]}
    for f in fakes.values():
        f.__enter__()
    try:
        entries = {
            n: provider_entry(
                n,
                fakes[n],
                None,
                MODELS[n],
                (10, 30) if n.startswith("strong") else (0.6, 0.6),
                timeout_s=timeout_s,
                connect_timeout_s=1.0,
            )
            for n in fakes
        }
        cfg = service_config(
            two_tiers([entries[n] for n in weak], [entries[n] for n in strong]), circuit_breaker=circuit
        )
        with start_service(cfg) as service:
            yield {"url": service.url, "fakes": fakes, "service": service.app.state.service}
    finally:
        for f in fakes.values():
            f.__exit__(None, None, None)


@pytest.fixture(scope="module")
def stack():
    with serving(
        ["weak-a", "weak-b"],
        ["strong-a", "strong-b"],
        1.0,
        {"failures": 3, "cooldown_s": COOLDOWN, "probe_every_s": None},
    ) as running:
        yield running


@pytest.fixture(autouse=True)
def healthy(stack):
    """Every test starts with healthy providers, closed circuits and fresh provider stats."""
    for f in stack["fakes"].values():
        f.control(mode="ok", latency_ms=0, chunk_delay_ms=0, fail_rate=0, error_status=503, reset_stats=True)
    for p in stack["service"].upstream.providers():
        p.breaker.success()
    yield


class ManualClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def frozen(stack):
    """The service's circuit breakers read this clock: cool-downs pass only when a test moves it."""
    clock = ManualClock()
    providers = stack["service"].upstream.providers()
    for p in providers:
        p.breaker._clock = clock
    yield clock
    for p in providers:
        p.breaker._clock = time.monotonic
        p.breaker.success()


@pytest.fixture
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack["url"] + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=30)


def requests_to(stack, name: str) -> int:
    return stack["fakes"][name].stats()["requests"]


def metric(stack, name: str, **labels) -> float:
    text = httpx.get(stack["url"] + "/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    m = (
        re.search(rf"^{name}{{{re.escape(want)}}} (\S+)$", text, re.M)
        if labels
        else re.search(rf"^{name} (\S+)$", text, re.M)
    )
    return float(m.group(1)) if m else 0.0


def weak_call(client):
    return client.chat.completions.with_raw_response.create(model="router-0", messages=USER)


def test_5xx_is_retried_then_the_next_provider_answers(client, stack):
    stack["fakes"]["weak-a"].control(mode="error", error_status=500)
    raw = weak_call(client)
    assert raw.parse().model == MODELS["weak-b"]
    assert raw.headers["x-router-provider"] == "weak-b" and raw.headers["x-router-fallbacks"] == "1"
    assert requests_to(stack, "weak-a") == 2  # retry.attempts
    assert metric(stack, "router_fallbacks_total", from_provider="weak-a", to_provider="weak-b") >= 1
    assert metric(stack, "router_upstream_errors_total", kind="http_500", provider="weak-a") >= 2


def test_circuit_opens_skips_the_provider_then_a_probe_closes_it(client, stack, frozen):
    weak_a = stack["fakes"]["weak-a"]
    weak_a.control(mode="error")
    weak_call(client), weak_call(client)  # 2 + 1 failed attempts: the third opens the circuit
    assert metric(stack, "router_circuit_state", provider="weak-a") == 2
    seen = requests_to(stack, "weak-a")
    for _ in range(3):
        assert weak_call(client).headers["x-router-provider"] == "weak-b"
    assert requests_to(stack, "weak-a") == seen  # skipped while open
    route = httpx.post(
        stack["url"] + "/v1/route",
        json={"model": "router-0", "messages": USER},
        headers={"Authorization": f"Bearer {CLIENT_KEY}"},
    ).json()
    assert route["provider"] == "weak-b" and route["upstream_model"] == MODELS["weak-b"]
    assert metric(stack, "router_circuit_skips_total", provider="weak-a") >= 3

    frozen.t += COOLDOWN  # cool-down over: half-open
    assert metric(stack, "router_circuit_state", provider="weak-a") == 1
    assert weak_call(client).headers["x-router-provider"] == "weak-b"  # the probe failed ...
    assert requests_to(stack, "weak-a") == seen + 1  # ... after one try, no retry
    assert metric(stack, "router_circuit_state", provider="weak-a") == 2  # ... and re-opened the circuit

    weak_a.control(mode="ok")
    frozen.t += COOLDOWN
    assert weak_call(client).headers["x-router-provider"] == "weak-a"  # the probe succeeded
    assert metric(stack, "router_circuit_state", provider="weak-a") == 0


def test_a_failed_tier_falls_back_to_the_other_tier(client, stack):
    for n in ("weak-a", "weak-b"):
        stack["fakes"][n].control(mode="error")
    raw = weak_call(client)
    assert raw.headers["x-router-tier"] == "weak"  # the decision ...
    assert (
        raw.parse().model == MODELS["strong-a"] and raw.headers["x-router-provider"] == "strong-a"
    )  # ... who answered


def test_everything_down_is_502_then_503_naming_each_provider(client, stack, frozen):
    for f in stack["fakes"].values():
        f.control(mode="error", error_status=503)
    with pytest.raises(openai.APIStatusError) as e:
        weak_call(client)
    assert e.value.status_code == 502
    body = e.value.response.json()["error"]
    assert body["code"] == "upstream_failed" and body["type"] == "upstream_error"
    for n in NAMES:
        assert f"{n}: HTTP 503" in body["message"]
    for _ in range(3):  # open every circuit
        with pytest.raises(openai.APIStatusError):
            weak_call(client)
    with pytest.raises(openai.APIStatusError) as e:
        weak_call(client)
    assert e.value.status_code == 503 and e.value.response.json()["error"]["code"] == "no_provider_available"
    assert "circuit open" in e.value.response.json()["error"]["message"]
    assert httpx.get(stack["url"] + "/readyz").status_code == 503


def test_a_hanging_provider_times_out_and_the_next_answers(client, stack):
    stack["fakes"]["weak-a"].control(mode="hang")
    raw = weak_call(client)
    assert raw.headers["x-router-provider"] == "weak-b"
    assert metric(stack, "router_upstream_errors_total", kind="timeout", provider="weak-a") >= 1


def test_connection_refused_falls_back(client, stack):
    svc = stack["service"]
    weak_a = svc.upstream.tiers[0][0]
    real = weak_a.config
    weak_a.config = real.model_copy(update={"base_url": "http://127.0.0.1:9/v1"})  # nothing listens on port 9
    try:
        assert weak_call(client).headers["x-router-provider"] == "weak-b"
        assert metric(stack, "router_upstream_errors_total", kind="connect", provider="weak-a") >= 1
    finally:
        weak_a.config = real


def test_429_honours_a_short_retry_after_and_skips_on_a_long_one(client, stack):
    weak_a = stack["fakes"]["weak-a"]
    weak_a.control(mode="429", retry_after=0.2)  # <= retry.max_retry_after_s: wait, retry
    assert weak_call(client).headers["x-router-provider"] == "weak-b"
    assert requests_to(stack, "weak-a") == 2
    stack["service"].upstream.tiers[0][0].breaker.success()
    weak_a.control(mode="429", retry_after=30, reset_stats=True)  # longer: move on at once
    assert weak_call(client).headers["x-router-provider"] == "weak-b"
    assert requests_to(stack, "weak-a") == 1


def test_streams_fall_back_before_their_first_chunk(client, stack):
    stack["fakes"]["weak-a"].control(mode="error")
    chunks = list(client.chat.completions.create(model="router-0", messages=USER, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).startswith("[weak-b]")


def test_a_stream_that_stalls_mid_way_ends_with_an_error_event(client, stack):
    stack["fakes"]["weak-a"].control(mode="stall", stall_after_chunks=2)
    stream = client.chat.completions.create(model="router-0", messages=USER, stream=True)
    got = []
    with pytest.raises(openai.APIError, match="failed mid-stream"):
        for chunk in stream:
            got.append(chunk)
    assert got and got[0].model == MODELS["weak-a"]
    assert metric(stack, "router_upstream_errors_total", kind="stream_interrupted", provider="weak-a") >= 1
    wait_for(lambda: stack["fakes"]["weak-a"].stats()["streams_aborted"] == 1)  # the stalled upstream was closed


def test_a_client_disconnect_mid_stream_cancels_the_upstream_request(stack):
    weak_a = stack["fakes"]["weak-a"]
    weak_a.control(chunk_delay_ms=300)
    body = {"model": "router-0", "messages": USER, "stream": True}
    with httpx.Client(timeout=10) as http:
        with http.stream(
            "POST", stack["url"] + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {CLIENT_KEY}"}
        ) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the first event arrived; now hang up
    wait_for(lambda: weak_a.stats()["streams_aborted"] == 1)
    assert weak_a.stats()["streams_completed"] == 0


def test_no_accepted_request_is_lost_while_providers_break_and_heal(stack):
    fakes = stack["fakes"]

    async def chaos():
        await asyncio.sleep(0.05)
        await asyncio.to_thread(fakes["weak-a"].control, mode="error")
        await asyncio.sleep(0.1)
        await asyncio.to_thread(fakes["weak-b"].control, fail_rate=0.5)
        await asyncio.to_thread(fakes["strong-a"].control, mode="hang")
        await asyncio.sleep(0.3)
        for f in fakes.values():
            await asyncio.to_thread(f.heal)

    async def main():
        async with openai.AsyncOpenAI(
            base_url=stack["url"] + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=30
        ) as c:

            async def one(i):
                await asyncio.sleep(i * 0.01)
                return await c.chat.completions.create(
                    model="router-0" if i % 3 else "router-1", messages=[{"role": "user", "content": f"question {i}"}]
                )

            results = await asyncio.gather(chaos(), *(one(i) for i in range(60)), return_exceptions=True)
            return results[1:]

    results = asyncio.run(main())
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    assert {r.model for r in results} >= {MODELS["weak-b"]}  # some had to fall back
    assert metric(stack, "router_upstream_errors_total", kind="http_503", provider="weak-a") >= 1


@pytest.fixture
def pair(request):
    """A weak and a strong provider, one each, with their own service: circuits open on one failure; the timer probes
    every 0.2 s unless the test's parameter says otherwise (None: off)."""
    circuit = {"failures": 1, "cooldown_s": COOLDOWN, "probe_every_s": getattr(request, "param", 0.2)}
    with serving(["weak-a"], ["strong-a"], 2.0, circuit) as running:
        yield running


def open_circuit(pair, name: str) -> None:
    p = next(p for p in pair["service"].upstream.providers() if p.name == name)
    p.breaker.failure()
    assert p.breaker.state == "open"


@pytest.mark.parametrize("pair", [None], indirect=True)  # requests probe, not the timer
def test_a_healthy_provider_behind_a_half_open_circuit_takes_every_request_that_needs_it(pair):
    weak, strong = pair["fakes"]["weak-a"], pair["fakes"]["strong-a"]
    weak.control(latency_ms=400)  # its probe is in flight while the others arrive
    strong.control(mode="error")  # the strong provider is down: the weak one is all that can answer
    open_circuit(pair, "weak-a")
    time.sleep(COOLDOWN)  # half-open

    async def main():
        async with openai.AsyncOpenAI(base_url=pair["url"] + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=30) as c:
            return await asyncio.gather(
                *(c.chat.completions.with_raw_response.create(model="router-1", messages=USER) for _ in range(16)),
                return_exceptions=True,
            )

    results = asyncio.run(main())
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    assert {r.headers["x-router-provider"] for r in results} == {"weak-a"}


def test_a_half_open_circuit_no_request_reaches_is_probed_on_a_timer(pair):
    open_circuit(pair, "strong-a")
    seen = pair["fakes"]["strong-a"].stats()["requests"]
    wait_for(lambda: metric(pair, "router_circuit_state", provider="strong-a") == 0, timeout=5)
    assert metric(pair, "router_circuit_probes_total", provider="strong-a", result="closed") == 1
    assert pair["fakes"]["strong-a"].stats()["requests"] == seen  # GET /models, not a chat request

    pair["fakes"]["strong-a"].__exit__(None, None, None)  # a provider that is down stays open after its probe
    open_circuit(pair, "strong-a")
    wait_for(lambda: metric(pair, "router_circuit_probes_total", provider="strong-a", result="open") >= 1, timeout=5)
