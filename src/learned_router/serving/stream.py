"""A streamed answer: the upstream's SSE lines passed through, and the answer accounted for once the stream is over."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import anyio
import httpx

from .errors import error_body
from .providers import BadStream, Reply, stream_chunk
from .exchange import Exchange
from .usage import billed_tokens, usage_of, valid_usage


async def relay(exchange: Exchange, reply: Reply, wants_usage: bool) -> AsyncIterator[str]:
    """Pass the upstream's SSE lines through; note usage; drop the usage chunk we asked for on the client's behalf.

    A chunk that breaks OpenAI's format, a stream that ends without `data: [DONE]`, or one still going
    `limits.max_stream_seconds` after the request came in, ends the client's stream with an error event
    (`bad_response`, `stream_interrupted` or `stream_too_long`) and counts as a failure of its provider. However the stream
    ends (done, broken, or cancelled when the client goes away), the upstream response is closed and the exchange
    finished: the answer billed, logged, recorded and, when whole, offered for shadow grading.
    """
    service, d = exchange.service, exchange.d
    provider, usage, chars, skip_blank, outcome, done = reply.provider, None, 0, False, "aborted", False
    pieces: list[str] | None = [] if service.shadow else None  # the answer's text, for shadow grading
    strip_usage = provider.config.stream_usage and not wants_usage

    async def lines():
        for line in reply.head:
            yield line
        async for line in reply.lines:
            yield line

    deadline = exchange.started + service.config.limits.max_stream_seconds
    try:
        async for line in lines():
            if done:
                continue  # nothing follows [DONE]
            if time.monotonic() > deadline:
                raise BadStream(
                    f"still streaming after limits.max_stream_seconds ({service.config.limits.max_stream_seconds:g} s)",
                    kind="stream_too_long",
                )
            if line.startswith("data:"):
                if (data := line[5:].strip()) == "[DONE]":
                    done = True
                else:
                    chunk, text = stream_chunk(data)
                    chars += len(text)
                    if pieces is not None:
                        pieces.append(text)
                    if chunk.get("usage") is not None:
                        usage = chunk["usage"]
                        if strip_usage and not chunk.get("choices"):
                            skip_blank = True
                            continue
                        if valid_usage(usage) is None:  # the client is shown the counts it will be billed for
                            p, c, _ = billed_tokens(
                                usage, d.prompt_tokens, chars, service.config.routing.chars_per_token
                            )
                            line = "data: " + json.dumps(chunk | {"usage": usage_of(p, c)})
            elif skip_blank and not line:
                skip_blank = False
                continue
            yield line + "\n"
        if not done:
            raise BadStream("the stream ended without data: [DONE]", kind="stream_interrupted")
        outcome = "ok"
    except (httpx.HTTPError, BadStream) as e:
        kind = e.kind if isinstance(e, BadStream) else "stream_interrupted"
        outcome = "interrupted" if kind == "stream_interrupted" else kind
        await service.upstream.failed_mid_stream(provider, kind)
        why = e.detail if isinstance(e, BadStream) else type(e).__name__
        err = error_body(f"upstream {provider.name} failed mid-stream ({why})", "upstream_error", code=kind)
        yield f"data: {json.dumps(err)}\n\n"
    finally:
        with anyio.CancelScope(shield=True):  # close the upstream even when the client's disconnect cancelled us
            await reply.response.aclose()
        exchange.finish(reply, outcome, usage, chars, None if pieces is None else "".join(pieces))
