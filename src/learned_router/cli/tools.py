"""Tools to try and measure the service: fake-provider, soak, bench-serve."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Annotated, Optional

import typer


from .common import fail, names_of, pair_option, serve_imports, user_errors
from .main import app


@app.command("fake-provider")
@user_errors
def fake_provider(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 9001,
    name: Annotated[str, typer.Option(help="Shown in its answers and stats.")] = "fake",
    model: Annotated[str, typer.Option(help="Model id it reports.")] = "fake-model",
    latency_ms: Annotated[float, typer.Option(min=0, help="Delay before each answer.")] = 0.0,
    chunk_delay_ms: Annotated[float, typer.Option(min=0, help="Delay between stream chunks.")] = 0.0,
    fail_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Share of requests answered with --error-status.")
    ] = 0.0,
    error_status: Annotated[int, typer.Option(help="HTTP status of simulated failures.")] = 503,
    mode: Annotated[
        str,
        typer.Option(
            help="ok, error, 429, hang, stall, raw (200 with a body set by POST /_control) or huge (a body with no end); "
            "switch at run time with POST /_control."
        ),
    ] = "ok",
    api_key_env: Annotated[
        Optional[str], typer.Option(help="Require the key in this environment variable as bearer token.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of --fail-rate.")] = 0,
    fail_words: Annotated[
        str,
        typer.Option(
            help="Comma-separated words: a prompt holding one is answered 'I cannot answer "
            "that.' (a wrong answer for 'label' to grade low)."
        ),
    ] = "",
    judge: Annotated[
        bool,
        typer.Option(
            "--judge", help="Act as the judge of 'label': grade the answers in its prompt by the rubric's format."
        ),
    ] = False,
    judge_garbage_rate: Annotated[
        float, typer.Option(min=0, max=1, help="With --judge: share of answers with no verdict.")
    ] = 0.0,
):
    """Run a fake OpenAI-compatible provider on 127.0.0.1, with deterministic canned answers (tests, demo)."""
    uvicorn = serve_imports()
    from ..tools.fake_provider import MODES, FakeState, create_fake_provider

    if mode not in MODES:
        fail(f"--mode: expected one of {sorted(MODES)}, got {mode!r}")
    key = None
    if api_key_env:
        key = os.environ.get(api_key_env)
        if key is None:
            fail(f"--api-key-env: environment variable {api_key_env} is not set")
    state = FakeState(
        name=name,
        model=model,
        mode=mode,
        latency_ms=latency_ms,
        chunk_delay_ms=chunk_delay_ms,
        fail_rate=fail_rate,
        error_status=error_status,
        api_key=key,
        seed=seed,
        fail_words=names_of(fail_words),
        judge=judge,
        judge_garbage_rate=judge_garbage_rate,
    )
    uvicorn.run(create_fake_provider(state), host="127.0.0.1", port=port, log_level="warning", access_log=False)


@app.command()
@user_errors
def soak(
    router: Annotated[Path, typer.Option(help="Router folder.")] = Path("models/default"),
    requests: Annotated[
        int, typer.Option(min=100, max=50000, help="Requests in all, split evenly over the fault phases.")
    ] = 3000,
    concurrency: Annotated[int, typer.Option(min=1, max=256, help="Concurrent clients.")] = 16,
):
    """A bounded soak on 127.0.0.1: the service, fake providers broken phase by phase, hostile clients; per phase
    sent / answered / refused / stream errors / 5xx / 500 / lost. Exit code 1 unless 0 lost and 0 500s, and no 5xx
    where the strong provider fails while the weak one's circuit is half-open."""
    from collections import Counter

    serve_imports()
    from ..manifest import read_manifest
    from ..tools.soak import COLUMNS, PHASES, STRICT, run

    read_manifest(router)  # a clear error before anything starts
    package = logging.getLogger("learned_router")
    level = package.level
    package.setLevel(logging.ERROR)  # the faults are deliberate: keep their warnings out
    try:
        results = run(str(router), requests, concurrency)
    finally:
        package.setLevel(level)
    total = sum((c for _, c in results), Counter())
    typer.echo(f"{'total':30s} " + "  ".join(f"{k} {round(total[k], 1)}" for k in COLUMNS))
    strict = dict(results)[STRICT]
    if total["lost"] or total["500"] or strict["5xx"] or total["sent"] != len(PHASES) * (requests // len(PHASES)):
        raise typer.Exit(1)


@app.command("bench-serve")
@user_errors
def bench_serve(
    router: Annotated[Path, typer.Option(help="Router folder.")] = Path("models/default"),
    requests: Annotated[
        int, typer.Option(min=100, max=20000, help="/v1/route requests per concurrency level (a quarter at 1).")
    ] = 2000,
    chat_requests: Annotated[
        int, typer.Option(min=50, max=5000, help="Chat requests for the overhead measurement.")
    ] = 500,
    max_wait_ms: Annotated[
        float, typer.Option(min=0, help="Batcher wait for more prompts (router.max_wait_ms).")
    ] = 0.0,
    threads: Annotated[int, typer.Option(min=1, help="onnxruntime threads (router.threads).")] = 1,
    router_workers: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            help="Threads scoring batches at once (router.workers; default: the service's, one per usable core), in "
            "one process; serve's --workers are processes.",
        ),
    ] = None,
    replicas: Annotated[
        int, typer.Option(min=1, max=8, help="Service processes the load is spread over (with --state).")
    ] = 1,
    state: Annotated[
        Optional[list[str]],
        typer.Option(
            help="sqlite or redis (repeat it to compare): measure each state backend "
            "in turn, with a rate limit and a budget; redis starts a redis-server."
        ),
    ] = None,
    compare: Annotated[
        Optional[list[str]],
        typer.Option(
            help="NAME=URL of another OpenAI-compatible proxy (base URL ending "
            "in /v1) that forwards model 'router' to the same upstream (--upstream): "
            "the same chat load goes to it, to this service and to the upstream "
            "directly, interleaved; repeatable."
        ),
    ] = None,
    compare_key_env: Annotated[
        Optional[list[str]],
        typer.Option(help="NAME=ENV: the environment variable holding the key of a --compare proxy."),
    ] = None,
    upstream: Annotated[
        Optional[str],
        typer.Option(
            help="With --compare: the upstream base URL every proxy forwards to "
            "(default: a fake provider started here)."
        ),
    ] = None,
    prompt_tokens: Annotated[
        str, typer.Option(help="With --compare: prompt sizes in tokens, comma-separated.")
    ] = "30,250,1000",
):
    """Benchmark the service on 127.0.0.1: /v1/route throughput and latency at concurrency 1, 16, 64; routing overhead;
    with --compare, the added latency and requests/s of this service next to another proxy's."""
    import shutil

    serve_imports()
    from ..manifest import read_manifest
    from ..tools.bench_serve import run

    read_manifest(router)  # a clear error before anything starts
    for s in state or []:
        if s not in ("sqlite", "redis"):
            fail(f"--state: expected sqlite or redis, got {s!r}")
        if s == "redis" and shutil.which("redis-server") is None:
            fail("--state redis: redis-server is not on PATH (apt-get install redis-server)")
    if replicas > 1 and not state:
        fail("--replicas: needs --state (replicas without shared state are measured as one service each)")
    if compare or upstream:
        from ..tools.bench_serve import run_compare

        others = dict(pair_option(c, "--compare", "NAME=URL") for c in compare or [])
        key_envs = dict(pair_option(k, "--compare-key-env", "NAME=ENV") for k in compare_key_env or [])
        unknown = [k for k in key_envs if k not in others]
        if unknown or {"direct", "router"} & set(others):
            fail(
                f"--compare-key-env: {unknown[0]!r} is not a --compare name"
                if unknown
                else "--compare: 'direct' and 'router' are taken"
            )
        missing = [env for env in key_envs.values() if env not in os.environ]
        if missing:
            fail(f"--compare-key-env: environment variable {missing[0]} is not set")
        for name, url in [*others.items(), *([("--upstream", upstream)] if upstream else [])]:
            if not re.match(r"^https?://[^/\s]+", url):
                fail(f"{name}: expected an http(s) base URL such as http://127.0.0.1:4000/v1, got {url!r}")
        try:
            sizes = tuple(int(t) for t in names_of(prompt_tokens))
        except ValueError:
            sizes = ()
        if not sizes or min(sizes) < 10 or max(sizes) > 4000:
            fail(f"--prompt-tokens: expected comma-separated sizes between 10 and 4000, got {prompt_tokens!r}")
        typer.echo(
            run_compare(
                str(router),
                {k: v.rstrip("/") for k, v in others.items()},
                {k: os.environ[v] for k, v in key_envs.items()},
                upstream,
                sizes=sizes,
                n=max(50, chat_requests // 4),
                threads=threads,
                workers=router_workers or "auto",
            )
        )
        return
    typer.echo(
        run(
            str(router),
            requests,
            chat_requests,
            max_wait_ms=max_wait_ms,
            threads=threads,
            workers=router_workers or "auto",
            replicas=replicas,
            states=tuple(state or ()),
        )
    )
