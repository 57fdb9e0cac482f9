"""Three `learned-router serve` processes on one real Redis behave as one service: one rate limit per client, one
circuit per provider (one probe after the cool-down), one budget ledger; Redis killed mid-traffic loses nothing."""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from learned_router.tools.bench_serve import RedisServer
from learned_router.serving.budget import period_bounds
from learned_router.serving.config import CircuitConfig, RateLimitConfig, StateConfig, parse_config
from learned_router.serving.errors import ConfigError
from learned_router.serving.metrics import Metrics
from learned_router.serving.state import SPEND, RedisState
from serving_fixtures import (
    needs_router,
    CLIENT_KEY,
    OTHER_KEY,
    FakeProvider,
    free_port,
    provider_entry,
    service_config,
    start_service,
    two_tiers,
    wait_for,
)

pytestmark = [
    pytest.mark.skipif(
        shutil.which("redis-server") is None, reason="needs redis-server (apt-get install redis-server)"
    ),
    needs_router,
    pytest.mark.slow,  # replicas as `learned-router serve` processes on real sockets and a real redis-server
]

WEAK, STRONG = "mixtral-8x7b", "gpt-4-1106-preview"
FAILURES = 3
BURST = 12
PREFIX = "test-router:"
LIMITED_RPM = 0.6  # one token per 100 s: no refill during a test


