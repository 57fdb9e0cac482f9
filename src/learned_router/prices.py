"""What a call costs: one price model and one token estimate, shared by the service, `label` and the evals.

A price is USD per 1M input (prompt) and output (completion) tokens, under the names the service config uses
(`input_price_per_1m`, `output_price_per_1m`); a call costs
(input_tokens x input_price_per_1m + output_tokens x output_price_per_1m) / 1e6.

Tokens are estimated from characters, never with a tokenizer (the router's own is not the upstream model's and
stops at the router's token budget): a message is ceil(characters / chars_per_token) + 4 (its framing in the chat format), a
prompt the sum over its messages; an answer's text is ceil(characters / chars_per_token). The service's
`routing.chars_per_token` defaults to 4; the evals use 4.

A price file (evals/prices.yaml) lists models' prices:

    output_tokens: 256   # an answer's length where the data does not give it
    models:
      gpt-4-1106-preview: {input_price_per_1m: 10.0, output_price_per_1m: 30.0}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple

from .errors import DataError

CHARS_PER_TOKEN = 4.0
MESSAGE_TOKENS = 4  # a message's framing (role, separators), added to its text's tokens
OUTPUT_TOKENS = 256  # a price file's default answer length
FIELDS = ("input_price_per_1m", "output_price_per_1m")
RENAMED = {"input_per_1m": "input_price_per_1m", "output_per_1m": "output_price_per_1m"}  # an older price file's names


def cost_usd(input_tokens, output_tokens, input_price_per_1m, output_price_per_1m):
    """Dollars of a call (numbers, or numpy arrays of per-call tokens or prices)."""
    return (input_tokens * input_price_per_1m + output_tokens * output_price_per_1m) / 1e6


class Price(NamedTuple):
    """USD per 1M input and output tokens."""

    input_price_per_1m: float
    output_price_per_1m: float

    def cost(self, input_tokens, output_tokens):
        return cost_usd(input_tokens, output_tokens, self.input_price_per_1m, self.output_price_per_1m)


def text_tokens(chars, chars_per_token: float = CHARS_PER_TOKEN):
    """Tokens of a text of `chars` characters: ceil(chars / chars_per_token); an int, or an array for an array."""
    if isinstance(chars, (int, float)):
        return math.ceil(chars / chars_per_token)
    import numpy as np

    return np.ceil(np.asarray(chars, dtype=float) / chars_per_token)


def message_tokens(chars, chars_per_token: float = CHARS_PER_TOKEN):
    """Prompt tokens of one message of `chars` characters (an int, or an array for an array)."""
    return text_tokens(chars, chars_per_token) + MESSAGE_TOKENS


def prompt_tokens(message_chars: Iterable[int], chars_per_token: float = CHARS_PER_TOKEN) -> int:
    """Prompt tokens of a chat whose messages hold these numbers of characters."""
    return sum(message_tokens(c, chars_per_token) for c in message_chars)


def chat_tokens(messages: list[dict], chars_per_token: float = CHARS_PER_TOKEN) -> int:
    """Prompt tokens of an OpenAI-format chat, from the messages whose content is text."""
    return prompt_tokens((len(c) for m in messages if isinstance(c := m.get("content"), str)), chars_per_token)


@dataclass(frozen=True)
class PriceFile:
    """A price file's models and the answer length it assumes."""

    models: dict[str, Price]
    output_tokens: int = OUTPUT_TOKENS


def load_prices(path: str | Path) -> PriceFile:
    """A price file; DataError naming the file and key when it cannot be used (an older file's `input_per_1m` /
    `output_per_1m` included: they are now `input_price_per_1m` / `output_price_per_1m`)."""
    from .yamlfile import load_yaml

    raw = load_yaml(path, DataError) or {}
    models = raw.get("models") if isinstance(raw, dict) else None
    if not isinstance(models, dict):
        raise DataError(f"{path}: expected 'models: {{name: {{input_price_per_1m: X, output_price_per_1m: Y}}}}'")
    out = {}
    for name, p in models.items():
        old = [k for k in RENAMED if isinstance(p, dict) and k in p]
        if old:
            raise DataError(f"{path}: models.{name}.{old[0]}: renamed {RENAMED[old[0]]} (the service config's name)")
        values = [p.get(k) if isinstance(p, dict) else None for k in FIELDS]
        if (
            not isinstance(p, dict)
            or set(p) - set(FIELDS)
            or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in values
            )
        ):
            raise DataError(
                f"{path}: models.{name}: needs non-negative numbers input_price_per_1m and output_price_per_1m "
                "(and no other key)"
            )
        out[str(name)] = Price(*map(float, values))
    tokens = raw.get("output_tokens", OUTPUT_TOKENS)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        raise DataError(f"{path}: output_tokens: expected a whole number of tokens >= 0, got {tokens!r}")
    return PriceFile(out, tokens)
