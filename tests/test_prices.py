"""One price model and one token estimate: the service, `label` and the evals cost a call alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from learned_router.errors import DataError
from learned_router.evals import call_cost
from learned_router.evals.protocol import Prices
from learned_router.prices import Price, chat_tokens, cost_usd, load_prices, message_tokens, prompt_tokens, text_tokens
from learned_router.serving.config import ProviderConfig
from learned_router.serving.routing import Message, estimate_tokens
from learned_router.serving.usage import billed_tokens

ROOT = Path(__file__).resolve().parents[1]


def test_one_price_model_everywhere():
    provider = ProviderConfig(base_url="http://x", model="m", input_price_per_1m=10.0, output_price_per_1m=30.0)
    assert (
        provider.cost_usd(1000, 500)
        == Price(10.0, 30.0).cost(1000, 500)
        == cost_usd(1000, 500, 10, 30)
        == pytest.approx(0.025)
    )
    assert call_cost([1000, 2000], 500, 10.0, 30.0) == pytest.approx([0.025, 0.035])


def test_one_token_estimate_everywhere():
    chat = [{"role": "system", "content": "abc"}, {"role": "user", "content": "x" * 41}]
    assert prompt_tokens([3, 41], 4) == (1 + 4) + (11 + 4)
    assert estimate_tokens([Message.model_validate(m) for m in chat], 4) == chat_tokens(chat, 4) == 20
    parts = {"role": "user", "content": [{"type": "text", "text": "hello"}]}
    assert chat_tokens([*chat, parts, {"role": "assistant", "content": None}], 4) == 20  # text contents only
    assert billed_tokens(None, 20, 41, 4) == (20, 11, "missing")  # an answer is its text alone
    assert text_tokens(np.array([40.0, 41.0])).tolist() == [10, 11] and message_tokens(40) == 14


def test_eval_prices_cost_a_prompt_as_the_service_estimates_it(tmp_path):
    prices = Prices.load(ROOT / "evals" / "prices.yaml")
    assert prices.per_model["gpt-4-1106-preview"] == (10.0, 30.0) and prices.output_tokens == 256
    cost = prices.cost("gpt-4-1106-preview", pd.Series(["x" * 41]))
    assert cost.tolist() == pytest.approx([((11 + 4) * 10 + 256 * 30) / 1e6])


def test_price_file_errors_name_the_file_and_key(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("models:\n  gpt-4: {input_per_1m: 10, output_per_1m: 30}\n")
    with pytest.raises(DataError, match=rf"^{old}: models.gpt-4.input_per_1m: renamed input_price_per_1m"):
        load_prices(old)
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  gpt-4: {input_price_per_1m: -1, output_price_per_1m: 30}\n")
    with pytest.raises(DataError, match=rf"^{bad}: models.gpt-4: needs non-negative numbers"):
        load_prices(bad)
    bad.write_text("output_tokens: 256\n")
    with pytest.raises(DataError, match=rf"^{bad}: expected 'models:"):
        load_prices(bad)
    with pytest.raises(DataError, match="no such file"):
        load_prices(tmp_path / "none.yaml")
