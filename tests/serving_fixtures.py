"""Helpers for the serving tests: the service in process (FastAPI's test client) or on a real socket (uvicorn in a
thread on a free loopback port), and fake providers on real sockets."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from learned_router.serving.app import create_app
from learned_router.serving.config import hash_key, parse_config
from learned_router.tools.fake_provider import FakeState, create_fake_provider
from learned_router.tools.inprocess import ServerThread, free_port  # noqa: F401  (the tests' import point)
from learned_router.serving.service import Service

ROOT = Path(__file__).resolve().parents[1]
ROUTER_DIR = Path(os.environ.get("LEARNED_ROUTER_TEST_ROUTER", ROOT / "models" / "default"))
needs_router = pytest.mark.skipif(
    not (ROUTER_DIR / "router.json").is_file(), reason=f"no trained router at {ROUTER_DIR}"
)
CLIENT_KEY = "sk-router-test-client-0123456789"
OTHER_KEY = "sk-router-test-limited-abcdef"
PROVIDER_KEYS = {
    "TEST_STRONG_A_KEY": "sk-prov-strong-a-SECRET",
    "TEST_STRONG_B_KEY": "sk-prov-strong-b-SECRET",
    "TEST_WEAK_A_KEY": "sk-prov-weak-a-SECRET",
    "TEST_WEAK_B_KEY": "sk-prov-weak-b-SECRET",
}


class FakeProvider(ServerThread):
    def __init__(self, **state):
        super().__init__(create_fake_provider(FakeState(**state)))

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def control(self, **changes) -> dict:
        r = httpx.post(self.url + "/_control", json=changes, timeout=5)
        r.raise_for_status()
        return r.json()

    def stats(self) -> dict:
        return httpx.get(self.url + "/_stats", timeout=5).json()

    def heal(self) -> None:
        """Back to answering well: no fault, no delay, an honest judge."""
        self.control(mode="ok", latency_ms=0, chunk_delay_ms=0, fail_rate=0, judge_garbage_rate=0.0, judge_rating=None)


@contextlib.contextmanager
def judged_fakes(fail_words: list[str]):
    """A weak fake that cannot answer prompts with `fail_words`, a strong one, and a judge that grades them."""
    with (
        FakeProvider(name="weak", fail_words=fail_words) as weak,
        FakeProvider(name="strong") as strong,
        FakeProvider(name="judge", judge=True) as judge,
    ):
        yield weak, strong, judge


def provider_entry(
    name: str, fake: FakeProvider, key_env: str, model: str, prices: tuple[float, float], **extra
) -> dict:
    return {
        "name": name,
        "base_url": fake.base_url,
        "api_key_env": key_env,
        "model": model,
        "input_price_per_1m": prices[0],
        "output_price_per_1m": prices[1],
        **extra,
    }


def router_output() -> str:
    """The test router's weak model: the output the weak tier scores with."""
    return json.loads((ROUTER_DIR / "router.json").read_text())["weak"]


def two_tiers(weak: list[dict], strong: list[dict]) -> list[dict]:
    """Two tiers: weak (scored) and strong (unscored)."""
    return [{"name": "weak", "score": router_output(), "providers": weak}, {"name": "strong", "providers": strong}]


def service_config(tiers: list[dict], **sections) -> dict:
    cfg = {
        "router": {"path": str(ROUTER_DIR)},
        "tiers": tiers,
        "retry": {"attempts": 2, "backoff_base_s": 0.01, "backoff_max_s": 0.05, "max_retry_after_s": 0.5},
        "circuit_breaker": {"failures": 3, "cooldown_s": 0.5},
        "auth": {
            "keys": [
                {"name": "test", "sha256": hash_key(CLIENT_KEY)},
                {"name": "limited", "sha256": hash_key(OTHER_KEY), "requests_per_minute": 60},
            ]
        },
        "rate_limit": {"requests_per_minute": 100000, "burst": 50},
        "limits": {"max_body_bytes": 65536},
        "readiness": {"probe_timeout_s": 1, "cache_s": 0},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return cfg


def service_app(cfg: dict, router=None, **service):
    for k, v in PROVIDER_KEYS.items():
        os.environ.setdefault(k, v)
    return create_app(Service(parse_config(cfg), router=router, **service))


def start_service(cfg: dict, router=None, http: str | type = "auto", **service) -> ServerThread:
    """The service on a real socket: for what needs one (concurrent clients, streams cut mid-way, slow clients)."""
    return ServerThread(service_app(cfg, router, **service), http=http)


def in_process(cfg: dict, router=None, **service) -> TestClient:
    """The service in this process behind FastAPI's test client (use it in a `with`: the app's start-up and shutdown
    run); `openai_client(it)` gives the real openai client over it."""
    return TestClient(service_app(cfg, router, **service))


def openai_client(http: TestClient, key: str = CLIENT_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=str(http.base_url) + "/v1", api_key=key, http_client=http, max_retries=0)


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02):
    """Poll until `predicate()` is truthy (returns its value); AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
