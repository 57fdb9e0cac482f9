"""The service's building blocks on their own: routing rules, breaker, rate limiter, batcher, config."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from learned_router.serving.auth import RateLimiter
from learned_router.serving.batcher import ScoreBatcher
from learned_router.serving.budget import Pacer, SpendStore, period_bounds
from learned_router.serving.errors import APIError
from learned_router.serving.config import BudgetConfig, ConfigError, ProviderConfig, hash_key, parse_config
from learned_router.serving.latency import LatencyWindow
from learned_router.serving.policy import NoEligibleTier, Standing, TierOption, choose, fallback_order, standing
from learned_router.serving.providers import CircuitBreaker, Provider, retry_after_seconds
from learned_router.serving.routing import (
    MAX_SCORED_CHARS,
    Message,
    estimate_tokens,
    parse_request,
    requested_threshold,
    scored_text,
)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def msgs(*pairs) -> list[Message]:
    return [Message(role=r, content=c) for r, c in pairs]


# ---- routing rules -----------------------------------------------------------------------------

CONVO = msgs(
    ("system", "You are terse."),
    ("user", "first question"),
    ("assistant", "answer"),
    ("user", [{"type": "text", "text": "second"}, {"type": "image_url", "image_url": {"url": "x"}}]),
)


def test_scored_turn_is_configurable_and_defaults_to_the_last_user_turn():
    assert scored_text(CONVO, "last_user") == "second"
    assert scored_text(CONVO, "first_user") == "first question"
    assert scored_text(CONVO, "all_user") == "first question\n\nsecond"
    assert scored_text(msgs(("system", "only a system prompt")), "last_user") == "only a system prompt"
    image_only = msgs(("system", "You see images."), ("user", [{"type": "image_url", "image_url": {"url": "x"}}]))
    assert scored_text(image_only, "last_user") == "You see images."
    assert scored_text(msgs(("user", [{"type": "image_url", "image_url": {"url": "x"}}])), "last_user") == ""


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
    req, body = parse_request(
        b'{"model": "router", "temperature": 0.2, "messages": [{"role": "user", "content": "hi"}]}'
    )
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


def test_circuit_cool_down_runs_from_the_failure_that_opened_it():
    clock = Clock()
    b = CircuitBreaker(failures=2, cooldown_s=30, clock=clock)
    b.failure(), b.failure()  # opened at t=0
    for t in (5, 10, 20, 29):  # calls that were in flight time out one after another
        clock.t = t
        b.failure()
    clock.t = 30
    assert b.state == "half_open" and b.acquire() == "probe"  # 30 s after the first failure, not the last


def test_a_retry_after_sets_a_shorter_cool_down_bounded_by_the_circuits():
    clock = Clock()
    b = CircuitBreaker(failures=1, cooldown_s=30, clock=clock)
    b.failure(retry_after=1.0)
    clock.t = 0.9
    assert b.state == "open"
    clock.t = 1.0
    assert b.state == "half_open"
    b.acquire(), b.failure(retry_after=3600)  # longer than the circuit's cool-down: capped at it
    clock.t = 30.9
    assert b.state == "open"
    clock.t = 31.0
    assert b.state == "half_open"


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


def test_a_prompt_that_fails_its_batch_fails_alone():
    calls = []

    def score(prompts):
        calls.append(len(prompts))
        if "\ud800" in prompts:
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
        return np.full(len(prompts), 0.7, dtype=np.float32)

    async def main():
        b = ScoreBatcher(score, max_wait_s=0.05)
        await b.start()
        out = await asyncio.gather(*(b.score(p) for p in ["a", "b", "\ud800", "c"]), return_exceptions=True)
        await b.stop()
        return out

    out = asyncio.run(main())
    assert calls[0] == 4  # one batch, then each prompt alone
    assert isinstance(out[2], UnicodeEncodeError)
    assert [o.tolist() for i, o in enumerate(out) if i != 2] == [pytest.approx([0.7])] * 3


# ---- config -------------------------------------------------------------------------------------


def base_config() -> dict:
    p = {"base_url": "http://127.0.0.1:9/v1"}
    return {
        "tiers": [
            {"name": "weak", "score": "w", "providers": [{**p, "model": "w"}]},
            {"name": "strong", "providers": [{**p, "model": "s"}]},
        ],
        "auth": {"keys": [{"name": "k", "sha256": hash_key("key")}]},
    }


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda c: c["tiers"][1]["providers"][0].update(base_url="127.0.0.1:9"),
            "tiers[1].providers[0].base_url: must be an http(s) URL",
        ),
        (
            lambda c: c["tiers"][0]["providers"][0].update(input_price_per_1m=-1),
            "tiers[0].providers[0].input_price_per_1m:",
        ),
        (lambda c: c["tiers"][0]["providers"][0].update(api_key_env="MY KEY"), "tiers[0].providers[0].api_key_env:"),
        (
            lambda c: c["tiers"][1]["providers"][0].update(model="w"),
            "tiers[1].providers[0].name: duplicate provider name 'w'",
        ),
        (lambda c: c["tiers"][0].update(providers=[]), "tiers[0].providers:"),
        (lambda c: c["tiers"][1]["providers"][0].pop("model"), "tiers[1].providers[0].model: required"),
        (lambda c: c["tiers"][1].update(name="weak"), "tiers[1].name: duplicate tier name 'weak'"),
        (lambda c: c["tiers"][1].update(name="top tier"), "tiers[1].name: must be letters, digits"),
        (lambda c: c.update(tiers=c["tiers"][:1]), "tiers: a router needs at least 2 tiers, cheapest first; got 1"),
        (lambda c: c.update(providers={"strong": [], "weak": []}), "providers: Extra inputs are not permitted"),
        (
            lambda c: c.update(data_classes={"restricted": ["w", "nope"]}),
            "data_classes.restricted[1]: unknown provider 'nope'; providers: s, w",
        ),
        (lambda c: c.update(data_classes={"restricted": []}), "data_classes.restricted: list the providers"),
        (lambda c: c.update(budget={"period": "week", "usd": 5}), "budget.period:"),
        (lambda c: c.update(budget={"period": "day", "usd": 0}), "budget.usd:"),
        (
            lambda c: c.update(budget={"period": "day", "usd": 5, "min_threshold": 0.8, "max_threshold": 0.5}),
            "budget: min_threshold 0.8 is above max_threshold 0.5",
        ),
        (lambda c: c.update(latency={"min_samples": 0}), "latency.min_samples:"),
        (lambda c: c.update(routing={"threshold": 1.5}), "routing.threshold:"),
        (
            lambda c: c.update(routing={"threshold": 0.3, "strong_fraction": 0.5}),
            "routing: set threshold or strong_fraction, not both",
        ),
        (lambda c: c.update(routing={"score_turn": "last"}), "routing.score_turn:"),
        (lambda c: c.update(routing={"treshold": 0.3}), "routing.treshold: Extra inputs are not permitted"),
        (lambda c: c.update(auth={"keys": []}), "auth: auth is enabled but no client keys"),
        (
            lambda c: c.update(auth={"keys": [{"name": "k", "sha256": "sk-plaintext"}]}),
            "auth.keys[0].sha256: must be 64 hex digits",
        ),
        (lambda c: c.pop("auth"), "auth: required"),
        (lambda c: c.update(limits={"max_body_bytes": 10}), "limits.max_body_bytes:"),
        (
            lambda c: c["tiers"][0]["providers"][0].update(name="weak-\U0001f600"),
            "tiers[0].providers[0].name: must be 1-128 ASCII",
        ),
        (
            lambda c: c["tiers"][0]["providers"][0].update(name="weak\nx"),
            "tiers[0].providers[0].name: must be 1-128 ASCII",
        ),
        (
            lambda c: c["tiers"][0]["providers"][0].update(model="m\u00e9"),
            "tiers[0].providers[0].model: must be 1-128 ASCII",
        ),
        (
            lambda c: c["tiers"][0]["providers"][0].update(timeout_s=float("inf")),
            "tiers[0].providers[0].timeout_s: Input should be a finite number",
        ),
        (
            lambda c: c["tiers"][0]["providers"][0].update(output_price_per_1m=float("nan")),
            "tiers[0].providers[0].output_price_per_1m:",
        ),
        (
            lambda c: c.update(budget={"period": "day", "usd": float("inf")}),
            "budget.usd: Input should be a finite number",
        ),
        (lambda c: c["auth"].update(enabled="yes"), "auth.enabled: Input should be a valid boolean"),
        (
            lambda c: c["tiers"][0]["providers"][0].update(stream_usage=1),
            "tiers[0].providers[0].stream_usage: Input should be a valid boolean",
        ),
        (lambda c: c.update(api_docs="true"), "api_docs: Input should be a valid boolean"),
        (
            lambda c: c["tiers"][0]["providers"][0].update(context_window="8192"),
            "tiers[0].providers[0].context_window: Input should be a valid integer",
        ),
    ],
)
def test_config_errors_name_the_key(change, message):
    cfg = base_config()
    change(cfg)
    with pytest.raises(ConfigError) as e:
        parse_config(cfg, "cfg.yaml")
    assert str(e.value).startswith("cfg.yaml: ") and message in str(e.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("auth: {enabled: false}\nauth: {enabled: true}\n", ": duplicate key 'auth'"),
        (
            "limits:\n  max_body_bytes: 2048\n  max_body_bytes: 4096\nauth: {enabled: false}\n",
            ": duplicate key 'max_body_bytes'",
        ),
        ("retry: {attempts: 2, backoff_max_s: .inf}\n", "retry.backoff_max_s: Input should be a finite number"),
        ("auth: {enabled: 'yes'}\n", "auth.enabled: Input should be a valid boolean"),
    ],
)
def test_config_file_refuses_duplicate_keys_infinities_and_quoted_booleans(tmp_path, text, message):
    from learned_router.serving.config import load_config

    import yaml

    base = {k: v for k, v in base_config().items() if k != "auth"}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(base) + text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value) and "\n" not in str(e.value)


def test_config_defaults_and_key_variables(monkeypatch):
    cfg = base_config()
    cfg["tiers"][1]["providers"][0]["api_key_env"] = "UNIT_STRONG_KEY"
    cfg["auth"]["keys_env"] = "UNIT_CLIENT_KEYS"
    c = parse_config(cfg)
    assert c.router.path == "models/default" and c.routing.score_turn == "last_user" and c.budget is None
    assert c.routing.fallback_to_other_tiers and c.data_classes == {}
    with pytest.raises(
        ConfigError, match=r"tiers\[1\].providers\[0\].api_key_env: environment variable UNIT_STRONG_KEY is not set"
    ):
        c.provider_keys()
    with pytest.raises(ConfigError, match="auth.keys_env: environment variable UNIT_CLIENT_KEYS is not set"):
        c.client_keys()
    monkeypatch.setenv("UNIT_STRONG_KEY", "sk-1")
    monkeypatch.setenv("UNIT_CLIENT_KEYS", "alpha, beta")
    assert c.provider_keys() == {"s": "sk-1", "w": None}
    keys = c.client_keys()
    assert set(keys) == {hash_key("key"), hash_key("alpha"), hash_key("beta")}


# ---- tier policy --------------------------------------------------------------------------------


def provider(name: str, tier: str, context_window: int = 8192, clock=None) -> Provider:
    cfg = ProviderConfig(name=name, base_url="http://127.0.0.1:9/v1", model=name, context_window=context_window)
    return Provider(
        cfg, tier, None, CircuitBreaker(1, 60, clock or Clock()), LatencyWindow(10, 60, 2, clock or Clock())
    )


def options(*tiers: tuple[str, float, list]) -> list[TierOption]:
    """(name, pass chance, [rule or None per provider]) -> tier options."""
    return [
        TierOption(
            name,
            p,
            [
                Standing(provider(f"{name}-{i}", name), rule, f"{rule} detail" if rule else "")
                for i, rule in enumerate(rules)
            ],
        )
        for name, p, rules in tiers
    ]


def test_two_tiers_reproduce_the_binary_rule():
    for p_weak in np.linspace(0, 1, 41):
        for t in np.linspace(0, 1, 41):
            c = choose(options(("weak", p_weak, [None]), ("strong", 1.0, [None])), t, t)
            assert c.index == (0 if p_weak >= t else 1) and c.rule == "score", (p_weak, t)
            assert [s.tier for s in c.skipped] == ([] if p_weak >= t else ["weak"])


def test_cheapest_tier_that_clears_else_the_highest_pass_chance():
    tiers = options(("a", 0.4, [None]), ("b", 0.7, [None]), ("c", 0.9, [None]), ("d", 0.8, [None]))
    assert choose(tiers, 0.6, 0.6).index == 1
    c = choose(tiers, 0.85, 0.85)
    assert c.index == 2 and [s.tier for s in c.skipped] == ["a", "b"]
    c = choose(tiers, 0.95, 0.95)  # none clears: the highest pass chance, and every other tier was passed over
    assert c.index == 2 and "no eligible tier clears" in c.reason and [s.tier for s in c.skipped] == ["a", "b", "d"]
    tie = options(("a", 0.5, [None]), ("b", 0.5, [None]))
    assert choose(tie, 0.9, 0.9).index == 0  # equal pass chances: the cheaper


def test_an_ineligible_tier_is_skipped_with_the_rule_that_excluded_its_last_provider():
    tiers = options(("weak", 0.9, ["data_class", "circuit_open"]), ("mid", 0.9, ["latency"]), ("strong", 1.0, [None]))
    assert [t.eligible for t in tiers] == [False, False, True]
    c = choose(tiers, 0.5, 0.5)
    assert c.index == 2 and c.rule == "circuit_open"
    assert [(s.tier, s.rule) for s in c.skipped] == [("weak", "circuit_open"), ("mid", "latency")]
    assert "weak-0: data_class detail; weak-1: circuit_open detail" in c.reason
    with pytest.raises(NoEligibleTier):
        choose(options(("weak", 0.9, ["context"]), ("strong", 1.0, ["data_class"])), 0.5, 0.5)


def test_budget_rules_say_budget():
    tiers = options(("weak", 0.6, [None]), ("strong", 1.0, [None]))
    c = choose(tiers, 0.8, 0.5)  # pacing lowered the threshold below the weak tier's pass chance
    assert c.index == 0 and c.rule == "budget" and "from 0.8000 to 0.5000" in c.reason
    c = choose(tiers, 0.8, 0.8, affordable=lambda i: i == 0)  # strong chosen, but the budget left cannot pay for it
    assert c.index == 0 and c.rule == "budget" and [(s.tier, s.rule) for s in c.skipped] == [("strong", "budget")]
    assert choose(tiers, 0.8, 0.8, affordable=lambda i: True).index == 1


def test_provider_standing_checks_the_rules_in_order():
    clock = Clock()
    p = provider("a", "weak", context_window=1000, clock=clock)
    assert standing(p, 500, None, None, None).rule is None
    assert standing(p, 500, frozenset({"b"}), "restricted", None).rule == "data_class"
    assert standing(p, 2000, frozenset({"a"}), "restricted", None).rule == "context"
    p.latency.add(0.3), p.latency.add(0.3)
    s = standing(p, 500, None, None, 0.2)
    assert s.rule == "latency" and "p95 latency 300 ms > 200 ms" in s.detail
    assert standing(p, 500, None, None, 0.4).rule is None
    p.breaker.failure()
    assert standing(p, 500, None, None, None).rule == "circuit_open"


def test_fallback_goes_up_the_pricier_tiers_then_down():
    assert fallback_order(1, 4, True) == [1, 2, 3, 0]
    assert fallback_order(0, 3, True) == [0, 1, 2]
    assert fallback_order(2, 3, False) == [2]


def test_latency_window_p95_needs_recent_samples():
    clock = Clock()
    w = LatencyWindow(window=20, max_age_s=10, min_samples=3, clock=clock)
    w.add(0.1), w.add(0.2)
    assert w.p95() is None  # too few
    for s in [0.1] * 17 + [0.9]:
        w.add(s)
    assert w.p95() == 0.2  # nearest rank of 20: the 19th smallest
    w.add(1.0)  # the window holds 20: the oldest (0.1) falls out
    assert w.p95() == 0.9
    clock.t = 11
    assert w.p95() is None  # all forgotten: unknown again


# ---- budget: periods, spend store, pacer ---------------------------------------------------------

MAY_1 = 1714521600.0  # 2024-05-01T00:00:00Z


def test_periods_are_utc_calendar_days_and_months():
    assert period_bounds("day", MAY_1 + 86399) == ("2024-05-01", MAY_1, MAY_1 + 86400)
    assert period_bounds("day", MAY_1 + 86400)[0] == "2024-05-02"
    key, start, end = period_bounds("month", MAY_1 + 20 * 86400)
    assert (key, start, end) == ("2024-05", MAY_1, MAY_1 + 31 * 86400)
    dec = period_bounds("month", 1735000000.0)  # 2024-12-24
    assert dec[0] == "2024-12" and period_bounds("month", dec[2])[0] == "2025-01"


def test_spend_store_is_shared_by_connections_and_survives_reopening(tmp_path):
    path = tmp_path / "spend.sqlite"
    stores = [SpendStore(path) for _ in range(4)]  # as four processes would: one connection each

    def spend(store):
        for _ in range(250):
            store.add("2024-05-01", 0.001)

    threads = [threading.Thread(target=spend, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    usd, requests = stores[0].get("2024-05-01")
    assert requests == 1000 and usd == pytest.approx(1.0)
    for s in stores:
        s.close()
    again = SpendStore(path)
    assert again.get("2024-05-01")[1] == 1000 and again.get("2024-05-02") == (0.0, 0)


def pacer_with(tmp_path, clock, **budget) -> Pacer:
    cfg = BudgetConfig(period="day", usd=100.0, store=str(tmp_path / "spend.sqlite"), warmup_requests=10, **budget)
    return Pacer(cfg, n_tiers=2, clock=clock)


def feed(pacer: Pacer, n: int, rng) -> None:
    """n requests at threshold 0.5 whose weak pass chance is uniform; weak costs $0.01, strong $0.10 (estimates)."""
    for p in rng.uniform(0, 1, n):
        pacer.observe(0.5, np.array([p, 1.0]), np.array([True, True]), np.array([0.01, 0.10]))


def test_pacer_solves_for_the_threshold_that_spends_the_budget_left_evenly(tmp_path):
    clock = Clock()
    clock.t = MAY_1 + 43200  # noon: half the day gone
    pacer = pacer_with(tmp_path, clock)
    feed(pacer, 400, np.random.default_rng(0))
    for _ in range(100):  # 100 requests so far, $30 spent: $70 left for ~100 more, $0.70 each: everything can go strong
        pacer.record(0.30, 1, 0.30)
    assert pacer.state().offset == 1.0
    pacer.ledger.store.add("2024-05-01", 66.0)  # $96 spent by 101 requests: $4 left for ~101 more, ~$0.04 each
    feed(pacer, 10, np.random.default_rng(1))
    state = pacer.state()
    assert state.pace == pytest.approx(96 / 50)
    t = pacer.effective(0.5, state)
    # at $0.01 weak / $0.10 strong, $0.04 a request buys 1/3 strong calls: weak pass chances below t go strong
    assert t == pytest.approx(1 / 3, abs=0.06)


def test_pacer_waits_for_warmup_and_starts_each_period_afresh(tmp_path):
    clock = Clock()
    clock.t = MAY_1 + 43200
    pacer = pacer_with(tmp_path, clock)
    feed(pacer, 9, np.random.default_rng(0))
    for _ in range(9):
        pacer.record(10.0, 1, 0.10)  # far ahead of pace, but not warm yet
    assert pacer.state().offset == 0.0
    feed(pacer, 10, np.random.default_rng(1))  # the offset is re-solved every 10 requests
    pacer.record(10.0, 1, 0.10)
    state = pacer.state()
    assert state.spent == pytest.approx(100.0) and state.offset == -1.0  # all spent: the lowest threshold
    assert pacer.effective(0.5, state) == 0.0 and not pacer.affordable(0, 0.01, state)
    clock.t += 86400
    state = pacer.state()
    assert (state.period, state.spent, state.requests, state.offset) == ("2024-05-02", 0.0, 0, 0.0)


def test_pacer_calibrates_estimates_per_tier_and_clips_to_its_range(tmp_path):
    clock = Clock()
    clock.t = MAY_1 + 600
    pacer = pacer_with(tmp_path, clock, min_threshold=0.3, max_threshold=0.7)
    state = pacer.state()
    assert pacer.effective(0.9, state) == 0.7 and pacer.effective(0.1, state) == 0.3
    assert pacer.affordable(1, 100.0, state) and not pacer.affordable(1, 100.01, state)
    for _ in range(100):
        pacer.record(0.3, 1, 0.1)  # billed 3x the estimate
    state = pacer.state()
    assert pacer.affordable(1, (100 - 30) / 3.05, state) and not pacer.affordable(1, (100 - 30) / 2.9, state)
