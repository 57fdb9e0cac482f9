"""The service end to end in process (FastAPI's test client; a real socket for concurrent asyncio clients): the real
router, fake providers, the real openai client and raw HTTP."""

from __future__ import annotations

import asyncio
import logging

import openai
import pytest

from serving_fixtures import (
    needs_router,
    CLIENT_KEY,
    OTHER_KEY,
    PROVIDER_KEYS,
    FakeProvider,
    provider_entry,
    service_config,
    in_process,
    openai_client,
    start_service,
    two_tiers,
)

pytestmark = needs_router

STRONG_MODEL, WEAK_MODEL = "gpt-4-1106-preview", "mixtral-8x7b-instruct"
PROMPT = "Prove that there are infinitely many primes, then explain the proof to a ten-year-old."


def config(strong: FakeProvider, weak: FakeProvider) -> dict:
    return service_config(
        two_tiers(
            [provider_entry("weak-a", weak, "TEST_WEAK_A_KEY", WEAK_MODEL, (0.6, 0.6), context_window=2000)],
            [provider_entry("strong-a", strong, "TEST_STRONG_A_KEY", STRONG_MODEL, (10, 30), context_window=128000)],
        ),
        circuit_breaker={"failures": 3, "cooldown_s": 60},
    )


@pytest.fixture(scope="module")
def fakes():
    with (
        FakeProvider(name="strong-a", model=STRONG_MODEL, api_key=PROVIDER_KEYS["TEST_STRONG_A_KEY"]) as strong,
        FakeProvider(name="weak-a", model=WEAK_MODEL, api_key=PROVIDER_KEYS["TEST_WEAK_A_KEY"]) as weak,
    ):
        yield strong, weak


@pytest.fixture(scope="module")
def stack(fakes):
    """The service in process."""
    strong, weak = fakes
    with in_process(config(strong, weak)) as http:
        yield {"http": http, "strong": strong, "weak": weak, "service": http}


@pytest.fixture(scope="module")
def socket_url(fakes):
    """The service on a real socket, for concurrent asyncio clients."""
    with start_service(config(*fakes)) as service:
        yield service.url


@pytest.fixture
def client(stack) -> openai.OpenAI:
    return openai_client(stack["http"])


