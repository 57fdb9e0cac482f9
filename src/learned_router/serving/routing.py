"""What the router reads from a chat request, and the rules that turn a score into a tier.

The router scores one text per request. By default that is the last user turn: it is the request the
model must answer now (earlier turns are context; a system prompt is the same for every request of an
app, so it says little about this one's difficulty). `first_user` scores the opening request of the
conversation, `all_user` all user turns joined.

Token counts are estimated as ceil(characters / chars_per_token) + 4 per message, over the whole
conversation (that is what the upstream model reads), plus the requested max_tokens. The router's own
tokenizer is not used for this: it is not the upstream model's tokenizer and it truncates at 256 tokens.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from .errors import APIError

Tier = Literal["strong", "weak"]
# The encoder reads the first 256 tokens; the tokenizer would still walk the whole text first (~0.6 s for 1 MB).
# 32k characters hold far more than 256 tokens of any real text, so cutting there leaves the score as it is.
MAX_SCORED_CHARS = 32_768
ROUTER_MODEL = "router"
_MODEL_NAME = re.compile(r"^router-(\d+(?:\.\d*)?|\.\d+)$")


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
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)

    def output_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def parse_request(raw: bytes) -> tuple[ChatRequest, dict]:
    """The validated request and the original JSON object (forwarded as is); APIError 400 on bad input."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not valid UTF-8 (byte {e.start})") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise APIError(400, f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except ValueError as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        req = ChatRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"])
        msg = "required" if err["type"] == "missing" else err["msg"]
        if param.startswith("messages.") and err["loc"][-1] == "role":
            msg = f"unknown role {err.get('input')!r}; expected system, developer, user, assistant, tool or function"
        raise APIError(400, f"{param}: {msg}", param=param) from None
    return req, body


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def requested_threshold(model: str, default: float) -> float:
    """`router` -> the configured threshold; `router-0.35` -> 0.35 (in [0, 1], else 400); other names -> 404."""
    if model == ROUTER_MODEL:
        return default
    if model.startswith(ROUTER_MODEL + "-"):
        m = _MODEL_NAME.match(model)
        t = float(m.group(1)) if m else math.nan
        if not 0.0 <= t <= 1.0:
            raise APIError(
                400, f"model {model!r}: the threshold after 'router-' must be a number in [0, 1], e.g. router-0.35",
                param="model", code="invalid_threshold",
            )
        return t
    raise APIError(
        404, f"model {model!r} does not exist: use 'router' or 'router-<threshold>' (e.g. router-0.35)",
        param="model", code="model_not_found",
    )


def scored_text(messages: list[Message], turn: str) -> str:
    """The text the router scores: the last, first or all user turns (the ones with text), cut at MAX_SCORED_CHARS."""
    users = [t for m in messages if m.role == "user" and (t := m.text()).strip()]
    if not users:
        raise APIError(400, "messages: there is no user turn with text to route", param="messages")
    if turn == "first_user":
        text = users[0]
    elif turn == "all_user":
        text = "\n\n".join(users)
    else:
        text = users[-1]
    return text[:MAX_SCORED_CHARS]


def estimate_tokens(messages: list[Message], chars_per_token: float) -> int:
    """Prompt tokens the upstream model reads, estimated from characters (see the module docstring)."""
    return sum(math.ceil(len(m.text()) / chars_per_token) + 4 for m in messages)


@dataclass(frozen=True)
class RouteDecision:
    tier: Tier
    p_weak: float
    threshold: float
    reason_code: Literal["score", "context"]
    reason: str
    prompt_tokens: int  # estimated
    output_tokens: int | None  # requested max_tokens, if any


def decide(p_weak: float, threshold: float, prompt_tokens: int, output_tokens: int | None, weak_context: int) -> RouteDecision:
    """Weak when p_weak >= threshold, unless the request cannot fit the weak tier's largest context window."""
    need = prompt_tokens + (output_tokens or 0)
    if need > weak_context:
        reason = f"~{need} tokens (prompt + max_tokens) exceed the weak tier's context window of {weak_context}"
        return RouteDecision("strong", p_weak, threshold, "context", reason, prompt_tokens, output_tokens)
    if p_weak >= threshold:
        tier, reason = "weak", f"p_weak {p_weak:.4f} >= threshold {threshold:.4f}"
    else:
        tier, reason = "strong", f"p_weak {p_weak:.4f} < threshold {threshold:.4f}"
    return RouteDecision(tier, p_weak, threshold, "score", reason, prompt_tokens, output_tokens)
