"""The ASGI middlewares of the service: body limits, complete 500s, request metrics; and the access-log redaction."""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi.responses import JSONResponse

from .errors import APIError, error_body
from .metrics import Metrics

log = logging.getLogger("learned_router.serving")


class BodyLimit:
    """413 for bodies over `max_bytes` (declared or streamed), 408 for a body not complete `read_seconds` after its
    request came in (a client that sends headers and then trickles or stops); the body is read once and replayed to
    the app."""

    def __init__(self, app, max_bytes: int, read_seconds: float):
        self.app, self.max_bytes, self.read_seconds = app, max_bytes, read_seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._too_large(scope, receive, send, declared.isdigit())
        chunks, size = [], 0
        deadline = time.monotonic() + self.read_seconds
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                err = APIError(
                    408,
                    f"request body not complete within {self.read_seconds:g} s (limits.body_read_seconds)",
                    code="request_timeout",
                )
                return await JSONResponse(err.body(), status_code=408, headers={"Connection": "close"})(
                    scope, receive, send
                )
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


class ServerErrors:
    """An unexpected error: a complete OpenAI-format 500 when no response has started, so a keep-alive connection
    stays usable; when one had started, its connection is closed (the response cannot be completed honestly)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as e:
            log.error("internal error on %s: %s", scope["path"], type(e).__name__)
            log.debug("internal error on %s", scope["path"], exc_info=True)
            if not started:
                await JSONResponse(error_body("internal error", "server_error"), status_code=500)(scope, receive, send)


class RequestMetrics:
    """Counts requests by endpoint (one of `endpoints`, else "other") and status, and times them to the first byte of
    the response.

    A request whose client went away before any response was sent is counted with status 499.
    """

    def __init__(self, app, metrics: Metrics, endpoints: frozenset[str]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
        start = time.perf_counter()
        status = 499

        async def timed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                self.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        except Exception:
            status = 500
            raise
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()


class RedactQuery(logging.Filter):
    """Access-log lines show query strings with their values redacted (a key sent as ?api_key= never reaches a log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            path, _, query = args[2].partition("?")
            redacted = "&".join(f"{kv.partition('=')[0]}=[redacted]" for kv in query.split("&"))
            record.args = (*args[:2], f"{path}?{redacted}", *args[3:])
        return True


def redact_access_log() -> None:
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactQuery) for f in access.filters):
        access.addFilter(RedactQuery())
