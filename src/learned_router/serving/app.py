"""The OpenAI-compatible routing service: score each request, pick a tier, forward it, account for it.

Clients change only `base_url`. `model="router"` uses the configured threshold; `model="router-0.35"`
sets it for one request. Every answer carries x-router-* headers with the decision and its cost.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..scorer import Router
from .auth import RateLimiter, rate_limited
from .batcher import ScoreBatcher
from .config import ServiceConfig, load_config
from .errors import APIError, ConfigError, error_body
from .metrics import Metrics
from .providers import AllProvidersFailed, Provider, Reply, Upstream
from .routing import ROUTER_MODEL, ChatRequest, RouteDecision, decide, estimate_tokens, parse_request, requested_threshold, scored_text

log = logging.getLogger("learned_router.serving")
CONFIG_ENV = "LEARNED_ROUTER_CONFIG"
ENDPOINTS = {"/v1/chat/completions", "/v1/route", "/v1/models", "/healthz", "/readyz", "/metrics"}
AUTHORIZED = [Depends(rate_limited)]  # a valid client key within its rate limit


class Service:
    """Everything one service process holds: router, batcher, upstream chains, keys, limits, metrics.

    `router` may be injected: any object with `score(list[str]) -> array`, `manifest` and `default_threshold`.
    """

    def __init__(self, config: ServiceConfig, router=None):
        self.config = config
        self.client_keys = config.client_keys() if config.auth.enabled else {}
        provider_keys = config.provider_keys()  # before the slow part: a missing key variable fails at once
        self.router = router if router is not None else Router.load(config.router.path, threads=config.router.threads)
        self.threshold = resolve_threshold(config, self.router)
        self.metrics = Metrics()
        self.upstream = Upstream.build(
            config.providers, provider_keys, config.retry, config.circuit_breaker, self.metrics,
            config.routing.fallback_to_other_tier,
        )
        self.batcher = ScoreBatcher(self.router.score, config.router.max_batch, config.router.max_wait_ms / 1000,
                                    config.router.workers, on_batch=self.metrics.batch_size.observe)
        self.rate_limiter = RateLimiter(config.rate_limit.requests_per_minute, config.rate_limit.burst)
        self.weak_context = max(p.context_window for p in config.providers.weak)

    async def start(self) -> None:
        await self.batcher.start()
        await self.upstream.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        await self.upstream.stop()

    async def route(self, req: ChatRequest) -> RouteDecision:
        start = time.perf_counter()
        threshold = requested_threshold(req.model, self.threshold)
        text = scored_text(req.messages, self.config.routing.score_turn)
        try:
            p_weak = await self.batcher.score(text)
        except Exception:
            log.exception("scoring failed")
            raise APIError(500, "the router could not score this request", type="server_error", code="router_error") from None
        tokens = estimate_tokens(req.messages, self.config.routing.chars_per_token)
        decision = decide(p_weak, threshold, tokens, req.output_tokens(), self.weak_context)
        self.metrics.routing_seconds.observe(time.perf_counter() - start)
        self.metrics.score.observe(p_weak)
        self.metrics.decisions.labels(decision.tier, decision.reason_code).inc()
        return decision

    def expected_provider(self, d: RouteDecision) -> Provider:
        """The provider of the decided tier that will most likely answer: the first that fits and is not open."""
        chain = self.upstream.chains[d.tier]
        need = d.prompt_tokens + (d.output_tokens or 0)
        return next((p for p in chain if p.config.context_window >= need and p.breaker.state != "open"), chain[0])

    def estimated_cost(self, d: RouteDecision) -> float:
        out = d.output_tokens if d.output_tokens is not None else self.config.routing.assumed_output_tokens
        return self.expected_provider(d).config.cost_usd(d.prompt_tokens, out)

    def account(self, provider: Provider, prompt_tokens: float, completion_tokens: float) -> float:
        cfg = provider.config
        cost = cfg.cost_usd(prompt_tokens, completion_tokens)
        self.metrics.tokens.labels(provider.name, cfg.model, "input").inc(prompt_tokens)
        self.metrics.tokens.labels(provider.name, cfg.model, "output").inc(completion_tokens)
        self.metrics.cost.labels(provider.name, cfg.model).inc(cost)
        self.metrics.served.labels(provider.tier, provider.name, cfg.model).inc()
        return cost


def resolve_threshold(config: ServiceConfig, router) -> float:
    """routing.threshold as given; routing.strong_fraction through the router's calibration table; else its default."""
    r = config.routing
    if r.threshold is not None:
        return r.threshold
    if r.strong_fraction is not None:
        try:
            return float(router.manifest.threshold_for(r.strong_fraction))
        except (ValueError, IndexError) as e:
            raise ConfigError(f"routing.strong_fraction: cannot be resolved with the router's calibration table ({e})") from None
    return float(router.default_threshold)


