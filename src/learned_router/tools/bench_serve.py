"""Load benchmark of the service, on 127.0.0.1 only, with bounded request counts.

Starts a fake provider and the service (`learned-router serve`) as subprocesses, then measures
1. `/v1/route`: requests/s, p50 and p99 latency at each concurrency;
2. the routing overhead of `/v1/chat/completions`: the same chat requests sent to the fake provider
   directly and through the service at concurrency 1, and the difference of their p50 and p99.
With `states` (sqlite, redis), each is measured in turn on `replicas` service processes (the concurrent
connections spread over them), with a rate limit (never reached) and a budget, so every request takes its rate-limit
token and every answer is added to the spend: with redis, all of it through one redis-server.
Prompts are ~30 tokens, all different. The load comes from one keep-alive HTTP/1.1 connection per
concurrent client, written directly on asyncio streams: on a small machine the load generator shares
the cores with the service, and a full HTTP client library would take a good part of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import yaml

from ..manifest import read_manifest
from .inprocess import free_port

BENCH_KEY = "sk-bench-client-key"
TOPICS = [
    "binary search trees",
    "the French revolution",
    "photosynthesis",
    "TCP congestion control",
    "compound interest",
    "the Krebs cycle",
    "Rust lifetimes",
    "supply and demand",
    "black holes",
    "sourdough baking",
    "SQL joins",
    "the immune system",
]
TEMPLATES = [
    "Explain {t} to a new student in three short paragraphs, with one concrete example and a common mistake (case {i}).",
    "Write a short quiz of four questions about {t} for a high-school class and give the answers at the end (set {i}).",
    "What are the most important ideas behind {t}, and how would you check that someone has really understood them? #{i}",
]


CONTEXT = (
    "Context pasted from the team's design document, section {i}: the service reads events from a queue, "
    "validates each against its schema, enriches it with the account's settings from a cache, and writes it to "
    "the warehouse in batches of five hundred. Failures are retried three times with backoff, then parked in a "
    "dead-letter table that an operator reviews each morning. Latency targets are two seconds at the median and "
    "ten at the ninety-ninth percentile; the queue holds about four hours of traffic at peak. "
)


def prompts(n: int, tokens: int = 30) -> list[str]:
    """n different prompts of about `tokens` tokens (~30: a question; more: a pasted context paragraph before it)."""
    out = []
    for i in range(n):
        question = TEMPLATES[i % len(TEMPLATES)].format(t=TOPICS[(i // 3) % len(TOPICS)], i=i)
        context = ""
        while len(context) + len(question) < (tokens - 5) * 4.3:  # ~4.3 characters per token of English prose
            context += CONTEXT.format(i=i)
        out.append((context[: max(0, int((tokens - 5) * 4.3) - len(question))] + "\n\n" if context else "") + question)
    return out


@dataclass
class Result:
    name: str
    concurrency: int
    n: int
    seconds: float
    latencies: np.ndarray  # seconds
    errors: int

    @property
    def rps(self) -> float:
        return self.n / self.seconds

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1000)


class Connection:
    """A minimal keep-alive HTTP/1.1 client for JSON POSTs answered with a Content-Length body."""

    def __init__(self, url: str, headers: dict[str, str]):
        u = httpx.URL(url)
        self.host, self.port, self.path = u.host, u.port, u.raw_path.decode()
        self.head = "".join(
            f"{k}: {v}\r\n"
            for k, v in {"Host": f"{u.host}:{u.port}", "Content-Type": "application/json", **headers}.items()
        )
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, body: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(
            f"POST {self.path} HTTP/1.1\r\n{self.head}Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        fields = dict(line.split(":", 1) for line in head[1:] if ":" in line)
        length = {k.lower(): v for k, v in fields.items()}.get("content-length")
        if length is None:
            raise RuntimeError(f"{self.path}: answer without Content-Length")
        await self.reader.readexactly(int(length))
        return int(head[0].split()[1])

    async def stream(self, body: bytes) -> tuple[int, float]:
        """POST a streaming request: its status and the seconds to the first `data:` event (the answer's first bytes);
        reads the rest of the chunked body."""
        t = time.perf_counter()
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(
            f"POST {self.path} HTTP/1.1\r\n{self.head}Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        fields = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in head[1:] if ":" in line)}
        status, first = int(head[0].split()[1]), None
        if "content-length" in fields:
            await self.reader.readexactly(int(fields["content-length"]))
            return status, time.perf_counter() - t
        while True:  # chunked
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await self.reader.readexactly(size + 2)
            if first is None and b"data:" in chunk:
                first = time.perf_counter() - t
            if size == 0:
                return status, first if first is not None else time.perf_counter() - t

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


async def load(urls: str | list[str], bodies: list[dict], concurrency: int, headers: dict, name: str) -> Result:
    """Send every body once, `concurrency` at a time (connection i to urls[i % len(urls)]); latency of each (a stream's:
    to its first event), wall time of all."""
    urls = [urls] if isinstance(urls, str) else urls
    payloads = [json.dumps(b).encode() for b in bodies]
    latencies = np.zeros(len(payloads))
    errors = 0
    it = iter(enumerate(payloads))

    async def worker(conn: Connection):
        nonlocal errors
        for i, body in it:
            if bodies[i].get("stream"):
                status, latencies[i] = await conn.stream(body)
            else:
                t = time.perf_counter()
                status = await conn.post(body)
                latencies[i] = time.perf_counter() - t
            errors += status != 200

    conns = [Connection(urls[i % len(urls)], headers) for i in range(concurrency)]
    start = time.perf_counter()
    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    return Result(name, concurrency, len(payloads), time.perf_counter() - start, latencies, errors)


class RedisServer:
    """A redis-server on 127.0.0.1 (Debian's `redis-server` on PATH) in `folder`, with an append-only file: a write is in
    the file before its reply, so killing the process loses nothing acknowledged (the file is synced to disk every
    second). `kill` and `start` again keep its port and data. `password`: clients must send it."""

    def __init__(self, folder: Path, port: int | None = None, password: str | None = None):
        self.folder, self.port, self.password = Path(folder), port or free_port(), password
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> RedisServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.folder),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                *(["--requirepass", self.password] if self.password else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith((b"+PONG", b"-NOAUTH")):
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown, as in a crash."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from learned_router.cli import app; app()", *args]


def _wait_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[3:5]} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up in {timeout}s")


async def compare(
    stacks: dict[str, list[str]], path: str, bodies: list[dict], concurrency: int, headers: dict, name: str, rounds: int
) -> list[Result]:
    """Send `bodies` to each stack (label -> its replicas' base URLs) in `rounds` interleaved slices, in alternating
    order, so that the load of the rest of the machine falls on every stack alike; one Result per stack."""
    parts: dict[str, list[Result]] = {label: [] for label in stacks}
    for i in range(rounds):
        for label in list(stacks)[:: 1 if i % 2 == 0 else -1]:
            urls = [u + path for u in stacks[label]]
            parts[label].append(await load(urls, bodies[i::rounds], concurrency, headers, f"{label}{name}"))
    return [
        Result(
            r[0].name,
            concurrency,
            sum(x.n for x in r),
            sum(x.seconds for x in r),
            np.concatenate([x.latencies for x in r]),
            sum(x.errors for x in r),
        )
        for r in parts.values()
    ]


async def measure(
    stacks: dict[str, list[str]], fake: str, route_n: int, chat_n: int, levels: tuple[int, ...]
) -> list[Result]:
    """Each stack's /v1/route at each concurrency, the fake provider direct, each stack's chat at concurrency 1 (and 16
    when stacks are compared or replicated)."""
    auth = {"Authorization": f"Bearer {BENCH_KEY}"}
    rounds = 1 if len(stacks) == 1 else 10
    results = []
    warm = [{"model": "router", "messages": [{"role": "user", "content": p}]} for p in prompts(200)]
    await compare(stacks, "/v1/route", warm, 16, auth, "warmup", 1)
    for c in levels:
        n = route_n if c > 1 else max(200, route_n // 4)
        bodies = [{"model": "router", "messages": [{"role": "user", "content": p}]} for p in prompts(n)]
        results += await compare(stacks, "/v1/route", bodies, c, auth, "/v1/route", rounds)
    chat = [
        {"model": "router", "max_tokens": 64, "messages": [{"role": "user", "content": p}]} for p in prompts(chat_n)
    ]
    await load(f"{fake}/v1/chat/completions", chat[:50], 1, {}, "warmup")
    await compare(stacks, "/v1/chat/completions", chat[:50], 1, auth, "warmup", 1)
    results.append(await load(f"{fake}/v1/chat/completions", chat, 1, {}, "fake provider direct"))
    results += await compare(stacks, "/v1/chat/completions", chat, 1, auth, "chat via router", rounds)
    if len(stacks) > 1 or any(len(urls) > 1 for urls in stacks.values()):
        results += await compare(stacks, "/v1/chat/completions", chat, 16, auth, "chat via router", rounds)
    return results


def table(results: list[Result]) -> str:
    lines = [f"{'endpoint':<28} {'conc':>4} {'requests':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"]
    for r in results:
        lines.append(
            f"{r.name:<28} {r.concurrency:>4} {r.n:>8} {r.rps:>8.1f} {r.pct(50):>8.2f} {r.pct(99):>8.2f} {r.errors:>6}"
        )
    direct = next((r for r in results if r.name == "fake provider direct"), None)
    for routed in results:
        if direct and routed.name.endswith("chat via router") and routed.concurrency == 1:
            label = routed.name.removesuffix("chat via router")
            lines.append(
                f"{label}routing overhead at concurrency 1: p50 +{routed.pct(50) - direct.pct(50):.2f} ms, "
                f"p99 +{routed.pct(99) - direct.pct(99):.2f} ms"
            )
    return "\n".join(lines)


def run(
    router: str = "models/default",
    route_requests: int = 2000,
    chat_requests: int = 500,
    levels: tuple[int, ...] = (1, 16, 64),
    max_wait_ms: float = 0.0,
    threads: int = 1,
    workers: int | str = "auto",
    replicas: int = 1,
    states: tuple[str, ...] = (),
) -> str:
    """Start a fake provider and the service (with `states`: `replicas` processes per state backend, all at once),
    measure, stop them; returns the table."""
    with tempfile.TemporaryDirectory(prefix="router-bench-") as tmp, contextlib.ExitStack() as running:
        tmp = Path(tmp)
        fake_url = running.enter_context(fake_provider(tmp))
        config = service_config(router, f"{fake_url}/v1", threads, workers, max_wait_ms)
        stacks = {}
        for state in states or ("",):
            cfg = config
            if state:
                cfg = {
                    **config,
                    "rate_limit": {"requests_per_minute": 1e9, "burst": 10_000},
                    "budget": {"period": "day", "usd": 1e6, "store": str(tmp / "spend.sqlite")},
                    "state": {"backend": "sqlite"},
                }
            if state == "redis":
                server = running.enter_context(RedisServer(tmp / "redis-data"))
                cfg["state"] = {"backend": "redis", "url": server.url, "prefix": "bench:"}
            urls = running.enter_context(
                service(tmp / (state or "service"), cfg, [free_port() for _ in range(replicas)])
            )
            stacks[f"{state} x{replicas} " if state else ""] = urls
        return table(asyncio.run(measure(stacks, fake_url, route_requests, chat_requests, levels)))


ENV = {"ROUTER_BENCH_KEYS": BENCH_KEY, "HF_HUB_OFFLINE": "1"}


def service_config(router: str, upstream: str, threads: int, workers: int | str, max_wait_ms: float) -> dict:
    """The service under test: two tiers on the one upstream, no rate limit, the bench key."""
    provider = {"base_url": upstream, "context_window": 32768, "timeout_s": 30}
    return {
        "router": {
            "path": str(Path(router).resolve()),
            "threads": threads,
            "workers": workers,
            "max_wait_ms": max_wait_ms,
        },
        "tiers": [
            {
                "name": "weak",
                "score": read_manifest(router).weak,
                "providers": [
                    {
                        **provider,
                        "name": "weak",
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
                        "model": "gpt-4-1106-preview",
                        "input_price_per_1m": 10,
                        "output_price_per_1m": 30,
                    }
                ],
            },
        ],
        "auth": {"keys_env": "ROUTER_BENCH_KEYS"},
        "rate_limit": {"requests_per_minute": 0},
    }


@contextlib.contextmanager
def fake_provider(tmp: Path):
    """A fake provider subprocess on a free port: its base URL (without /v1)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with _processes(
        [_cli("fake-provider", "--port", str(port), "--name", "bench")],
        [f"{url}/v1/models"],
        tmp / "fake",
        {**os.environ, **ENV},
    ):
        yield url


@contextlib.contextmanager
def service(tmp: Path, config: dict, ports: list[int]):
    """`learned-router serve` on each port with `config`: their base URLs."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    with _processes(
        [_cli("serve", "--config", str(tmp / "config.yaml"), "--port", str(p)) for p in ports],
        [f"{u}/healthz" for u in urls],
        tmp / "service",
        {**os.environ, **ENV},
    ):
        yield urls


@dataclass
class Cell:
    tokens: int
    concurrency: int
    stream: bool


def routing_seconds(base: str) -> float:
    """The service's time spent scoring and routing so far (router_routing_seconds' sum), read from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=10).text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "router_routing_seconds_sum"
    )


