"""A bounded soak of the service on 127.0.0.1: thousands of requests through fault phases, every one accounted for.

    learned-router soak --router models/default --requests 3000

One process runs the service (the real router), a weak and a strong fake provider and the load (16 concurrent
clients on keep-alive connections, a third of the requests streamed). The phases break the weak provider one way
after another, then heal it; hostile clients send a fifth of every phase's requests (lone surrogates, broken JSON,
bad fields). It prints, per phase: sent, answered (2xx; a stream ended by [DONE]), refused (4xx: the hostile
requests), stream errors (a stream ended by the router's error event), 5xx other than 500 (every provider failed),
500s and lost (no complete response: a dropped connection or a truncated stream). Exit code 1 unless 0 lost, 0 500s,
and no 5xx in the phase whose strong provider fails while the weak one's circuit is half-open (`STRICT`): the weak
provider answers there, so no request may fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from ..serving.app import create_app
from ..serving.config import hash_key, parse_config
from .fake_provider import FakeState, create_fake_provider
from .inprocess import ServerThread
from ..serving.service import Service

KEY = "sk-soak-client-key"
GOOD_CHUNK = json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "partial"}}]})
STRICT = "strong down, weak half-open"
PHASES = [  # (name, the weak provider's settings); the strong provider is healthy but in STRICT
    ("healthy", {"mode": "ok"}),
    ("weak 30% 503", {"mode": "ok", "fail_rate": 0.3}),
    ("weak 429", {"mode": "429", "retry_after": 1}),
    ("weak hangs", {"mode": "hang"}),
    (
        "weak malformed streams",
        {"mode": "raw", "raw_events": [GOOD_CHUNK, '{"choices":[{"delta":"str"}]}'], "raw_body": '{"choices":"x"}'},
    ),
    (
        "weak streams without [DONE]",
        {
            "mode": "raw",
            "raw_events": [GOOD_CHUNK, GOOD_CHUNK],
            "raw_body": json.dumps({"choices": [{"message": {"content": "hi"}}]}),
        },
    ),
    ("weak insane usage", {"mode": "ok", "usage": {"prompt_tokens": -1, "completion_tokens": 1e308}}),
    (STRICT, {"mode": "ok", "latency_ms": 300}),  # slow: requests arrive while its probe is in flight
    ("healed", {"mode": "ok"}),
]
HOSTILE = [
    b'{"model":"router","messages":[{"role":"user","content":"\\ud800"}]}',
    b'{"model":"router","messages":[{"role":"system","content":"\\udfff"},{"role":"user","content":"hi"}]}',
    b'{"model":"router","messages":[{"role":"user","content":"hi"}],"user":"\\ud83d"}',
    b'{"model":"router-0.5\\n","messages":[{"role":"user","content":"hi"}]}',
    b'{"model":"router","messages":[{"role":"user","content":"hi"}',
    b'{"model":"router","messages":[{"role":"robot","content":"hi"}]}',
    b'{"model":"router","max_tokens":-1,"messages":[{"role":"user","content":"hi"}]}',
    b"[1,2,3]",
    b'\xff{"model":"router"}',
    b'{"model":"router","messages":[{"role":"user","content":"hi"}],"router":{"latency_budget_ms":"soon"}}',
]


def body(i: int) -> tuple[bytes, bool]:
    """The i-th request of a phase and whether it streams: a fifth hostile, the rest honest (a third streamed)."""
    if i % 5 == 4:
        return HOSTILE[(i // 5) % len(HOSTILE)], False
    stream = i % 3 == 0
    model = "router-0" if i % 2 else "router"  # half forced to the weak tier, so the faults are met
    text = f"Explain topic number {i} in two sentences, with one example."
    return json.dumps(
        {"model": model, "stream": stream, "messages": [{"role": "user", "content": text}]}
    ).encode(), stream


async def one(client: httpx.AsyncClient, raw: bytes, stream: bool) -> str:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    try:
        async with client.stream("POST", "/v1/chat/completions", content=raw, headers=headers) as r:
            text = (await r.aread()).decode("utf-8", "replace")
    except httpx.HTTPError:
        return "lost"
    if r.status_code == 500:
        return "500"
    if r.status_code >= 500:
        return "5xx"
    if r.status_code >= 400:
        return "refused"
    if not stream:
        return "answered" if text.startswith("{") and json.loads(text).get("choices") is not None else "lost"
    last = [line for line in text.splitlines() if line.startswith("data: ")][-1:]
    if last == ["data: [DONE]"]:
        return "answered"
    return "stream_error" if last and '"error"' in last[0] else "lost"


async def phase(url: str, n: int, concurrency: int) -> Counter:
    counts: Counter = Counter()
    queue = iter(range(n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker():
            for i in queue:
                raw, stream = body(i)
                counts[await one(client, raw, stream)] += 1
                counts["sent"] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counts


def run(router: str, requests: int, concurrency: int = 16) -> list[tuple[str, Counter]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    per_phase = max(1, requests // len(PHASES))
    weak_state, strong_state = FakeState(name="weak", model="mixtral-8x7b"), FakeState(name="strong", model="gpt-4")
    results = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        ServerThread(create_fake_provider(weak_state)) as weak,
        ServerThread(create_fake_provider(strong_state)) as strong,
    ):
        from ..scorer import Router

        loaded = Router.load(router)
        provider = {"api_key_env": None, "timeout_s": 1.0, "connect_timeout_s": 1.0}
        cfg = parse_config(
            {
                "router": {"path": router},
                "tiers": [
                    {
                        "name": "weak",
                        "score": loaded.manifest.weak,
                        "providers": [
                            {
                                **provider,
                                "name": "weak",
                                "base_url": weak.url + "/v1",
                                "model": "mixtral-8x7b",
                                "input_price_per_1m": 0.6,
                                "output_price_per_1m": 0.6,
                            }
                        ],
                    },
                    {
                        "name": "strong",
                        "providers": [
                            {
                                **provider,
                                "name": "strong",
                                "base_url": strong.url + "/v1",
                                "model": "gpt-4",
                                "input_price_per_1m": 10.0,
                                "output_price_per_1m": 30.0,
                            }
                        ],
                    },
                ],
                "retry": {"attempts": 2, "backoff_base_s": 0.01, "backoff_max_s": 0.05, "max_retry_after_s": 2},
                "circuit_breaker": {"failures": 5, "cooldown_s": 2},
                "budget": {"period": "day", "usd": 1000.0, "store": str(Path(tmp) / "spend.sqlite")},
                "auth": {"keys": [{"name": "soak", "sha256": hash_key(KEY)}]},
                "rate_limit": {"requests_per_minute": 0},
            }
        )
        svc = Service(cfg, router=loaded)
        with ServerThread(create_app(svc)) as service:
            for name, settings in PHASES:
                for state, given in (
                    (weak_state, settings),
                    (strong_state, {"mode": "error"} if name == STRICT else {}),
                ):
                    for k, v in {**FakeState().__dict__, **given}.items():
                        if k not in ("name", "model", "seed", "api_key", "answer_words"):
                            setattr(state, k, v)
                if name == STRICT:  # open the weak circuit and let its cool-down pass: the phase starts half-open
                    weak = next(p for p in svc.upstream.providers() if p.name == "weak")
                    for _ in range(cfg.circuit_breaker.failures):
                        weak.breaker.failure()
                    time.sleep(cfg.circuit_breaker.cooldown_s)
                t0 = time.monotonic()
                counts = asyncio.run(phase(service.url, per_phase, concurrency))
                counts["seconds"] = round(time.monotonic() - t0, 1)
                results.append((name, counts))
                print(f"{name:30s} " + "  ".join(f"{k} {counts[k]}" for k in COLUMNS), flush=True)
    return results


COLUMNS = ["sent", "answered", "refused", "stream_error", "5xx", "500", "lost", "seconds"]
