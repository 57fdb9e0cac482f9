"""The shipped router on prompts the team wrote, plainly easy or plainly hard, that are in no training source."""

from pathlib import Path

import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from learned_router import Router

ROOT = Path(__file__).resolve().parents[1]
TABLE = pd.read_csv(Path(__file__).with_name("data") / "common_sense.csv")


@pytest.fixture(scope="module")
def shipped():
    return Router(ROOT / "models" / "default")


def test_the_table_covers_each_kind_of_task():
    assert set(TABLE["kind"]) == {"easy", "hard"} and TABLE["prompt"].is_unique
    for kind, part in TABLE.groupby("kind"):
        assert len(part) >= 20 and {"code", "math", "writing", "translation", "extraction"} <= set(part["category"]), (
            kind
        )


@pytest.mark.parametrize("weak", [None, "generic"])
def test_easy_prompts_get_higher_pass_chances_than_hard_ones(shipped, weak):
    p = shipped.pass_chance(TABLE["prompt"].tolist(), weak=weak)
    auc = roc_auc_score(TABLE["kind"] == "easy", p)
    assert auc >= 0.9, f"ranking AUC {auc:.3f} (easy above hard)"


def test_hi_goes_to_the_weak_model_and_a_lock_free_queue_to_the_strong_one(shipped):
    hi, queue = shipped.route(["hi", TABLE.loc[TABLE["prompt"].str.contains("lock-free"), "prompt"].iloc[0]])
    assert hi.route == "weak", hi
    assert queue.route == "strong", queue
