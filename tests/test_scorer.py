"""The torch-free scorer: batch and single prompts, truncation, pass chances, thresholds, and never torch."""

import json
import subprocess
import sys

import numpy as np
import pytest

from learned_router import Router, RouterError


@pytest.fixture(scope="module")
def router(trained):
    return Router(trained["path"])


PROMPTS = ["What is 2+2?", "Write a sonnet about the sea and a lighthouse keeper.", "hi", "Solve x^2 = 4. " * 10]


@pytest.mark.parametrize("variant", ["int8", "fp32"])
def test_a_prompt_scores_the_same_alone_or_in_a_batch(trained, variant):
    r = Router(trained["path"], variant=variant)
    batch = r.score(PROMPTS)
    single = np.array([r.score([p])[0] for p in PROMPTS])
    assert batch.shape == (4, len(r.models)) and batch.dtype == np.float32 and r.models[-1] == "generic"
    assert ((batch >= 0) & (batch <= 1)).all()
    # int8 is exact (one prompt per run); fp32 batches with padding, which the attention mask cancels
    assert np.allclose(batch, single, atol=0 if variant == "int8" else 1e-5)


def test_long_prompts_keep_their_head(router):
    head = "Explain quantum entanglement to a child. "
    long = head * 200
    budget = router.manifest.encoder.max_seq_length
    assert router.n_tokens(long) == budget == router.max_seq_length and router.n_tokens(long, whole=True) > budget
    # head truncation: what follows the first max_seq_length tokens does not change the score
    assert router.score([long])[0] == pytest.approx(router.score([long + " And also cook me a pie."])[0], abs=1e-6)


def test_a_long_prompt_is_read_from_a_prefix_exactly_as_whole(router, datasets_dir):
    """The tokens of a long prompt come from a prefix cut at whitespace: the same ids as tokenizing it whole, for real
    long prompts and for ones built to break a prefix (no whitespace, words past WordPiece's 100 characters, CJK,
    whitespace only at the start)."""
    import random

    import pandas as pd

    real = pd.read_parquet(datasets_dir / "arena_battles_1k.parquet", columns=["prompt"])["prompt"].drop_duplicates()
    rng = random.Random(0)
    words = ["alpha", "β", "数据", "x" * 150, "emoji😀", "end.", "\n", "\t", "a-b", "12345"]
    built = [" ".join(rng.choice(words) for _ in range(rng.randint(300, 3000))) for _ in range(40)]
    hostile = ["y" * 5000, "数" * 5000, ("word " * 10 + "z" * 3000 + " ") * 5, " " * 3000 + "hello", "\n" * 4000 + "x"]
    texts = [p for p in real if len(p) > 2 * 128 * 16][:30] + built + hostile
    whole = [router._tok.encode(t).ids for t in texts]  # the tokenizer truncates after reading all of it
    assert [e.ids for e in router.encode(texts)] == whole


def test_pass_chances_are_views_of_the_predicted_quality(router):
    m = router.manifest
    out = router.predict(PROMPTS)
    quality, difficulty = out.quality, out.difficulty
    assert (
        out.models == tuple(m.models)
        and out.strong == m.strong
        and np.array_equal(out.pass_chances(), router.score(PROMPTS))
    )
    s, w = m.models.index(m.strong), m.models.index(m.weak)
    scores = router.score(PROMPTS)
    assert np.allclose(scores[:, s], 1.0)  # the strong model passes against itself
    assert np.allclose(scores[:, w], 1 - np.clip(quality[:, s] - quality[:, w], 0, 1), atol=1e-6)
    assert np.allclose(scores[:, -1], 1 - difficulty, atol=1e-6)
    assert np.allclose(router.pass_chance(PROMPTS), scores[:, w], atol=1e-6)
    assert np.allclose(router.pass_chance(PROMPTS, weak="generic"), 1 - difficulty, atol=1e-6)
    other = router.pass_chance(PROMPTS, weak="vicuna-13b", strong="gpt-4-0314")
    v, g = m.models.index("vicuna-13b"), m.models.index("gpt-4-0314")
    assert np.allclose(other, 1 - np.clip(quality[:, g] - quality[:, v], 0, 1), atol=1e-6)
    with pytest.raises(RouterError, match="not trained on 'gpt-5'.*use 'generic'"):
        router.pass_chance(PROMPTS, weak="gpt-5")
    with pytest.raises(RouterError, match="weak side only"):
        router.pass_chance(PROMPTS, strong="generic")


def test_route_threshold(router):
    p = router.pass_chance(["Prove the Riemann hypothesis."])[0]
    assert router.route(["Prove the Riemann hypothesis."], threshold=0.0)[0].route == "weak"
    assert router.route(["Prove the Riemann hypothesis."], threshold=1.0)[0].route == "strong"
    d = router.route(["Prove the Riemann hypothesis."], threshold=float(p))[0]
    assert d.route == "weak" and d.threshold == pytest.approx(p)
    for bad in (-0.1, 1.5, "0.3"):
        with pytest.raises(RouterError, match="threshold must be a number in"):
            router.route(["x"], threshold=bad)


@pytest.mark.parametrize(
    "prompts, message",
    [
        (["ok", ""], "prompt 1: empty prompt"),
        (["ok", None], "prompt 1: expected text, got NoneType"),
        ("just a string", "list of strings"),
        (["ok", "half a pair \ud800"], r"prompt 1: not valid Unicode \(character 12: surrogates not allowed\)"),
    ],
)
def test_bad_prompts(router, prompts, message):
    with pytest.raises(RouterError, match=message):
        router.score(prompts)


def test_scoring_never_imports_torch(trained):
    code = (
        "import sys, json, learned_router\n"
        f"r = learned_router.Router({str(trained['path'])!r})\n"
        "p = r.score(['What is 2+2?', 'Prove it.'])\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'st': 'sentence_transformers' in sys.modules, 'n': len(p)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"torch": False, "st": False, "n": 2}
