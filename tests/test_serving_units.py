"""The service's building blocks on their own: routing rules, breaker, rate limiter, batcher, config."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from learned_router.serving.auth import RateLimiter
from learned_router.serving.batcher import ScoreBatcher
from learned_router.serving.config import ConfigError, hash_key, parse_config
from learned_router.serving.errors import APIError
from learned_router.serving.providers import CircuitBreaker, retry_after_seconds
from learned_router.serving.routing import MAX_SCORED_CHARS, Message, estimate_tokens, parse_request, requested_threshold, scored_text


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def msgs(*pairs) -> list[Message]:
    return [Message(role=r, content=c) for r, c in pairs]


# ---- routing rules -----------------------------------------------------------------------------

CONVO = msgs(("system", "You are terse."), ("user", "first question"), ("assistant", "answer"),
             ("user", [{"type": "text", "text": "second"}, {"type": "image_url", "image_url": {"url": "x"}}]))


def test_scored_turn_is_configurable_and_defaults_to_the_last_user_turn():
    assert scored_text(CONVO, "last_user") == "second"
    assert scored_text(CONVO, "first_user") == "first question"
    assert scored_text(CONVO, "all_user") == "first question\n\nsecond"
    with pytest.raises(APIError) as e:
        scored_text(msgs(("system", "only a system prompt")), "last_user")
    assert e.value.status == 400 and e.value.param == "messages"


def test_scored_text_is_cut_where_the_router_stops_reading():
    long = "word " * 20000
    assert len(scored_text(msgs(("user", long)), "last_user")) == MAX_SCORED_CHARS


def test_token_estimate_counts_every_message():
    assert estimate_tokens(msgs(("user", "x" * 40)), 4) == 10 + 4
    assert estimate_tokens(msgs(("system", "abc"), ("user", "x" * 41)), 4) == (1 + 4) + (11 + 4)


def test_model_names_set_the_threshold():
    assert requested_threshold("router", 0.42) == 0.42
    assert requested_threshold("router-0.35", 0.42) == 0.35
    assert requested_threshold("router-1", 0.42) == 1.0
    assert requested_threshold("router-.5", 0.42) == 0.5
    for bad in ("router-1.5", "router--0.1", "router-abc", "router-nan", "router-"):
        with pytest.raises(APIError) as e:
            requested_threshold(bad, 0.5)
        assert e.value.status == 400 and e.value.param == "model", bad
    with pytest.raises(APIError) as e:
        requested_threshold("gpt-4", 0.5)
    assert e.value.status == 404 and e.value.code == "model_not_found"


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"model": "router"}', "messages: required"),
        (b'{"model": "router", "messages": []}', "messages"),
        (b'{"model": "router", "messages": "hi"}', "messages"),
        (b'{"model": 3, "messages": [{"role": "user", "content": "hi"}]}', "model"),
        (b'{"model": "router", "messages": [{"role": "wizard", "content": "hi"}]}', "unknown role 'wizard'"),
        (b'{"model": "router", "messages": [{"role": "user", "content": 5}]}', "messages.0.content"),
        (b'{"model": "router", "stream": "yes", "messages": [{"role": "user", "content": "hi"}]}', "stream"),
        (b'{"model": "router", "max_tokens": NaN, "messages": [{"role": "user", "content": "hi"}]}', "NaN"),
        (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    ],
)
def test_bad_requests_are_400_with_the_field(raw, fragment):
    with pytest.raises(APIError) as e:
        parse_request(raw)
    assert e.value.status == 400 and fragment in e.value.message


def test_parse_request_keeps_unknown_fields_for_the_provider():
    req, body = parse_request(b'{"model": "router", "temperature": 0.2, "messages": [{"role": "user", "content": "hi"}]}')
    assert req.model == "router" and body["temperature"] == 0.2


# ---- circuit breaker, rate limiter, Retry-After ---------------------------------------------------

def test_circuit_opens_after_consecutive_failures_then_probes_once_and_recovers():
    clock = Clock()
    b = CircuitBreaker(failures=3, cooldown_s=10, clock=clock)
    b.failure(), b.failure(), b.success(), b.failure(), b.failure()
    assert b.state == "closed"  # a success resets the count
    b.failure()
    assert b.state == "open" and b.acquire() is None
    clock.t = 10
    assert b.state == "half_open"
    assert b.acquire() == "probe" and b.acquire() is None  # one probe at a time
    b.failure()
    assert b.state == "open"  # the probe failed: a new cool-down
    clock.t = 20
    assert b.acquire() == "probe"
    b.release("probe")  # the probe's client went away: the next request probes
    assert b.acquire() == "probe"
    b.success()
    assert b.state == "closed" and b.acquire() == "closed"


def test_rate_limiter_bursts_then_refills_per_key():
    clock = Clock()
    rl = RateLimiter(requests_per_minute=60, burst=2, clock=clock)
    assert rl.take("a") is None and rl.take("a") is None
    wait = rl.take("a")
    assert wait == pytest.approx(1.0)
    assert rl.take("b") is None  # keys have their own buckets
    clock.t = 1.0
    assert rl.take("a") is None and rl.take("a") is not None
    assert rl.take("c", requests_per_minute=6) is None and rl.take("c", 6) is None
    assert rl.take("c", 6) == pytest.approx(10.0)
    assert RateLimiter(0, 1).take("x") is None  # 0: unlimited


def test_rate_limiter_forgets_full_buckets_of_many_clients():
    clock = Clock()
    rl = RateLimiter(requests_per_minute=60, burst=1, clock=clock)
    rl.max_clients = 100
    for i in range(101):
        rl.take(f"addr:{i}")
    assert rl.take("addr:0") is not None  # still remembered: its bucket is empty
    clock.t = 5.0  # every bucket has refilled
    rl.take("new")
    assert len(rl._buckets) == 1


def test_retry_after_accepts_seconds_and_dates():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


# ---- batcher ------------------------------------------------------------------------------------

def test_batcher_scores_concurrent_prompts_together_off_the_event_loop():
    calls: list[tuple[list[str], str]] = []
    gate = threading.Event()

    def score(prompts):
        calls.append((list(prompts), threading.current_thread().name))
        gate.wait(5)
        return np.array([len(p) / 100 for p in prompts], dtype=np.float32)

    async def main():
        b = ScoreBatcher(score, max_batch=8)
        await b.start()
        first = asyncio.create_task(b.score("x"))
        await asyncio.sleep(0.05)  # the first batch is running (and blocked); the rest queue up
        rest = [asyncio.create_task(b.score("y" * i)) for i in range(1, 11)]
        await asyncio.sleep(0.05)
        gate.set()
        out = await asyncio.gather(first, *rest)
        await b.stop()
        return out

    out = asyncio.run(main())
    assert all(o.shape == (1,) for o in out)  # a binary router's (n,) scores: one output per prompt
    assert [float(o[0]) for o in out] == pytest.approx([0.01] + [i / 100 for i in range(1, 11)])
    assert [len(p) for p, _ in calls] == [1, 8, 2]  # max_batch caps a batch
    assert all(name.startswith("router-score") for _, name in calls)


def test_batcher_gives_the_scorer_error_to_every_waiting_request_and_keeps_serving():
    def score(prompts):
        if "bad" in prompts:
            raise RuntimeError("onnxruntime failed")
        return np.full(len(prompts), 0.7, dtype=np.float32)

    async def main():
        b = ScoreBatcher(score)
        await b.start()
        failed = await asyncio.gather(b.score("bad"), return_exceptions=True)
        ok = await b.score("good")
        await b.stop()
        return failed, ok

    failed, ok = asyncio.run(main())
    assert isinstance(failed[0], RuntimeError) and "onnxruntime" in str(failed[0])
    assert ok.tolist() == pytest.approx([0.7])


# ---- config -------------------------------------------------------------------------------------

def base_config() -> dict:
    p = {"base_url": "http://127.0.0.1:9/v1"}
    return {"tiers": [{"name": "weak", "score": "w", "providers": [{**p, "model": "w"}]},
                      {"name": "strong", "providers": [{**p, "model": "s"}]}],
            "auth": {"keys": [{"name": "k", "sha256": hash_key("key")}]}}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["tiers"][1]["providers"][0].update(base_url="127.0.0.1:9"), "tiers[1].providers[0].base_url: must be an http(s) URL"),
        (lambda c: c["tiers"][0]["providers"][0].update(input_price_per_1m=-1), "tiers[0].providers[0].input_price_per_1m:"),
        (lambda c: c["tiers"][0]["providers"][0].update(api_key_env="MY KEY"), "tiers[0].providers[0].api_key_env:"),
        (lambda c: c["tiers"][1]["providers"][0].update(model="w"), "tiers[1].providers[0].name: duplicate provider name 'w'"),
        (lambda c: c["tiers"][0].update(providers=[]), "tiers[0].providers:"),
        (lambda c: c["tiers"][1]["providers"][0].pop("model"), "tiers[1].providers[0].model: required"),
        (lambda c: c["tiers"][1].update(name="weak"), "tiers[1].name: duplicate tier name 'weak'"),
        (lambda c: c["tiers"][1].update(name="top tier"), "tiers[1].name: must be letters, digits"),
        (lambda c: c.update(tiers=c["tiers"][:1]), "tiers: a router needs at least 2 tiers, cheapest first; got 1"),
        (lambda c: c.update(providers={"strong": [], "weak": []}), "providers: Extra inputs are not permitted"),
        (lambda c: c.update(data_classes={"restricted": ["w", "nope"]}), "data_classes.restricted[1]: unknown provider 'nope'; providers: s, w"),
        (lambda c: c.update(data_classes={"restricted": []}), "data_classes.restricted: list the providers"),
        (lambda c: c.update(budget={"period": "week", "usd": 5}), "budget.period:"),
        (lambda c: c.update(budget={"period": "day", "usd": 0}), "budget.usd:"),
        (lambda c: c.update(budget={"period": "day", "usd": 5, "min_threshold": 0.8, "max_threshold": 0.5}),
         "budget: min_threshold 0.8 is above max_threshold 0.5"),
        (lambda c: c.update(latency={"min_samples": 0}), "latency.min_samples:"),
        (lambda c: c.update(routing={"threshold": 1.5}), "routing.threshold:"),
        (lambda c: c.update(routing={"threshold": 0.3, "strong_fraction": 0.5}), "routing: set threshold or strong_fraction, not both"),
        (lambda c: c.update(routing={"score_turn": "last"}), "routing.score_turn:"),
        (lambda c: c.update(routing={"treshold": 0.3}), "routing.treshold: Extra inputs are not permitted"),
        (lambda c: c.update(auth={"keys": []}), "auth: auth is enabled but no client keys"),
        (lambda c: c.update(auth={"keys": [{"name": "k", "sha256": "sk-plaintext"}]}), "auth.keys[0].sha256: must be 64 hex digits"),
        (lambda c: c.pop("auth"), "auth: required"),
        (lambda c: c.update(limits={"max_body_bytes": 10}), "limits.max_body_bytes:"),
    ],
)
def test_config_errors_name_the_key(change, message):
    cfg = base_config()
    change(cfg)
    with pytest.raises(ConfigError) as e:
        parse_config(cfg, "cfg.yaml")
    assert str(e.value).startswith("cfg.yaml: ") and message in str(e.value)


def test_config_defaults_and_key_variables(monkeypatch):
    cfg = base_config()
    cfg["tiers"][1]["providers"][0]["api_key_env"] = "UNIT_STRONG_KEY"
    cfg["auth"]["keys_env"] = "UNIT_CLIENT_KEYS"
    c = parse_config(cfg)
    assert c.router.path == "models/default" and c.routing.score_turn == "last_user" and c.budget is None
    assert c.routing.fallback_to_other_tiers and c.data_classes == {}
    with pytest.raises(ConfigError, match=r"tiers\[1\].providers\[0\].api_key_env: environment variable UNIT_STRONG_KEY is not set"):
        c.provider_keys()
    with pytest.raises(ConfigError, match="auth.keys_env: environment variable UNIT_CLIENT_KEYS is not set"):
        c.client_keys()
    monkeypatch.setenv("UNIT_STRONG_KEY", "sk-1")
    monkeypatch.setenv("UNIT_CLIENT_KEYS", "alpha, beta")
    assert c.provider_keys() == {"s": "sk-1", "w": None}
    keys = c.client_keys()
    assert set(keys) == {hash_key("key"), hash_key("alpha"), hash_key("beta")}
