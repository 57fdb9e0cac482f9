"""Budget pacing end to end: a simulated day of real GSM8K prompts through the service, spend across restarts."""

from __future__ import annotations

import math
import re
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest

from learned_router.tools.fake_provider import prompt_key
from serving_fixtures import (
    needs_router,
    CLIENT_KEY,
    ROOT,
    FakeProvider,
    provider_entry,
    service_config,
    in_process,
    openai_client,
    two_tiers,
)

pytestmark = needs_router

GSM8K = ROOT.parent / "shared" / "datasets" / "routellm_gsm8k.parquet"
STRONG, WEAK = "gpt-4-1106-preview", "mistralai/Mixtral-8x7B-Instruct-v0.1"
PRICES = {"weak": (0.6, 0.6), "strong": (10.0, 30.0)}  # USD per 1M tokens, in / out
MAY_1 = 1714521600.0  # 2024-05-01T00:00:00Z
N_PROMPTS = 600
BASE_THRESHOLD = 0.9  # without a budget, ~97% of these prompts would go strong
BEHIND_PACE = {"period": "day", "usd": 1000.0, "warmup_requests": 5, "window": 10}  # a day's budget barely touched


class SimClock:
    """The service's wall clock (epoch seconds), moved by the test: a day passes in seconds."""

    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


@contextmanager
def budgeted(tmp_path, budget: dict, **config):
    """Two fake tiers at PRICES and the service config that routes between them under `budget` (its spend store in
    tmp_path): (config, weak, strong)."""
    with FakeProvider(name="weak", model=WEAK) as weak, FakeProvider(name="strong", model=STRONG) as strong:
        cfg = service_config(
            two_tiers(
                [provider_entry("weak", weak, None, WEAK, PRICES["weak"])],
                [provider_entry("strong", strong, None, STRONG, PRICES["strong"])],
            ),
            budget={**budget, "store": str(tmp_path / "spend.sqlite")},
            **config,
        )
        yield cfg, weak, strong