def verdicts(res: dict[str, Result], added: dict[str, tuple[float, float]], name: str, routing_ms: float | None) -> str:
    """The service against another proxy on the issue's targets: added p50 and p99 at most the other's, requests/s at
    least its; where one is missed, how much of the service's added p50 was its own scoring and routing."""
    checks = [
        ("added p50", added["router"][0] <= added[name][0]),
        ("added p99", added["router"][1] <= added[name][1]),
        ("req/s", res["router"].rps >= res[name].rps),
    ]
    line = f"  targets vs {name}: " + ", ".join(f"{k} {'met' if ok else 'MISSED'}" for k, ok in checks)
    if routing_ms is not None and not all(ok for _, ok in checks):
        share = routing_ms / added["router"][0] if added["router"][0] > 0 else float("nan")
        line += (
            f"; the service spent {routing_ms:.2f} ms per request scoring and routing (router_routing_seconds, "
            f"batch wait included), {share:.0%} of its added p50: the work the other proxy does not do"
        )
    return line


def compare_table(
    cells: dict[tuple, dict[str, Result]], others: list[str], routing: dict[tuple, float] | None = None
) -> str:
    """Per cell: the direct call's p50/p99, what each proxy adds to them, its requests/s, the router's ratios to
    each other proxy (added latency: below 1 is better; requests/s: above 1 is better) and the targets met or missed
    (`verdicts`; `routing`: the service's mean scoring and routing time per request in each cell, ms)."""
    lines = []
    for key, res in cells.items():
        tokens, conc, stream = key
        direct = res["direct"]
        kind = "time to first event" if stream else "whole answer"
        lines.append(
            f"~{tokens} tokens, concurrency {conc}, {'stream' if stream else 'no stream'} ({kind}): direct p50 "
            f"{direct.pct(50):.2f} ms, p99 {direct.pct(99):.2f} ms, {direct.rps:.0f} req/s"
        )
        added = {}
        for name in ["router", *others]:
            r = res[name]
            added[name] = (r.pct(50) - direct.pct(50), r.pct(99) - direct.pct(99))
            lines.append(
                f"  {name:<12} adds p50 {added[name][0]:+8.2f} ms  p99 {added[name][1]:+8.2f} ms  {r.rps:8.1f} req/s"
                f"  errors {r.errors}"
            )
        for name in others:
            ratio = lambda a, b: f"{a / b:.2f}x" if b > 0 else "n/a (other adds nothing)"  # noqa: E731
            lines.append(
                f"  router / {name}: added p50 {ratio(added['router'][0], added[name][0])}, added p99 "
                f"{ratio(added['router'][1], added[name][1])}, req/s {res['router'].rps / res[name].rps:.2f}x"
            )
            lines.append(verdicts(res, added, name, (routing or {}).get(key)))
    return "\n".join(lines)