def metric(url: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", httpx.get(url + "/metrics", timeout=5).text, re.M)
    assert m, f"{name}{labels} not in /metrics"
    return float(m.group(1))


def replica_config(weak_url: str, strong: FakeProvider, redis_url: str, **state) -> dict:
    weak = {"name": "weak", "base_url": weak_url, "model": WEAK, "input_price_per_1m": 0.6, "output_price_per_1m": 0.6}
    cfg = service_config(
        two_tiers([weak], [provider_entry("strong", strong, None, STRONG, (10.0, 30.0))]),
        retry={"attempts": 1},
        circuit_breaker={"failures": FAILURES, "cooldown_s": 600},
        rate_limit={"requests_per_minute": 1e6, "burst": BURST},
        budget={"period": "day", "usd": 1000.0},
        state={"backend": "redis", "url": redis_url, "prefix": PREFIX, "retry_s": 0.2, **state},
    )
    cfg["auth"]["keys"][1]["requests_per_minute"] = LIMITED_RPM
    return cfg


class Replica:
    """`learned-router serve` in a subprocess; its log in `log`."""

    def __init__(self, config: Path, log: Path):
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-c",
            "from learned_router.cli import app; app()",
            "serve",
            "--config",
            str(config),
            "--port",
            str(self.port),
            "--no-access-log",
        ]
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def wait_up(self) -> None:
        def up():
            assert self.proc.poll() is None, self.log.read_text()
            try:
                return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=120, interval=0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Redis, a weak and a strong fake provider, and three replicas; replica 0 cannot reach the weak provider."""
    tmp = tmp_path_factory.mktemp("redis-stack")
    with (
        RedisServer(tmp / "redis") as server,
        FakeProvider(name="weak", model=WEAK) as weak,
        FakeProvider(name="strong", model=STRONG) as strong,
    ):
        broken = replica_config(f"http://127.0.0.1:{free_port()}/v1", strong, server.url)  # nothing listens there
        healthy = replica_config(weak.base_url, strong, server.url)
        for name, cfg in (("broken", broken), ("healthy", healthy)):
            (tmp / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        replicas = [
            Replica(tmp / ("broken.yaml" if i == 0 else "healthy.yaml"), tmp / f"replica{i}.log") for i in range(3)
        ]
        try:
            for r in replicas:
                r.wait_up()
            yield {
                "redis": server,
                "weak": weak,
                "strong": strong,
                "replicas": replicas,
                "db": redis.Redis(port=server.port, decode_responses=True),
            }
        finally:
            for r in replicas:
                r.stop()


def chat(url: str, model: str = "router", key: str = CLIENT_KEY, content: str = "What is 2 + 2?") -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
        json={"model": model, "max_tokens": 32, "messages": [{"role": "user", "content": content}]},
    )


def shared_spend(db: redis.Redis) -> tuple[float, int]:
    h = db.hgetall(f"{PREFIX}spend:{period_bounds('day', time.time())[0]}")
    return float(h.get("usd", 0)), int(h.get("requests", 0))


def test_a_client_spreading_requests_over_the_replicas_gets_one_rate_limit(stack):
    replicas = stack["replicas"]
    statuses = [
        httpx.get(replicas[i % 3].url + "/v1/models", headers={"Authorization": f"Bearer {OTHER_KEY}"}, timeout=5)
        for i in range(3 * BURST)
    ]
    assert sum(r.status_code == 200 for r in statuses) == BURST  # one bucket: per process it would be 3 x BURST
    refused = [r for r in statuses if r.status_code == 429]
    assert len(refused) == 2 * BURST and all(int(r.headers["retry-after"]) >= 1 for r in refused)
    assert {i % 3 for i, r in enumerate(statuses) if r.status_code == 429} == {0, 1, 2}


def test_a_provider_broken_for_one_replica_is_skipped_by_all_then_probed_once(stack):
    replicas, weak, db = stack["replicas"], stack["weak"], stack["db"]
    weak.control(reset_stats=True, latency_ms=0)
    for _ in range(FAILURES):  # replica 0 cannot reach the weak provider: each request falls back to the strong one
        r = chat(replicas[0].url, model="router-0.0")
        assert (
            r.status_code == 200
            and r.headers["x-router-provider"] == "strong"
            and r.headers["x-router-fallbacks"] == "1"
        )
    for i in range(6):  # the others skip it at once: it never hears from them
        r = chat(replicas[1 + i % 2].url, model="router-0.0")
        assert r.status_code == 200 and r.headers["x-router-provider"] == "strong"
    assert weak.stats()["requests"] == 0
    for r in replicas:
        wait_for(lambda r=r: metric(r.url, "router_circuit_state", '{provider="weak"}') == 2)

    # The cool-down passes (moved back in Redis): six concurrent requests on two replicas, one probe reaches it.
    weak.control(latency_ms=3000)  # the probe is in flight while the other five arrive
    key = f"{PREFIX}circuit:weak"
    db.hset(key, "opened", int(db.hget(key, "opened")) - 600_000)
    for r in replicas[1:]:
        wait_for(lambda r=r: metric(r.url, "router_circuit_state", '{provider="weak"}') == 1)
    with ThreadPoolExecutor(6) as pool:
        answers = list(
            pool.map(lambda i: chat(replicas[1 + i % 2].url, model="router-0.0", content=f"probe {i}"), range(6))
        )
    assert all(r.status_code == 200 for r in answers)
    assert weak.stats()["requests"] == 1 and sorted(r.headers["x-router-provider"] for r in answers) == [
        "strong"
    ] * 5 + ["weak"]
    weak.control(latency_ms=0)
    r = chat(replicas[2].url, model="router-0.0")  # the probe closed the circuit for every replica
    assert r.headers["x-router-provider"] == "weak"
    wait_for(lambda: db.exists(key) == 0)


def answer_all(urls: list[str], n: int, prefix: str, workers: int = 6) -> list[httpx.Response]:
    with ThreadPoolExecutor(workers) as pool:
        return list(
            pool.map(
                lambda i: chat(urls[i % len(urls)], content=f"{prefix} question {i}: how do tides work?"), range(n)
            )
        )


def counted(urls: list[str]) -> tuple[float, int]:
    """Dollars billed and answers served by the replicas since they started, from their own counters (no streams
    here: every answer billed was served). The ledger must hold exactly these."""
    texts = [httpx.get(url + "/metrics", timeout=5).text for url in urls]
    usd = math.fsum(float(v) for t in texts for v in re.findall(r"^router_cost_usd_total\{.*\} (\S+)$", t, re.M))
    return usd, sum(int(float(v)) for t in texts for v in re.findall(r"^router_served_total\{.*\} (\S+)$", t, re.M))


def ledger_holds_what_the_replicas_counted(db: redis.Redis, urls: list[str], timeout: float = 10.0) -> None:
    wait_for(lambda: shared_spend(db)[1] == counted(urls)[1], timeout=timeout)
    (usd, n), (billed, served) = shared_spend(db), counted(urls)
    assert n == served and math.isclose(usd, billed, rel_tol=1e-9)


def test_concurrent_answers_across_replicas_add_up_in_the_shared_spend(stack):
    replicas, db = stack["replicas"], stack["db"]
    urls = [r.url for r in replicas]
    served0 = counted(urls)[1]
    answers = answer_all(urls, 60, "spend")
    assert all(r.status_code == 200 for r in answers) and counted(urls)[1] == served0 + 60
    ledger_holds_what_the_replicas_counted(db, urls)
    usd = shared_spend(db)[0]
    for r in replicas:  # the pacer of each replica reads the ledger of all
        wait_for(lambda r=r: math.isclose(metric(r.url, "router_budget_spent_usd"), usd, rel_tol=1e-9))


def test_a_spend_batch_resent_after_a_lost_reply_counts_once(stack):
    db = stack["db"]
    keys = [f"{PREFIX}writer:test", f"{PREFIX}spend:2000-01-01", f"{PREFIX}spend:2000-01-02"]
    batch = [1, "0.25", 2, "0.5", 3, 60]  # batch 1: $0.25 of 2 answers on Jan 1, $0.5 of 3 on Jan 2
    assert db.eval(SPEND, 3, *keys, *batch) == ["0.25", "2", "0.5", "3"]
    assert db.eval(SPEND, 3, *keys, *batch) == ["0.25", "2", "0.5", "3"]  # the same batch again: already applied
    assert db.eval(SPEND, 3, *keys, 2, "0.25", 1, "0", 0, 60) == ["0.5", "3", "0.5", "3"]


def test_redis_killed_and_restarted_mid_traffic_loses_no_request_and_no_spend(stack):
    replicas, server, db = stack["replicas"], stack["redis"], stack["db"]
    urls = [r.url for r in replicas]
    answers: list[httpx.Response] = []
    stop = threading.Event()

    def traffic(worker: int) -> None:
        i = 0
        while not stop.is_set():
            answers.append(chat(urls[(worker + i) % 3], content=f"outage {worker} {i}: why is the sky blue?"))
            i += 1

    threads = [threading.Thread(target=traffic, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(answers) >= 20, timeout=60)
        server.kill()
        for url in urls:
            wait_for(lambda url=url: metric(url, "router_state_shared") == 0, timeout=30)
        seen = len(answers)
        wait_for(lambda: len(answers) >= seen + 20, timeout=60)  # served on per-process state
        server.start()
        for url in urls:
            wait_for(lambda url=url: metric(url, "router_state_shared") == 1, timeout=30)
        seen = len(answers)
        wait_for(lambda: len(answers) >= seen + 20, timeout=60)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert [r.status_code for r in answers] == [200] * len(answers)
    ledger_holds_what_the_replicas_counted(db, urls, timeout=30)
    logs = "".join(r.log.read_text() for r in replicas)
    assert "Redis failed" in logs and "Redis answers again" in logs and "held while Redis was down" in logs


def test_redis_down_at_start_up_is_one_line_and_exit_2_unless_local_state_is_allowed(tmp_path):
    server = RedisServer(tmp_path / "redis")
    with FakeProvider(name="strong", model=STRONG) as strong:
        cfg = replica_config(strong.base_url, strong, server.url)
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
        run = subprocess.run(
            [
                sys.executable,
                "-c",
                "from learned_router.cli import app; app()",
                "serve",
                "--config",
                str(tmp_path / "config.yaml"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 2 and "Traceback" not in run.stderr
        assert (
            "state.url: cannot use Redis at redis://127.0.0.1:" in run.stderr
            and "unavailable_at_start: local" in run.stderr
        )

        try:
            with start_service({**cfg, "state": {**cfg["state"], "unavailable_at_start": "local"}}) as svc:
                ready = httpx.get(svc.url + "/readyz", timeout=5).json()
                assert ready["state"] == "per-process" and chat(svc.url).status_code == 200
                server.start()
                wait_for(lambda: metric(svc.url, "router_state_shared") == 1)
                assert chat(svc.url).status_code == 200
                db = redis.Redis(port=server.port, decode_responses=True)
                wait_for(lambda: shared_spend(db)[1] == 2)  # the answer served before Redis came up is in the ledger
            with start_service(cfg) as again:  # a restarted replica reads the spend of the period from Redis
                budget = httpx.post(
                    again.url + "/v1/route",
                    headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                    timeout=10,
                    json={"model": "router", "messages": [{"role": "user", "content": "hi"}]},
                ).json()["budget"]
                assert (budget["spent_usd"], budget["requests"]) == shared_spend(db)
        finally:
            server.stop()


@pytest.mark.parametrize(
    "state, error",
    [
        ({"backend": "redis"}, "config: state: backend redis needs url"),
        ({"backend": "redis", "url": "http://localhost:6379"}, "config: state.url: must be redis://host:port/db"),
        ({"backend": "redis", "url": "redis://:secret@localhost:6379/0"}, "the password goes in password_env"),
        ({"url": "redis://localhost:6379/0"}, "url and password_env are for backend: redis"),
        ({"backend": "memcached"}, "config: state.backend: Input should be 'sqlite' or 'redis'"),
    ],
)
def test_bad_state_config_is_one_line_naming_the_key(state, error):
    cfg = service_config(
        two_tiers(
            [{"name": "w", "base_url": "http://x/v1", "model": "w"}],
            [{"name": "s", "base_url": "http://x/v1", "model": "s"}],
        ),
        state=state,
    )
    with pytest.raises(ConfigError, match=re.escape(error)):
        parse_config(cfg)


def test_the_password_comes_from_its_variable_and_a_wrong_one_stops_the_start(tmp_path, monkeypatch):
    with RedisServer(tmp_path / "redis", password="s3cret-pw") as server:
        config = StateConfig(backend="redis", url=server.url, password_env="ROUTER_TEST_REDIS_PASSWORD")
        monkeypatch.setenv("ROUTER_TEST_REDIS_PASSWORD", "wrong")
        with pytest.raises(ConfigError, match="state.url: cannot use Redis at .*invalid username-password pair"):
            RedisState(config, RateLimitConfig(requests_per_minute=60, burst=1), CircuitConfig(), Metrics())
        monkeypatch.setenv("ROUTER_TEST_REDIS_PASSWORD", "s3cret-pw")
        state = RedisState(config, RateLimitConfig(requests_per_minute=60, burst=1), CircuitConfig(), Metrics())

        async def two_requests():
            await state.start()
            try:
                return await state.take("client"), await state.take("client")
            finally:
                await state.stop()

        first, second = asyncio.run(two_requests())
        assert first is None and 0 < second <= 1.0 and state.up  # the bucket lives in Redis: one token, then a wait


def test_an_unset_password_variable_stops_the_start(monkeypatch):
    monkeypatch.delenv("ROUTER_TEST_REDIS_PASSWORD", raising=False)
    cfg = parse_config(
        service_config(
            two_tiers(
                [{"name": "w", "base_url": "http://x/v1", "model": "w"}],
                [{"name": "s", "base_url": "http://x/v1", "model": "s"}],
            ),
            state={"backend": "redis", "url": "rediss://cache:6380/0", "password_env": "ROUTER_TEST_REDIS_PASSWORD"},
        )
    )
    with pytest.raises(
        ConfigError, match="state.password_env: environment variable ROUTER_TEST_REDIS_PASSWORD is not set"
    ):
        cfg.state.password()
