"""POST /v1/chat/completions: route the request, forward it down the decision's chain, answer with the decision's headers."""

from __future__ import annotations

import json
import logging
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from ..errors import APIError
from ..providers import Reply, client_error_body
from ..routing import parse_request, router_options
from ..service import TierDecision
from ..stream import relay
from ..usage import answer_chars, answer_text, valid_usage
from .deps import Client, ServiceDep

log = logging.getLogger("learned_router.serving")
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
    request_id = uuid.uuid4().hex[:16]
    who = client.name if client else None
    req, body = parse_request(await request.body())
    d = await service.route(req, router_options(body, request.headers), started, observe=True)
    try:
        reply = await service.complete(d, body, req.stream)
    except APIError as e:
        log.warning(
            "chat id=%s tier=%s rule=%s task_type=%s status=%d: %s",
            request_id,
            d.tier,
            d.rule,
            d.task_type,
            e.status,
            e.message,
        )
        service.record(d, request_id, who, started, e.status, e.code or "failed")
        raise
    headers = decision_headers(d, reply) | {"x-request-id": request_id}
    if reply.response is None:  # a whole answer, or a client error from the provider passed back
        billed = None
        raw = reply.raw if reply.status == 200 else client_error_body(reply.status, reply.json, reply.provider)
        if reply.status == 200:  # a 200 body is a JSON object with a choices list (providers.py checked)
            usage = reply.json.get("usage")
            billed = service.account(reply.provider, usage, answer_chars(reply.json), d)
            headers["x-router-cost-usd"] = f"{billed.usd:.8f}"
            upstream = valid_usage(usage) is not None
            headers["x-router-usage"] = "upstream" if upstream else "estimated"
            if not upstream:  # the client sees the counts it was billed for, not the provider's words
                raw = json.dumps(reply.json | {"usage": billed.usage()}).encode()
        log.info(
            "chat id=%s tier=%s provider=%s status=%d rule=%s task_type=%s threshold=%.4f effective=%.4f fallbacks=%d "
            "cost_usd=%.8f",
            request_id,
            d.tier,
            reply.provider.name,
            reply.status,
            d.rule,
            d.task_type,
            d.threshold,
            d.effective_threshold,
            reply.fallbacks,
            billed.usd if billed else 0.0,
        )
        service.record(
            d, request_id, who, started, reply.status, "ok" if billed else "client_error", reply.provider, billed
        )
        if billed and service.shadow and (text := answer_text(reply.json)) is not None:
            service.shadow.offer(d, request_id, who, body, reply.provider, text, billed.usd)
        return Response(raw, status_code=reply.status, media_type="application/json", headers=headers)
    wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    return StreamingResponse(
        relay(service, reply, d, request_id, wants_usage, who, started, body),
        media_type="text/event-stream",
        headers=headers | {"Cache-Control": "no-cache"},
    )