def usage_tokens(usage: object) -> tuple[float, float] | None:
    if isinstance(usage, dict):
        p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(p, (int, float)) and isinstance(c, (int, float)):
            return float(p), float(c)
    return None


def decision_headers(service: Service, d: RouteDecision, reply: Reply | None = None) -> dict[str, str]:
    h = {
        "x-router-tier": d.tier,
        "x-router-score": f"{d.p_weak:.4f}",
        "x-router-threshold": f"{d.threshold:.4f}",
        "x-router-reason": d.reason_code,
        "x-router-estimated-cost-usd": f"{service.estimated_cost(d):.8f}",
    }
    if reply is not None:
        h["x-router-model"] = reply.provider.config.model
        h["x-router-provider"] = reply.provider.name
        h["x-router-fallbacks"] = str(reply.fallbacks)
    return h


class BodyLimit:
    """413 for bodies over `max_bytes` (declared or streamed); the body is read once and replayed to the app."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._too_large(scope, receive, send, declared.isdigit())
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send, True)
            if not message.get("more_body", False):
                break
        first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay():
            nonlocal first
            if first is not None:
                message, first = first, None
                return message
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send, numeric: bool):
        if numeric:
            err = APIError(413, f"request body exceeds {self.max_bytes} bytes", code="request_too_large")
        else:
            err = APIError(400, "invalid Content-Length header")
        await JSONResponse(err.body(), status_code=err.status, headers={"Connection": "close"})(scope, receive, send)


class RequestMetrics:
    """Counts requests by endpoint and status, and times them to the first byte of the response."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        start = time.perf_counter()
        status = 500

        async def timed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                self.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()


