"""A fake OpenAI-compatible provider for tests and the offline demo: canned, deterministic answers.

Its behaviour can be switched at run time with `POST /_control` (JSON with any of the `FakeState` knobs
below) and read with `GET /_stats`, so tests can break and heal a provider mid-run:

  mode: "ok" | "error" (HTTP `error_status`, 503 by default) | "429" (with Retry-After: `retry_after`)
        | "hang" (never answers) | "stall" (a stream stops after `stall_after_chunks` chunks)
        | "raw" (a misbehaving upstream: HTTP 200 with the body `raw_body`, or for a stream the SSE events
        `raw_events`, each sent as `data: <event>` and nothing else, so no [DONE] unless listed)
        | "huge" (HTTP 200 with a body, or a stream of events, of `huge_bytes` bytes and no end)
  usage: sent as the answer's `usage` instead of the true counts (any JSON value), when not None
  latency_ms: delay before answering; chunk_delay_ms: delay between stream chunks
  fail_rate: share of requests answered with HTTP `error_status` (seeded, so runs repeat)
  answer_words: {prompt_key(last user turn): n}: answer that prompt with n words (n completion tokens), e.g. the
        length of a real model's answer; other prompts get a one-line canned answer
  fail_words: a prompt whose last user turn holds any of these words (whole words, any case) is answered
        "I cannot answer that." (a recognisably wrong answer, for `learned-router label`)
  judge: act as the judge of `learned-router label` (src/learned_router/judge.py): read the answer(s) out of the
        judge's prompt and give the rubric's verdict. Single grading: "Rating: [[2]]" when the graded answer
        holds "I cannot answer that", else "Rating: [[9]]"; pairwise: the answer that does not hold it wins
        ("[[A]]" or "[[B]]"), a tie "[[C]]" when both or neither do
  judge_garbage_rate: share of the judge's answers that hold no verdict at all (seeded, so runs repeat)
  judge_rating: when set, a lying judge: every verdict is "Rating: [[judge_rating]]" (e.g. 42, outside 1-10)

`GET /_stats` also lists the last user turn of each chat request received (`prompts`, the latest 10,000) and the
last body.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import time
from dataclasses import asdict, dataclass, field, fields

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..judge import NO_ANSWER
from ..prices import prompt_tokens

ANSWERS = [
    "Here is a concise answer to your question.",
    "The short version: it depends on the constraints, but the usual approach works well.",
    "Start with the simplest solution, measure it, then optimise what the measurements show.",
    "There are three parts to this: the setup, the core idea, and the edge cases.",
]


@dataclass
class FakeState:
    name: str = "fake"
    model: str = "fake-model"
    mode: str = "ok"
    latency_ms: float = 0.0
    chunk_delay_ms: float = 0.0
    fail_rate: float = 0.0
    error_status: int = 503
    retry_after: float = 1.0
    stall_after_chunks: int = 2
    api_key: str | None = field(default=None, repr=False)  # when set, requests must send it as a bearer token
    seed: int = 0
    answer_words: dict[str, int] = field(default_factory=dict, repr=False)
    raw_body: str = ""
    raw_events: list[str] = field(default_factory=list)
    huge_bytes: int = 50 << 20
    usage: object = None
    fail_words: list[str] = field(default_factory=list)
    judge: bool = False
    judge_garbage_rate: float = 0.0
    judge_rating: float | None = None
    echo_key: bool = (
        False  # an error's message repeats the Authorization header it received, as a careless provider does
    )


MODES = {"ok", "error", "429", "hang", "stall", "raw", "huge"}
MAX_PROMPTS = 10_000  # prompts kept in the stats


def prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def canned_answer(name: str, prompt: str, words: int | None = None) -> str:
    """A deterministic answer; with `words`, exactly that many words (the canned line cut or padded)."""
    h = int(hashlib.sha256(prompt.encode()).hexdigest(), 16)
    text = f"[{name}] {ANSWERS[h % len(ANSWERS)]}"
    if words is None:
        return text
    base = text.split(" ")
    return " ".join((base + ["more"] * max(0, words - len(base)))[: max(1, words)])


SINGLE_ANSWER = re.compile(r"\[The Start of Assistant's Answer\]\n(.*?)\n\[The End of Assistant's Answer\]", re.S)
PAIR_ANSWERS = re.compile(
    r"\[The Start of Assistant A's Answer\]\n(.*?)\n\[The End of Assistant A's Answer\].*?"
    r"\[The Start of Assistant B's Answer\]\n(.*?)\n\[The End of Assistant B's Answer\]",
    re.S,
)
GARBAGE = "Both answers have their merits; it is hard to say."


def fails(prompt: str, words: list[str]) -> bool:
    return any(re.search(rf"\b{re.escape(w)}\b", prompt, re.I) for w in words if w)


def judge_answer(prompt: str) -> str:
    """The fake judge's verdict on a judge prompt (single: a rating; pairwise: A, B or C), in the rubric's format."""
    wrong = lambda text: NO_ANSWER.rstrip(".") in text  # noqa: E731
    if m := PAIR_ANSWERS.search(prompt):
        a, b = wrong(m[1]), wrong(m[2])
        return "Comparing the two answers. " + ("[[C]]" if a == b else "[[B]]" if a else "[[A]]")
    if m := SINGLE_ANSWER.search(prompt):
        return "The answer was checked against the question. Rating: " + ("[[2]]" if wrong(m[1]) else "[[9]]")
    return GARBAGE


def _error(status: int, message: str, type_: str = "server_error", headers: dict | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": None, "code": None}}, status, headers=headers
    )


def create_fake_provider(state: FakeState | None = None) -> FastAPI:
    state = state or FakeState()
    rng = random.Random(state.seed)
    stats = {
        "requests": 0,
        "ok": 0,
        "errors": 0,
        "streams_started": 0,
        "streams_completed": 0,
        "streams_aborted": 0,
        "last_body": None,
        "last_authorization_ok": None,
        "prompts": [],
    }
    app = FastAPI(title=f"fake provider {state.name}")
    app.state.fake = state
    app.state.stats = stats

    @app.post("/_control")
    async def control(request: Request):
        changes = await request.json()
        known = {f.name for f in fields(FakeState)}
        unknown = set(changes) - known - {"reset_stats"}
        if unknown or changes.get("mode", state.mode) not in MODES:
            return _error(
                400,
                f"unknown settings {sorted(unknown)} or mode; known: {sorted(known)}, modes {sorted(MODES)}",
                "invalid_request_error",
            )
        if changes.pop("reset_stats", False):
            for k, v in stats.items():
                stats[k] = [] if isinstance(v, list) else 0 if isinstance(v, int) and not isinstance(v, bool) else None
        for k, v in changes.items():
            setattr(state, k, v)
        return {k: v for k, v in asdict(state).items() if k != "api_key"}

    @app.get("/_stats")
    async def get_stats():
        return stats

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": state.model, "object": "model", "created": 0, "owned_by": state.name}],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        stats["requests"] += 1
        body = await request.json()
        messages = body.get("messages") or []
        prompt = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "") or ""
        prompt = prompt if isinstance(prompt, str) else json.dumps(prompt)
        stats["last_body"] = body
        stats["prompts"].append(prompt)
        del stats["prompts"][:-MAX_PROMPTS]
        if state.api_key is not None:
            ok = request.headers.get("authorization") == f"Bearer {state.api_key}"
            stats["last_authorization_ok"] = ok
            if not ok:
                stats["errors"] += 1
                return _error(401, "invalid provider key", "authentication_error")
        if state.latency_ms:
            await asyncio.sleep(state.latency_ms / 1000)
        while state.mode == "hang" and not await request.is_disconnected():
            await asyncio.sleep(0.05)  # answers nothing until the caller hangs up or the mode changes
        if state.mode == "error" or (state.fail_rate and rng.random() < state.fail_rate):
            stats["errors"] += 1
            echo = f" (you sent {request.headers.get('authorization')})" if state.echo_key else ""
            return _error(state.error_status, f"{state.name} is failing (simulated){echo}")
        if state.mode == "429":
            stats["errors"] += 1
            return _error(
                429, "rate limited (simulated)", "rate_limit_error", {"Retry-After": f"{state.retry_after:g}"}
            )
        if state.mode in ("raw", "huge"):
            stats["ok"] += 1
            return _misbehave(state, bool(body.get("stream")))
        if state.judge:
            answer = (
                GARBAGE
                if state.judge_garbage_rate and rng.random() < state.judge_garbage_rate
                else f"Rating: [[{state.judge_rating:g}]]"
                if state.judge_rating is not None
                else judge_answer(prompt)
            )
        elif fails(prompt, state.fail_words):
            answer = NO_ANSWER
        else:
            answer = canned_answer(state.name, prompt, state.answer_words.get(prompt_key(prompt)))
        usage = {
            "prompt_tokens": prompt_tokens(len(str(m.get("content") or "")) for m in messages),
            "completion_tokens": len(answer.split()),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if state.usage is not None:
            usage = state.usage
        model = body.get("model") or state.model
        cid, created = f"chatcmpl-{state.name}-{stats['requests']}", int(time.time())
        if not body.get("stream"):
            stats["ok"] += 1
            return {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
                "usage": usage,
            }
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(
            _stream(state, stats, cid, created, model, answer, usage, include_usage), media_type="text/event-stream"
        )

    return app


def _misbehave(state: FakeState, stream: bool) -> Response:
    media = "text/event-stream" if stream else "application/json"
    if state.mode == "raw":
        if not stream:
            return Response(state.raw_body, media_type=media)

        async def events():
            for e in list(state.raw_events):
                yield f"data: {e}\n\n"

        return StreamingResponse(events(), media_type=media)

    async def huge():
        piece = 'data: {"choices":[{"delta":{"content":"' + "x" * 65000 + '"}}]}\n\n' if stream else " " * 65536
        sent = 0
        while sent < state.huge_bytes:
            yield piece
            sent += len(piece)

    return StreamingResponse(huge(), media_type=media)


async def _stream(state, stats, cid, created, model, answer, usage, include_usage):
    stats["streams_started"] += 1
    done = False

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        c = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return f"data: {json.dumps(c)}\n\n"

    try:
        words = answer.split(" ")
        yield chunk({"role": "assistant", "content": ""})
        for i, w in enumerate(words):
            if state.mode == "stall" and i >= state.stall_after_chunks:
                await asyncio.sleep(3600)
            if state.chunk_delay_ms:
                await asyncio.sleep(state.chunk_delay_ms / 1000)
            yield chunk({"content": w if i == 0 else " " + w})
        yield chunk({}, "stop")
        if include_usage:
            c = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }
            yield f"data: {json.dumps(c)}\n\n"
        yield "data: [DONE]\n\n"
        done = True
        stats["ok"] += 1
    finally:
        stats["streams_completed" if done else "streams_aborted"] += 1
