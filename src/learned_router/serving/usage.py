"""What an answer is billed for: the provider's `usage` when it is sane, else an estimate from characters, which is
then also what the client is shown as the answer's usage.

Usage counts must be non-negative integers of at most MAX_TOKENS each (no float, bool, string, NaN or 1e308);
anything else is billed by the estimate (the request's estimated prompt tokens, the answer's characters /
chars_per_token) and counted in router_usage_estimated_total{reason="missing"|"invalid"}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..prices import text_tokens
from .config import ProviderConfig

MAX_TOKENS = 10_000_000  # per count of one answer: far above any context window, far below a corrupting figure


def valid_usage(usage: object) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) when both are ints in [0, MAX_TOKENS]; else None."""
    if not isinstance(usage, dict):
        return None
    p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if all(type(x) is int and 0 <= x <= MAX_TOKENS for x in (p, c)):
        return p, c
    return None


def answer_chars(body: object) -> int:
    """Characters of the text an answer holds (its choices' message contents)."""
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        return 0
    out = 0
    for choice in body["choices"]:
        message = choice.get("message") if isinstance(choice, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        out += len(content) if isinstance(content, str) else 0
    return out


def answer_text(body: object) -> str | None:
    """The first choice's message content, when it is text."""
    choices = body.get("choices") if isinstance(body, dict) else None
    choice = choices[0] if isinstance(choices, list) and choices else None
    message = choice.get("message") if isinstance(choice, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else None


def billed_tokens(
    usage: object, prompt_estimate: float, chars: int, chars_per_token: float
) -> tuple[float, float, str | None]:
    """(prompt, completion, why estimated: None, 'missing' or 'invalid')."""
    if (tokens := valid_usage(usage)) is not None:
        return float(tokens[0]), float(tokens[1]), None
    return float(prompt_estimate), text_tokens(chars, chars_per_token), "missing" if usage is None else "invalid"


def usage_of(prompt_tokens: float, completion_tokens: float) -> dict[str, int]:
    """Token counts in OpenAI's `usage` shape: what a client is shown in place of a provider's invalid usage."""
    p, c = int(round(prompt_tokens)), int(round(completion_tokens))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def sane_cost(usd: float) -> bool:
    return math.isfinite(usd) and usd >= 0


@dataclass(frozen=True)
class Billed:
    """What one answer was billed: dollars and the token counts, and why they were estimated (None: the provider's
    usage; 'missing' or 'invalid'; 'insane' when the price times the counts was no finite amount, billed 0)."""

    usd: float
    prompt_tokens: float
    completion_tokens: float
    estimated: str | None = None

    def usage(self) -> dict[str, int]:
        """The counts billed, in OpenAI's `usage` shape."""
        return usage_of(self.prompt_tokens, self.completion_tokens)


def bill(provider: ProviderConfig, usage: object, prompt_estimate: float, chars: int, chars_per_token: float) -> Billed:
    """One answer's bill at the provider's prices: its usage when sane, else the estimate (the prompt's, and the
    answer's `chars`)."""
    prompt_tokens, completion_tokens, estimated = billed_tokens(usage, prompt_estimate, chars, chars_per_token)
    usd = provider.cost_usd(prompt_tokens, completion_tokens)
    if not sane_cost(usd):  # prices and counts are bounded, so this is a bug: never let it reach a budget
        return Billed(0.0, prompt_tokens, completion_tokens, "insane")
    return Billed(usd, prompt_tokens, completion_tokens, estimated)
