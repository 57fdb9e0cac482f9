"""The torch-free scorer: batch and single prompts, truncation, thresholds, and that torch is never imported."""

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
    assert batch.shape == (4,) and batch.dtype == np.float32
    assert ((batch > 0) & (batch < 1)).all()
    # int8 is exact (one prompt per run); fp32 batches with padding, which the attention mask cancels
    assert np.allclose(batch, single, atol=0 if variant == "int8" else 1e-5)


def test_long_prompts_keep_their_head(router):
    head = "Explain quantum entanglement to a child. "
    long = head * 200
    assert router.n_tokens(long) == 256
    # head truncation: what follows the first 256 tokens does not change the score
    assert router.score([long])[0] == pytest.approx(router.score([long + " And also cook me a pie."])[0], abs=1e-6)


def test_route_threshold(router):
    p = router.score(["Prove the Riemann hypothesis."])[0]
    assert router.route(["Prove the Riemann hypothesis."], threshold=0.0)[0].model == "weak"
    assert router.route(["Prove the Riemann hypothesis."], threshold=1.0)[0].model == "strong"
    d = router.route(["Prove the Riemann hypothesis."], threshold=float(p))[0]
    assert d.model == "weak" and d.threshold == pytest.approx(p)
    for bad in (-0.1, 1.5, "0.3"):
        with pytest.raises(RouterError, match="threshold must be a number in"):
            router.route(["x"], threshold=bad)


@pytest.mark.parametrize("prompts, message", [
    (["ok", ""], "prompt 1: empty prompt"),
    (["ok", None], "prompt 1: expected text, got NoneType"),
    ("just a string", "list of strings"),
])
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