async def measure_cells(
    targets: dict[str, str], keys: dict[str, str], cells: list[Cell], n: int, rounds: int
) -> tuple[dict, dict]:
    """Each cell's chat requests to every target (name -> base URL with /v1), in interleaved rounds; and the service's
    (target "router") mean scoring and routing time per request in each cell, ms, from its /metrics."""
    out, routing = {}, {}
    service_base = targets["router"].removesuffix("/v1")
    for cell in cells:
        count = n if cell.concurrency == 1 else n * 2
        bodies = [
            {"model": "router", "max_tokens": 64, "stream": cell.stream, "messages": [{"role": "user", "content": p}]}
            for p in prompts(count, cell.tokens)
        ]
        parts: dict[str, list[Result]] = {name: [] for name in targets}
        spent = 0.0
        for name, url in targets.items():  # warm every connection pool and cache once
            await load(f"{url}/chat/completions", bodies[:20], cell.concurrency, keys.get(name, {}), "warmup")
        for i in range(rounds):
            for name in list(targets)[:: 1 if i % 2 == 0 else -1]:
                before = routing_seconds(service_base) if name == "router" else 0.0
                parts[name].append(
                    await load(
                        f"{targets[name]}/chat/completions",
                        bodies[i::rounds],
                        cell.concurrency,
                        keys.get(name, {}),
                        name,
                    )
                )
                if name == "router":
                    spent += routing_seconds(service_base) - before
        key = (cell.tokens, cell.concurrency, cell.stream)
        routing[key] = 1000 * spent / max(1, sum(x.n for x in parts["router"]))
        out[key] = {
            name: Result(
                name,
                cell.concurrency,
                sum(x.n for x in r),
                sum(x.seconds for x in r),
                np.concatenate([x.latencies for x in r]),
                sum(x.errors for x in r),
            )
            for name, r in parts.items()
        }
    return out, routing


