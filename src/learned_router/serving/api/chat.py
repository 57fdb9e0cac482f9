"""POST /v1/chat/completions: route the request, forward it down the decision's chain, answer with the decision's headers."""

from __future__ import annotations

import json
import time

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from ..errors import APIError
from ..providers import Reply, client_error_body
from ..routing import parse_request, router_options
from ..decision import TierDecision
from ..stream import relay
from ..exchange import Exchange
from ..usage import answer_chars, answer_text, valid_usage
from .deps import Client, ServiceDep

router = APIRouter(tags=["chat"])


def decision_headers(d: TierDecision, reply: Reply | None = None) -> dict[str, str]:
    h = {
        "x-router-tier": d.tier,
        "x-router-rule": d.rule,
        "x-router-task-type": d.task_type,
        "x-router-pass-chances": ", ".join(f"{t}={p:.4f}" for t, p in d.pass_chances.items()),
        "x-router-threshold": f"{d.threshold:.4f}",
        "x-router-effective-threshold": f"{d.effective_threshold:.4f}",
        "x-router-estimated-cost-usd": f"{d.estimated_cost:.8f}",
        "x-router-version": d.router,
    }
    if d.skipped:
        h["x-router-skipped"] = ", ".join(f"{s.tier}={s.rule}" for s in d.skipped)
    if reply is not None:
        h["x-router-model"] = reply.provider.config.model
        h["x-router-provider"] = reply.provider.name
        h["x-router-fallbacks"] = str(reply.fallbacks)
    return h


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, service: ServiceDep, client: Client) -> Response:
    """Route, then forward down the decision's chain of providers; streams pass through as SSE."""
    started = time.monotonic()
    req, body = parse_request(await request.body())
    d = await service.route(req, router_options(body, request.headers), started, observe=True)
    exchange = Exchange(service, d, client.name if client else None, started, body)
    try:
        reply = await service.complete(d, body, req.stream)
    except APIError as e:
        exchange.failed(e)
        raise
    headers = decision_headers(d, reply) | {"x-request-id": exchange.id}
    if reply.response is not None:
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(
            relay(exchange, reply, wants_usage),
            media_type="text/event-stream",
            headers=headers | {"Cache-Control": "no-cache"},
        )
    if reply.status != 200:  # a client error from the provider, passed back
        exchange.finish(reply, "client_error")
        raw = client_error_body(reply.status, reply.json, reply.provider)
        return Response(raw, status_code=reply.status, media_type="application/json", headers=headers)
    usage, raw = reply.json.get("usage"), reply.raw  # a 200 body is a JSON object with a choices list (providers.py)
    billed = exchange.finish(reply, "ok", usage, answer_chars(reply.json), answer_text(reply.json))
    headers["x-router-cost-usd"] = f"{billed.usd:.8f}"
    upstream = valid_usage(usage) is not None
    headers["x-router-usage"] = "upstream" if upstream else "estimated"
    if not upstream:  # the client sees the counts it was billed for
        raw = json.dumps(reply.json | {"usage": billed.usage()}).encode()
    return Response(raw, status_code=200, media_type="application/json", headers=headers)