def auth(key: str = CLIENT_KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def user(text: str = PROMPT) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_forced_thresholds_pick_each_tier_and_headers_tell_the_decision(client, stack):
    weak = client.chat.completions.with_raw_response.create(model="router-0", messages=user())
    strong = client.chat.completions.with_raw_response.create(model="router-1", messages=user())
    w, s = weak.parse(), strong.parse()
    assert w.model == WEAK_MODEL and w.choices[0].message.content.startswith("[weak-a]")
    assert s.model == STRONG_MODEL and s.choices[0].message.content.startswith("[strong-a]")
    assert weak.headers["x-router-tier"] == "weak" and weak.headers["x-router-model"] == WEAK_MODEL
    assert strong.headers["x-router-tier"] == "strong" and strong.headers["x-router-threshold"] == "1.0000"
    assert weak.headers["x-router-pass-chances"] == strong.headers["x-router-pass-chances"]  # same prompt, same score
    assert strong.headers["x-router-pass-chances"].endswith(", strong=1.0000")  # the unscored top tier always passes
    # the cost comes from the provider's usage and the configured prices
    assert float(strong.headers["x-router-cost-usd"]) == pytest.approx(
        (s.usage.prompt_tokens * 10 + s.usage.completion_tokens * 30) / 1e6, abs=1e-8
    )
    assert float(weak.headers["x-router-cost-usd"]) == pytest.approx(
        (w.usage.prompt_tokens + w.usage.completion_tokens) * 0.6 / 1e6, abs=1e-8
    )
    # the provider got its own key and its upstream model id, never the client's key
    assert stack["strong"].stats()["last_body"]["model"] == STRONG_MODEL
    assert stack["strong"].stats()["last_authorization_ok"] is True


def test_default_threshold_routes_by_the_router_score(client, stack):
    r = stack["http"].post("/v1/route", json={"model": "router", "messages": user()}, headers=auth())
    decision = r.json()
    raw = client.chat.completions.with_raw_response.create(model="router", messages=user())
    assert raw.headers["x-router-tier"] == decision["tier"]
    p_weak = decision["pass_chances"]["weak"]
    assert raw.headers["x-router-pass-chances"] == f"weak={p_weak:.4f}, strong=1.0000"
    expected = "weak" if p_weak >= decision["threshold"] else "strong"
    assert decision["tier"] == expected and decision["rule"] == "score"
    assert (
        decision["effective_threshold"] == decision["threshold"] and decision["budget"] is None
    )  # no budget configured


def test_route_endpoint_returns_the_decision_alone(stack):
    before = stack["weak"].stats()["requests"] + stack["strong"].stats()["requests"]
    r = stack["http"].post("/v1/route", json={"model": "router-0.0", "messages": user()}, headers=auth())
    assert r.status_code == 200
    d = r.json()
    assert d["tier"] == "weak" and d["upstream_model"] == WEAK_MODEL and d["threshold"] == 0.0
    assert 0.0 <= d["pass_chances"]["weak"] <= 1.0 and ">=" in d["reason"] and d["skipped"] == []
    assert d["fallback_chain"] == ["weak-a", "strong-a"]
    assert d["estimated_cost_usd"] == pytest.approx((d["estimated_prompt_tokens"] + 256) * 0.6 / 1e6)
    assert stack["weak"].stats()["requests"] + stack["strong"].stats()["requests"] == before  # nothing forwarded


def test_prompt_longer_than_the_weak_context_goes_strong(client, stack):
    raw = client.chat.completions.with_raw_response.create(model="router-0", messages=user("word " * 2000))
    assert raw.headers["x-router-tier"] == "strong" and raw.headers["x-router-rule"] == "context"
    assert raw.headers["x-router-skipped"] == "weak=context"
    # max_tokens counts too: 40 chars + 1900 output tokens exceed 2000
    raw = client.chat.completions.with_raw_response.create(
        model="router-0", messages=user("short " * 20), max_tokens=1990
    )
    assert raw.headers["x-router-tier"] == "strong"


def test_streaming_passes_chunks_through_and_accounts_usage(client, stack):
    stream = client.chat.completions.create(model="router-0", messages=user(), stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("[weak-a]") and all(c.model == WEAK_MODEL for c in chunks)
    assert all(c.usage is None for c in chunks)  # the usage chunk the router asked for is not passed on
    with_usage = list(
        client.chat.completions.create(
            model="router-0", messages=user(), stream=True, stream_options={"include_usage": True}
        )
    )
    assert with_usage[-1].usage is not None and with_usage[-1].usage.completion_tokens == len(text.split())
    metrics = stack["http"].get("/metrics").text
    assert f'router_tokens_total{{kind="output",model="{WEAK_MODEL}",provider="weak-a"}}' in metrics


@pytest.mark.slow
def test_async_client_concurrent_requests(socket_url):
    async def main():
        async with openai.AsyncOpenAI(base_url=socket_url + "/v1", api_key=CLIENT_KEY, max_retries=0) as c:
            tasks = [
                c.chat.completions.create(model="router-1", messages=user(f"question number {i}")) for i in range(24)
            ]
            return await asyncio.gather(*tasks)

    answers = asyncio.run(main())
    assert len(answers) == 24 and all(a.model == STRONG_MODEL for a in answers)


@pytest.mark.slow
def test_async_streaming(socket_url):
    async def main():
        async with openai.AsyncOpenAI(base_url=socket_url + "/v1", api_key=CLIENT_KEY, max_retries=0) as c:
            stream = await c.chat.completions.create(model="router-1", messages=user(), stream=True)
            return [chunk async for chunk in stream]

    chunks = asyncio.run(main())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).startswith("[strong-a]")


def test_models_health_ready_metrics(client, stack):
    assert [m.id for m in client.models.list()] == ["router"]
    assert stack["http"].get("/healthz").json() == {"status": "ok"}
    ready = stack["http"].get("/readyz")
    assert ready.status_code == 200 and ready.json()["tiers"] == {"strong": True, "weak": True}
    assert ready.json()["router_check"] == "passed"  # its graph on this CPU against router.json's probe outputs
    metrics = stack["http"].get("/metrics").text
    for name in (
        "router_requests_total",
        "router_decisions_total",
        "router_pass_chance_bucket",
        "router_routing_seconds_bucket",
        "router_upstream_seconds_bucket",
        "router_cost_usd_total",
        'router_circuit_state{provider="weak-a"} 0.0',
    ):
        assert name in metrics


def test_readyz_fails_while_a_whole_tier_is_unreachable(stack):
    weak = stack["weak"]
    weak.control(mode="error", error_status=503)  # /v1/models still answers: a 5xx on chat is not "unreachable"
    assert stack["http"].get("/readyz").status_code == 200
    weak.control(mode="ok")
    svc = stack["service"].app.state.service
    for p in svc.upstream.tiers[0]:
        for _ in range(svc.config.circuit_breaker.failures):
            p.breaker.failure()
    try:
        r = stack["http"].get("/readyz")
        assert r.status_code == 503 and r.json()["tiers"] == {"strong": True, "weak": False}
    finally:
        for p in svc.upstream.tiers[0]:
            p.breaker.success()


# ---- auth, limits, bad input ---------------------------------------------------------------------


def test_auth_is_required(stack):
    body = {"model": "router", "messages": user()}
    for headers in ({}, auth("sk-wrong"), {"Authorization": f"Basic {CLIENT_KEY}"}):
        r = stack["http"].post("/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        openai_client(stack["http"], "sk-wrong").models.list()
    assert stack["http"].post("/v1/route", json=body).status_code == 401


def test_rate_limit_per_key_with_retry_after(stack):
    body = {"model": "router-1", "messages": user()}
    codes = [stack["http"].post("/v1/route", json=body, headers=auth(OTHER_KEY)) for _ in range(70)]
    limited = [r for r in codes if r.status_code == 429]
    assert codes[0].status_code == 200 and len(limited) >= 5, (
        "the limited key (60/min, burst 50) is refused after its burst"
    )
    assert int(limited[0].headers["retry-after"]) >= 1 and limited[0].json()["error"]["type"] == "rate_limit_error"
    assert stack["http"].post("/v1/route", json=body, headers=auth()).status_code == 200  # other keys unaffected


@pytest.mark.parametrize(
    "content, status, fragment",
    [
        (b"{broken", 400, "not valid JSON"),
        (b'{"model": "router", "messages": [{"role": "user", "content": "caf\xe9"}]}', 400, "UTF-8"),
        (b'{"model": "router"}', 400, "messages: required"),
        (b'{"model": "router", "messages": []}', 400, "messages"),
        (b'{"model": "router", "messages": [{"role": "robot", "content": "hi"}]}', 400, "unknown role"),
        (b'{"model": "router", "messages": [{"role": "user", "content": ["hi"]}]}', 400, "messages.0.content"),
        (b'{"model": "router-2", "messages": [{"role": "user", "content": "hi"}]}', 400, "[0, 1]"),
        (b'{"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}', 404, "does not exist"),
        (b'{"model": "router", "max_tokens": "9", "messages": [{"role": "user", "content": "hi"}]}', 400, "max_tokens"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/route"])
def test_bad_input_gets_an_openai_style_4xx(stack, path, content, status, fragment):
    r = stack["http"].post(path, content=content, headers={**auth(), "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and fragment in err["message"]


def test_huge_bodies_are_413_declared_or_chunked_and_service_keeps_serving(client, stack):
    big = b'{"model": "router", "messages": [{"role": "user", "content": "' + b"x" * 70000 + b'"}]}'
    r = stack["http"].post("/v1/chat/completions", content=big, headers=auth())
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    r = stack["http"].post("/v1/chat/completions", content=chunks(), headers=auth())  # no Content-Length
    assert r.status_code == 413
    assert client.chat.completions.create(model="router-1", messages=user()).model == STRONG_MODEL


def test_unknown_paths_and_methods_get_openai_errors(stack):
    r = stack["http"].get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = stack["http"].get("/v1/chat/completions", headers=auth())
    assert r.status_code == 405 and "error" in r.json()


def test_an_upstream_error_reaches_the_client_without_the_providers_key(stack):
    stack["strong"].control(mode="error", error_status=400, echo_key=True)  # it echoes the key it received
    try:
        r = stack["http"].post(
            "/v1/chat/completions",
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
            json={"model": "router-1", "messages": user()},
        )
    finally:
        stack["strong"].control(echo_key=False)
        stack["strong"].heal()
    err = r.json()["error"]
    assert r.status_code == 400 and set(err) == {"message", "type", "param", "code"}
    assert "is failing (simulated)" in err["message"] and "[redacted]" in err["message"]
    assert not any(key in r.text for key in PROVIDER_KEYS.values()) and "Bearer" not in r.text


def test_upstream_client_errors_pass_back_with_their_status(client, stack):
    stack["strong"].control(mode="error", error_status=422)
    weak_before = stack["weak"].stats()["requests"]
    try:
        with pytest.raises(openai.UnprocessableEntityError):
            client.chat.completions.create(model="router-1", messages=user())
        assert stack["weak"].stats()["requests"] == weak_before  # a client error is not a reason to fall back
    finally:
        stack["strong"].heal()


def test_logs_never_hold_keys_or_prompts(client, stack, caplog):
    secret = "my secret prompt about zebra-unicorn-7781"
    with caplog.at_level(logging.INFO):
        client.chat.completions.create(model="router", messages=user(secret))
        list(client.chat.completions.create(model="router", messages=user(secret), stream=True))
        stack["http"].post("/v1/route", json={"model": "router", "messages": user(secret)}, headers=auth())
        stack["http"].post("/v1/route", json={"model": "router"}, headers=auth("sk-wrong-key-in-log?"))
    text = caplog.text
    assert "chat id=" in text  # the service does log each request
    for forbidden in [secret, "zebra", CLIENT_KEY, "sk-wrong-key-in-log", *PROVIDER_KEYS.values()]:
        assert forbidden not in text


def test_cutting_a_huge_prompt_leaves_its_score_unchanged(stack):
    text = "Please review this log and tell me what failed. " + "step ok; " * 5000  # ~45k characters
    r = stack["http"].post("/v1/route", json={"model": "router", "messages": user(text)}, headers=auth())
    router = stack["service"].app.state.service.router
    full = router.pass_chance([text])[0]  # the whole text, uncut
    assert r.json()["pass_chances"]["weak"] == pytest.approx(float(full), abs=1e-6)