def metric(http, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", http.get("/metrics").text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


@pytest.fixture(scope="module")
def day() -> pd.DataFrame:
    """N_PROMPTS clean GSM8K prompts in a random order, with each model's correctness and answer length (words ~ tokens),
    and what each tier would cost for each prompt (as the fake providers bill it)."""
    d = pd.read_parquet(GSM8K)
    d = d[~d["contaminated"]]
    wide = d.pivot_table(index="prompt", columns="model", values=["score", "output_chars"], aggfunc="first")
    wide = wide.sample(N_PROMPTS, random_state=0)
    out = pd.DataFrame({"prompt": wide.index})
    for tier, model in (("weak", WEAK), ("strong", STRONG)):
        out[f"{tier}_ok"] = wide["score"][model].to_numpy(float)
        out[f"{tier}_words"] = np.ceil(wide["output_chars"][model].to_numpy(float) / 4).astype(int)
    prompt_tokens = np.array([math.ceil(len(p) / 4) + 4 for p in out["prompt"]])
    for tier, (pin, pout) in PRICES.items():
        out[f"{tier}_usd"] = (prompt_tokens * pin + out[f"{tier}_words"] * pout) / 1e6
    return out


def fixed_threshold_frontier(day: pd.DataFrame, p_weak: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spend and accuracy of every fixed threshold (weak when p_weak >= t) over the day, in hindsight."""
    thresholds = np.concatenate([np.unique(p_weak), [1.01]])
    weak = p_weak[None, :] >= thresholds[:, None]
    spend = np.where(weak, day["weak_usd"].to_numpy(), day["strong_usd"].to_numpy()).sum(1)
    accuracy = np.where(weak, day["weak_ok"].to_numpy(), day["strong_ok"].to_numpy()).mean(1)
    return spend, accuracy


@pytest.mark.slow
def test_a_simulated_day_stays_within_budget_near_the_best_fixed_threshold_in_hindsight(day, tmp_path):
    budget = 0.35 * day["strong_usd"].sum() + 0.65 * day["weak_usd"].sum()  # the price of ~35% strong calls
    clock = SimClock(MAY_1)
    limits = {"period": "day", "usd": budget, "window": 300}
    with budgeted(tmp_path, limits, routing={"threshold": BASE_THRESHOLD}) as (cfg, weak, strong):
        weak.control(
            answer_words={prompt_key(p): int(w) for p, w in zip(day["prompt"], day["weak_words"], strict=True)}
        )
        strong.control(
            answer_words={prompt_key(p): int(w) for p, w in zip(day["prompt"], day["strong_words"], strict=True)}
        )
        arrivals = np.sort(np.random.default_rng(0).uniform(0, 86400, len(day)))
        with in_process(cfg, clock=clock) as service:
            client = openai_client(service, CLIENT_KEY)
            tiers, costs, effective, p_weak = [], [], [], []
            for prompt, at in zip(day["prompt"], arrivals, strict=True):
                clock.t = MAY_1 + at
                raw = client.chat.completions.with_raw_response.create(
                    model="router", messages=[{"role": "user", "content": prompt}]
                )
                tiers.append(raw.headers["x-router-tier"])
                costs.append(float(raw.headers["x-router-cost-usd"]))
                effective.append(float(raw.headers["x-router-effective-threshold"]))
                p_weak.append(float(raw.headers["x-router-pass-chances"].split(",")[0].removeprefix("weak=")))
            spent = metric(service, "router_budget_spent_usd")
    spend, accuracy = fixed_threshold_frontier(day, np.array(p_weak))  # the router's real scores, 4 decimals
    best = accuracy[spend <= budget].max()
    routed_weak = np.array(tiers) == "weak"
    quality = np.where(routed_weak, day["weak_ok"], day["strong_ok"]).mean()
    billed = np.where(routed_weak, day["weak_usd"], day["strong_usd"])
    print(
        f"\nbudget ${budget:.4f}: spent ${spent:.4f} ({spent / budget:.1%}), strong calls {1 - routed_weak.mean():.1%}, "
        f"accuracy {quality:.4f} vs best fixed threshold in hindsight {best:.4f} (all strong {accuracy[-1]:.4f}, "
        f"all weak {accuracy[0]:.4f}); effective threshold min {min(effective):.3f} max {max(effective):.3f}"
    )
    assert spent == pytest.approx(sum(costs)) and costs == pytest.approx(
        billed.tolist(), abs=1e-8
    )  # billed as configured
    assert spent <= budget
    assert quality >= best - 0.015
    assert min(effective) < BASE_THRESHOLD  # pacing had to cut the threshold to fit the budget


def test_spend_persists_across_a_restart_and_shows_in_metrics_and_route(tmp_path):
    clock = SimClock(MAY_1 + 3 * 3600)  # 03:00 UTC: an eighth of the day gone
    prompt = [{"role": "user", "content": "Natalia sold clips to 48 of her friends in April. How many in May?"}]
    with budgeted(tmp_path, {"period": "day", "usd": 1.0}) as (cfg, _, _):
        with in_process(cfg, clock=clock) as first:
            client = openai_client(first, CLIENT_KEY)
            costs = [
                float(
                    client.chat.completions.with_raw_response.create(model="router-1", messages=prompt).headers[
                        "x-router-cost-usd"
                    ]
                )
                for _ in range(3)
            ]
            list(
                client.chat.completions.create(model="router-1", messages=prompt, stream=True)
            )  # a stream is billed at its end
            spent = metric(first, "router_budget_spent_usd")
            assert spent == pytest.approx(sum(costs) * 4 / 3) and costs[0] > 0
        with in_process(cfg, clock=clock) as second:  # a new process on the same store
            assert metric(second, "router_budget_spent_usd") == pytest.approx(spent)
            assert metric(second, "router_budget_usd") == 1.0
            assert metric(second, "router_budget_pace") == pytest.approx(spent / (1.0 / 8))
            assert metric(second, "router_effective_threshold") == metric(second, "router_threshold")  # not warm yet
            route = second.post(
                "/v1/route",
                json={"model": "router", "messages": prompt},
                headers={"Authorization": f"Bearer {CLIENT_KEY}"},
            ).json()
            assert route["budget"]["spent_usd"] == pytest.approx(spent) and route["budget"]["requests"] == 4
            assert route["budget"]["period"] == "2024-05-01" and route["budget"]["pace"] == pytest.approx(spent * 8)
            client = openai_client(second, CLIENT_KEY)
            client.chat.completions.create(model="router-1", messages=prompt)
            assert metric(second, "router_budget_spent_usd") == pytest.approx(spent + costs[0])
            clock.t += 86400  # the next UTC day starts from nothing
            assert metric(second, "router_budget_spent_usd") == 0.0


def test_once_the_budget_is_spent_only_the_cheapest_tier_answers_and_headers_say_budget(tmp_path):
    prompt = [{"role": "user", "content": "Prove that the square root of 2 is irrational."}]
    with budgeted(tmp_path, {"period": "month", "usd": 0.0005}) as (cfg, _, strong):
        with in_process(cfg, clock=SimClock(MAY_1 + 86400)) as service:
            client = openai_client(service, CLIENT_KEY)
            r = client.chat.completions.with_raw_response.create(model="router-1", messages=prompt)
            # a strong answer would cost ~$0.008 (with the assumed 256 output tokens): more than the $0.0005 left
            assert (r.headers["x-router-tier"], r.headers["x-router-rule"], r.headers["x-router-skipped"]) == (
                "weak",
                "budget",
                "strong=budget",
            )
            assert r.parse().model == WEAK and strong.stats()["requests"] == 0
            d = service.post(
                "/v1/route",
                json={"model": "router-1", "messages": prompt},
                headers={"Authorization": f"Bearer {CLIENT_KEY}"},
            ).json()
            assert d["budget"]["period"] == "2024-05" and d["budget"]["elapsed_share"] == pytest.approx(1 / 31)
            assert "cannot pay for strong" in d["reason"]
            assert d["skipped"] == [
                {"tier": "strong", "rule": "budget", "detail": "its estimated cost exceeds what is left of the budget"}
            ]


def test_an_explicit_threshold_wins_over_pacing_until_the_budget_is_spent(tmp_path):
    """Far behind pace, pacing raises `router`'s threshold to its configured maximum; `router-0` still gets the cheapest
    tier."""
    prompt = [{"role": "user", "content": "Natalia sold clips to 48 of her friends in April. How many in May?"}]
    with budgeted(tmp_path, BEHIND_PACE | {"max_threshold": 1.0}) as (cfg, _, _):
        with in_process(cfg, clock=SimClock(MAY_1 + 12 * 3600)) as service:
            client = openai_client(service, CLIENT_KEY)
            for _ in range(12):
                client.chat.completions.create(model="router-0.5", messages=prompt)
            paced = client.chat.completions.with_raw_response.create(model="router", messages=prompt)
            assert paced.headers["x-router-effective-threshold"] == "1.0000"  # behind pace: everything may go strong
            explicit = client.chat.completions.with_raw_response.create(model="router-0", messages=prompt)
            assert (explicit.headers["x-router-tier"], explicit.headers["x-router-rule"]) == ("weak", "score")
            assert (
                explicit.headers["x-router-effective-threshold"] == explicit.headers["x-router-threshold"] == "0.0000"
            )
            forced = client.chat.completions.with_raw_response.create(model="router-1", messages=prompt)
            assert forced.headers["x-router-tier"] == "strong"  # the budget can pay for it: the instruction holds


def test_by_default_the_budget_is_a_cap_and_pacing_never_raises_a_threshold(tmp_path):
    """Far behind pace with no max_threshold: requests keep their own threshold, so an under-used budget is not spent."""
    prompt = [{"role": "user", "content": "Natalia sold clips to 48 of her friends in April. How many in May?"}]
    with budgeted(tmp_path, BEHIND_PACE) as (cfg, _, _):
        with in_process(cfg, clock=SimClock(MAY_1 + 12 * 3600)) as service:
            client = openai_client(service, CLIENT_KEY)
            for _ in range(12):
                client.chat.completions.create(model="router", messages=prompt)
            paced = client.chat.completions.with_raw_response.create(model="router", messages=prompt)
            h = paced.headers
            assert h["x-router-effective-threshold"] == h["x-router-threshold"] and h["x-router-tier"] == "weak", dict(
                h
            )
            route = service.post(
                "/v1/route",
                json={"model": "router", "messages": prompt},
                headers={"Authorization": f"Bearer {CLIENT_KEY}"},
            ).json()
            assert route["budget"]["threshold_offset"] > 0  # behind pace: the solver would raise it, and the cap holds