def run_compare(
    router: str,
    others: dict[str, str],
    other_keys: dict[str, str | None],
    upstream: str | None = None,
    sizes: tuple[int, ...] = (30, 250, 1000),
    levels: tuple[int, ...] = (1, 16),
    streams: tuple[bool, ...] = (False, True),
    n: int = 300,
    rounds: int = 6,
    threads: int = 1,
    workers: int | str = "auto",
) -> str:
    """The same chat load sent to the upstream directly, through this service and through each other OpenAI-compatible
    proxy (`others`: name -> base URL ending in /v1, forwarding model "router" to the same upstream), interleaved."""
    with tempfile.TemporaryDirectory(prefix="router-bench-") as tmp, contextlib.ExitStack() as running:
        tmp = Path(tmp)
        base = upstream.rstrip("/").removesuffix("/v1") if upstream else running.enter_context(fake_provider(tmp))
        urls = running.enter_context(
            service(tmp / "service", service_config(router, f"{base}/v1", threads, workers, 0.0), [free_port()])
        )
        targets = {"direct": f"{base}/v1", "router": f"{urls[0]}/v1", **others}
        keys = {"router": {"Authorization": f"Bearer {BENCH_KEY}"}} | {
            name: {"Authorization": f"Bearer {key}"} for name, key in other_keys.items() if key
        }
        cells = [Cell(t, c, s) for t in sizes for c in levels for s in streams]
        header = (
            f"the same chat requests (max_tokens 64; ~{'/'.join(map(str, sizes))}-token prompts, all different) to "
            f"{', '.join(targets)}; {rounds} interleaved rounds per cell"
        )
        results, routing = asyncio.run(measure_cells(targets, keys, cells, n, rounds))
        return header + "\n" + compare_table(results, list(others), routing)


@contextlib.contextmanager
def _processes(commands: list[list[str]], health: list[str], log_prefix: Path, env: dict):
    """Start each command (its output in `log_prefix`N.log), wait until its health URL answers; stop them all at the end."""
    logs = [open(f"{log_prefix}{i}.log", "w") for i in range(len(commands))]
    procs = [
        subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        for cmd, log in zip(commands, logs, strict=True)
    ]
    try:
        for i, (url, proc) in enumerate(zip(health, procs, strict=True)):
            _wait_up(url, proc, Path(f"{log_prefix}{i}.log"))
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in logs:
            log.close()