def create_app(service: Service) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        log.info("router %s ready: threshold %.4f, strong %s, weak %s", getattr(service.router.manifest, "name", "?"),
                 service.threshold, [p.name for p in service.upstream.chains["strong"]],
                 [p.name for p in service.upstream.chains["weak"]])
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="learned-router", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible LLM router: each request goes to the weak or the strong model.")
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=service.config.limits.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=service.metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(message, "invalid_request_error"), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        err = exc.errors()[0]
        param = ".".join(str(x) for x in err["loc"])
        return JSONResponse(error_body(f"{param}: {err['msg']}", "invalid_request_error", param), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.error("internal error on %s: %s", request.url.path, type(exc).__name__)
        return JSONResponse(error_body("internal error", "server_error"), status_code=500)

    @app.post("/v1/route", dependencies=AUTHORIZED)
    async def route(request: Request) -> dict:
        """The routing decision alone: the tier, its score and threshold, why, and the estimated cost."""
        req, _ = parse_request(await request.body())
        d = await service.route(req)
        first = service.expected_provider(d).config
        return {
            "model": d.tier, "upstream_model": first.model, "provider": first.name,
            "score": d.p_weak, "threshold": d.threshold, "reason": d.reason, "reason_code": d.reason_code,
            "estimated_prompt_tokens": d.prompt_tokens, "estimated_cost_usd": service.estimated_cost(d),
        }

    @app.post("/v1/chat/completions", dependencies=AUTHORIZED)
    async def chat_completions(request: Request):
        """Route, then forward to the chosen tier's providers (with fallbacks); streams pass through as SSE."""
        request_id = uuid.uuid4().hex[:16]
        req, body = parse_request(await request.body())
        d = await service.route(req)
        need = d.prompt_tokens + (d.output_tokens or 0)
        try:
            reply = await service.upstream.complete(d.tier, body, req.stream, need)
        except AllProvidersFailed as e:
            status, code = (502, "upstream_failed") if e.tried else (503, "no_provider_available")
            log.warning("chat id=%s tier=%s status=%d: %s", request_id, d.tier, status, e)
            raise APIError(status, f"every provider failed: {e}", type="upstream_error", code=code) from None
        headers = decision_headers(service, d, reply) | {"x-request-id": request_id}
        if reply.response is None:  # a whole answer, or a client error from the provider passed back
            tokens = usage_tokens(reply.json.get("usage") if isinstance(reply.json, dict) else None)
            cost = service.account(reply.provider, *tokens) if tokens and reply.status == 200 else 0.0
            if reply.status == 200:
                headers["x-router-cost-usd"] = f"{cost:.8f}"
            log.info("chat id=%s tier=%s provider=%s status=%d score=%.4f threshold=%.4f reason=%s fallbacks=%d cost_usd=%.8f",
                     request_id, d.tier, reply.provider.name, reply.status, d.p_weak, d.threshold, d.reason_code,
                     reply.fallbacks, cost)
            return Response(reply.raw, status_code=reply.status, media_type="application/json", headers=headers)
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(relay(service, reply, d, request_id, wants_usage), media_type="text/event-stream",
                                 headers=headers | {"Cache-Control": "no-cache"})

    @app.get("/v1/models", dependencies=AUTHORIZED)
    async def models() -> dict:
        return {"object": "list", "data": [{"id": ROUTER_MODEL, "object": "model", "created": 0, "owned_by": "learned-router"}]}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        """Ready when the router scores and each tier has a provider that answers and whose circuit is not open."""
        ready = await service.upstream.ready(service.config.readiness)
        tiers = {t: any(ready[p.name] for p in chain) for t, chain in service.upstream.chains.items()}
        ok = service.batcher.running and all(tiers.values())
        body = {"status": "ready" if ok else "not ready", "router": service.batcher.running, "tiers": tiers, "providers": ready}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    return app


async def relay(service: Service, reply: Reply, d: RouteDecision, request_id: str, wants_usage: bool) -> AsyncIterator[str]:
    """Pass the upstream's SSE lines through; note usage; drop the usage chunk we asked for on the client's behalf.

    When the client goes away, Starlette cancels this generator and the upstream response is closed with it.
    """
    provider, usage, chars, skip_blank, outcome = reply.provider, None, 0, False, "aborted"
    strip_usage = provider.config.stream_usage and not wants_usage

    async def lines():
        for line in reply.head:
            yield line
        async for line in reply.lines:
            yield line

    try:
        async for line in lines():
            if line.startswith("data:") and (data := line[5:].strip()) != "[DONE]":
                try:
                    chunk = json.loads(data)
                except ValueError:
                    chunk = None
                if isinstance(chunk, dict):
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                        if strip_usage and not chunk.get("choices"):
                            skip_blank = True
                            continue
                    for choice in chunk.get("choices") or []:
                        chars += len(((choice or {}).get("delta") or {}).get("content") or "")
            elif skip_blank and not line:
                skip_blank = False
                continue
            yield line + "\n"
        outcome = "ok"
    except httpx.HTTPError as e:
        outcome = "interrupted"
        provider.breaker.failure()
        service.metrics.upstream_errors.labels(provider.name, "stream_interrupted").inc()
        err = error_body(f"upstream {provider.name} failed mid-stream ({type(e).__name__})", "upstream_error", code="stream_interrupted")
        yield f"data: {json.dumps(err)}\n\n"
    finally:
        with anyio.CancelScope(shield=True):  # close the upstream even when the client's disconnect cancelled us
            await reply.response.aclose()
        tokens = usage_tokens(usage) or (d.prompt_tokens, chars / service.config.routing.chars_per_token)
        cost = service.account(provider, *tokens)
        log.info("chat id=%s tier=%s provider=%s stream=%s score=%.4f threshold=%.4f reason=%s fallbacks=%d cost_usd=%.8f",
                 request_id, d.tier, provider.name, outcome, d.p_weak, d.threshold, d.reason_code, reply.fallbacks, cost)


def create_app_from_env() -> FastAPI:
    """App factory for `uvicorn --factory` and several workers: reads the config path from $LEARNED_ROUTER_CONFIG."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise ConfigError(f"{CONFIG_ENV} is not set: it must name the service config file")
    return create_app(Service(load_config(path)))
