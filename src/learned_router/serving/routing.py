"""What the router reads from a chat request: its threshold, the text it scores, its size and its routing options.

The router scores one text per request. By default that is the last user turn: it is the request the
model must answer now (earlier turns are context; a system prompt is the same for every request of an
app, so it says little about this one's difficulty). `first_user` scores the opening request of the
conversation, `all_user` all user turns joined.

Token counts are estimated as ceil(characters / chars_per_token) + 4 per message (learned_router.prices), over the
whole conversation (that is what the upstream model reads), plus the requested max_tokens. The router's own
tokenizer is not used for this: it is not the upstream model's tokenizer and it stops at the router's token budget.

Routing options come in the `router` object of the body (`{"router": {"latency_budget_ms": 800, "data_class":
"restricted", "task_type": "code"}}`, the openai client's `extra_body`), which is never forwarded, or in the headers
`x-router-latency-budget-ms`, `x-router-data-class` and `x-router-task-type`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from ..errors import first_error
from ..prices import prompt_tokens
from .errors import APIError

LATENCY_HEADER, DATA_CLASS_HEADER, TASK_TYPE_HEADER = (
    "x-router-latency-budget-ms",
    "x-router-data-class",
    "x-router-task-type",
)
# The encoder reads its first max_seq_length tokens (at most 512); the tokenizer would still walk the whole text first (~0.6 s for 1 MB).
# 32k characters hold far more than 512 tokens of any real text, so cutting there leaves the score as it is.
MAX_SCORED_CHARS = 32_768
ROUTER_MODEL = "router"
_MODEL_NAME = re.compile(r"router-([0-9]+(?:\.[0-9]*)?|\.[0-9]+)")  # ASCII digits: float() reads others too


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: StrictStr
    text: StrictStr | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StrictStr | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content or [] if p.type == "text" and p.text)


class ChatRequest(BaseModel):
    """The fields of an OpenAI chat request the router reads; all others are forwarded untouched."""

    model_config = ConfigDict(extra="allow")
    model: StrictStr
    messages: list[Message] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)

    def output_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class RouterOptions(BaseModel):
    """Per-request routing options."""

    model_config = ConfigDict(extra="forbid")
    latency_budget_ms: StrictInt | StrictFloat | None = Field(None, gt=0, allow_inf_nan=False)
    data_class: StrictStr | None = None
    task_type: StrictStr | None = None  # one of the configured task types, instead of the inferred one


def parse_request(raw: bytes) -> tuple[ChatRequest, dict]:
    """The validated request and the original JSON object (forwarded as is); APIError 400 on bad input."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not valid UTF-8 (byte {e.start})") from None
    try:
        body = json.loads(text, parse_constant=reject_constant)
    except json.JSONDecodeError as e:
        raise APIError(400, f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except ValueError as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    if (where := invalid_unicode(body)) is not None:
        raise APIError(
            400,
            f"{where or 'request body'}: contains invalid Unicode (a lone UTF-16 surrogate)",
            param=where or None,
            code="invalid_unicode",
        )
    if (where := non_finite(body)) is not None:
        raise APIError(
            400, f"{where}: a number outside the range of a 64-bit float", param=where, code="invalid_number"
        )
    try:
        req = ChatRequest.model_validate(body)
    except ValidationError as e:
        loc, msg = first_error(e)
        param = ".".join(map(str, loc))
        if param.startswith("messages.") and loc[-1] == "role":
            msg = f"unknown role {e.errors()[0].get('input')!r}; expected system, developer, user, assistant, tool or function"
        raise APIError(400, f"{param}: {msg}", param=param) from None
    return req, body


def invalid_unicode(value: object, path: str = "") -> str | None:
    """The path (`messages.0.content`) of the first string, key or value, that cannot be encoded as UTF-8; else None.

    JSON's \\ud800 escapes decode to lone surrogates, which the tokenizer, httpx and HTTP headers all refuse.
    """
    return first_path(value, lambda v: isinstance(v, str) and not _encodable(v), path)


def non_finite(value: object) -> str | None:
    """The path of the first number no float holds (JSON's 1e309 reads as infinity); else None."""
    return first_path(value, lambda v: isinstance(v, float) and not math.isfinite(v))


def first_path(value: object, bad, path: str = "") -> str | None:
    """The path of the first value, or of the object holding the first key, for which `bad` is true; else None."""
    stack = [(path, value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, dict):
            for k, item in v.items():
                if bad(k):
                    return where or ""
                stack.append((f"{where}.{k}" if where else str(k), item))
        elif isinstance(v, list):
            stack.extend((f"{where}.{i}", item) for i, item in enumerate(v))
        elif bad(v):
            return where
    return None


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def requested_threshold(model: str, default: float) -> float:
    """`router` -> the configured threshold; `router-0.35` -> 0.35 (in [0, 1], else 400); other names -> 404."""
    if model == ROUTER_MODEL:
        return default
    if model.startswith(ROUTER_MODEL + "-"):
        m = _MODEL_NAME.fullmatch(model)
        t = float(m.group(1)) if m else math.nan
        if not 0.0 <= t <= 1.0:
            raise APIError(
                400,
                f"model {model!r}: the threshold after 'router-' must be a number in [0, 1], e.g. router-0.35",
                param="model",
                code="invalid_threshold",
            )
        return t
    raise APIError(
        404,
        f"model {model!r} does not exist: use 'router' or 'router-<threshold>' (e.g. router-0.35)",
        param="model",
        code="model_not_found",
    )


def scored_text(messages: list[Message], turn: str) -> str:
    """The text the router scores: the last, first or all user turns (the ones with text), cut at MAX_SCORED_CHARS.

    Without a user turn with text (a system-only conversation, an image-only question), the last message with text;
    "" when no message has any: the request is then routed unscored, to the tier that always passes.
    """
    users = [t for m in messages if m.role == "user" and (t := m.text()).strip()]
    if not users:
        return next((t for m in reversed(messages) if (t := m.text()).strip()), "")[:MAX_SCORED_CHARS]
    if turn == "first_user":
        text = users[0]
    elif turn == "all_user":
        text = "\n\n".join(users)
    else:
        text = users[-1]
    return text[:MAX_SCORED_CHARS]


def estimate_tokens(messages: list[Message], chars_per_token: float) -> int:
    """Prompt tokens the upstream model reads, estimated from characters (see the module docstring)."""
    return prompt_tokens((len(m.text()) for m in messages), chars_per_token)


def router_options(body: dict, headers: Mapping[str, str]) -> RouterOptions:
    """The request's routing options, taken out of `body` (so they are not forwarded) and its headers; 400 if bad."""
    try:
        raw = body.pop("router", None)
        opts = RouterOptions() if raw is None else RouterOptions.model_validate(raw)
    except ValidationError as e:
        loc, msg = first_error(e)
        param = ".".join(map(str, ("router", *loc)))
        raise APIError(400, f"{param}: {msg}", param=param) from None
    budget, data_class = headers.get(LATENCY_HEADER), headers.get(DATA_CLASS_HEADER)
    if budget is not None:
        try:
            ms = float(budget)
        except ValueError:
            ms = math.nan
        if not (ms > 0 and math.isfinite(ms)):
            raise APIError(
                400,
                f"header {LATENCY_HEADER}: must be a positive number of milliseconds, got {budget!r}",
                param=LATENCY_HEADER,
            )
        opts = _merge(opts, "latency_budget_ms", ms, LATENCY_HEADER)
    if data_class is not None:
        opts = _merge(opts, "data_class", data_class, DATA_CLASS_HEADER)
    if (task_type := headers.get(TASK_TYPE_HEADER)) is not None:
        opts = _merge(opts, "task_type", task_type, TASK_TYPE_HEADER)
    return opts


def _merge(opts: RouterOptions, field: str, value: object, header: str) -> RouterOptions:
    body = getattr(opts, field)
    if body is not None and body != value:
        raise APIError(
            400,
            f"router.{field} ({body!r}) and header {header} ({value!r}) disagree: send one of them",
            param=f"router.{field}",
        )
    return opts.model_copy(update={field: value})
