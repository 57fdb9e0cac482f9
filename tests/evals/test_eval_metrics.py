"""Evaluation maths: hand-computed curves, metrics and baselines, plus the RouteLLM GSM8K/MMLU oracle figures."""

import json

import numpy as np
import pandas as pd
import pytest

from conftest import DATASETS
from learned_router.errors import DataError
from learned_router.evals import (
    Curve,
    apgr,
    apgr_intervals,
    call_cost,
    classifier_metrics,
    cost_saving,
    cpt,
    cpt_routellm,
    evaluate,
    expected_calibration_error,
    knn_scores,
    logistic_scores,
    markdown_table,
    oracle_envelope,
    oracle_scores,
    plot_frontier,
    prompt_length_scores,
    random_scores,
    routellm_random_curve,
    sweep,
)


STRONG, WEAK = "gpt-4-1106-preview", "mistralai/Mixtral-8x7B-Instruct-v0.1"

# Tiny table: gains (strong - weak) = [0, 1, 0, -1, 1]; weak mean 0.4, strong mean 0.6.
W5 = np.array([1, 0, 0, 1, 0.0])
S5 = np.array([1, 1, 0, 0, 1.0])


def hand_curve(quality):
    q = np.asarray(quality, float)
    return Curve(np.linspace(0, 1, q.size), q, np.full(q.size, np.nan))


def test_exact_sweep_has_a_point_per_distinct_score_and_both_endpoints():
    c = sweep([0.9, 0.1, 0.5, 0.5, 0.3], W5, S5, quantiles=None)
    # strong first: 0.9 (gain 0), then the 0.5 tie (gains 0, -1) at once, 0.3 (+1), 0.1 (+1)
    np.testing.assert_allclose(c.strong_fraction, [0, 0.2, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(c.quality, [0.4, 0.4, 0.2, 0.4, 0.6])
    np.testing.assert_allclose(c.threshold, [np.inf, 0.9, 0.5, 0.3, 0.1])


def test_routellm_quantiles_use_ge_except_gt_at_the_maximum():
    rng = np.random.default_rng(1)
    weak, strong = rng.integers(0, 2, 10).astype(float), rng.integers(0, 2, 10).astype(float)
    c = sweep(np.arange(10.0), weak, strong, quantiles=10)
    np.testing.assert_allclose(c.strong_fraction, np.linspace(0, 1, 11))  # the max cut sends none strong
    assert c.quality[-1] == pytest.approx(strong.mean()) and c.quality[0] == pytest.approx(weak.mean())


def test_qcut_with_ties_drops_duplicate_edges_instead_of_crashing():
    scores = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 2.0])
    with pytest.raises(ValueError):
        pd.qcut(scores, 10, retbins=True)  # what RouteLLM's script would hit
    weak, strong = np.zeros(10), np.ones(10)
    c = sweep(scores, weak, strong, quantiles=10)
    # unique edges [0, 1, 1.1, 2]: >=0 -> 10, >=1 -> 3, >=1.1 -> 1, >2 -> 0
    np.testing.assert_allclose(c.strong_fraction, [0, 0.1, 0.3, 1.0])
    np.testing.assert_allclose(sweep(scores, weak, strong, quantiles=None).strong_fraction, c.strong_fraction)
    constant = sweep(np.zeros(10), weak, strong, quantiles=10)
    np.testing.assert_allclose(constant.strong_fraction, [0, 1])


def test_oracle_apgr_on_tiny_table():
    # exact oracle: gains sorted [1, 1, 0, 0, -1] -> quality 0.4, 0.6, 0.8, 0.8, 0.8, 0.6 at k/5
    c = sweep(oracle_scores(W5, S5), W5, S5, quantiles=None)
    np.testing.assert_allclose(c.quality, [0.4, 0.6, 0.8, 0.8, 0.8, 0.6])
    assert apgr(c, 0.4, 0.6) == pytest.approx((0.70 - 0.4) / 0.2)  # AUC 0.1 + 0.14 + 0.16 + 0.16 + 0.14
    env = oracle_envelope(W5, S5)  # never routes the loss: the last segment stays at 0.8
    assert apgr(env, 0.4, 0.6) == pytest.approx((0.72 - 0.4) / 0.2)
    np.testing.assert_allclose(env.threshold, c.threshold[[0, 1, 2, 2, 2, 2]])
    deciles = oracle_envelope(W5, S5, points=10)
    np.testing.assert_allclose(deciles.quality, [0.4, 0.5, 0.6, 0.7, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8])


def test_random_line_apgr_is_one_half_and_anti_router_is_below():
    rng = np.random.default_rng(0)
    weak, strong = 0.5 * rng.random(200), 0.5 + 0.5 * rng.random(200)
    for q in (None, 10):
        c = sweep(random_scores(200), weak, strong, quantiles=q)
        assert apgr(c, weak.mean(), strong.mean()) == pytest.approx(0.5, abs=1e-12)
        assert cpt(c, weak.mean(), strong.mean(), 0.5) == pytest.approx(0.5)
    anti = sweep(-oracle_scores(W5, S5), W5, S5, quantiles=None)  # quality 0.4, 0.2, 0.2, 0.2, 0.4, 0.6
    assert apgr(anti, 0.4, 0.6) == pytest.approx(-0.5)
    anti = sweep(-oracle_scores(weak, strong), weak, strong, quantiles=10)
    assert apgr(anti, weak.mean(), strong.mean()) < 0.5


def test_routellm_random_is_seeded_and_near_one_half():
    rng = np.random.default_rng(0)
    weak, strong = rng.integers(0, 2, 500).astype(float), rng.integers(0, 2, 500).astype(float)
    a, b = routellm_random_curve(weak, strong), routellm_random_curve(weak, strong)
    np.testing.assert_array_equal(a.quality, b.quality)
    np.testing.assert_allclose(a.strong_fraction, np.linspace(0, 1, 11))
    assert abs(apgr(a, weak.mean(), strong.mean()) - 0.5) < 0.1


def test_cpt_with_a_dip_ours_takes_the_first_crossing_routellm_interp_does_not():
    c = hand_curve([0.5, 0.55, 0.6, 0.62, 0.64, 0.75, 0.6, 0.65, 0.72, 0.8, 0.9])
    # target 0.5 + 0.5 * 0.4 = 0.7, first crossed between 40% (0.64) and 50% (0.75)
    assert cpt(c, 0.5, 0.9, 0.5) == pytest.approx(0.4 + 0.1 * 0.06 / 0.11)
    # np.interp's bisection lands on the later bracket 70% (0.65) - 80% (0.72)
    assert cpt_routellm(c, 0.5, 0.9, 0.5) == pytest.approx(0.7 + 0.1 * 0.05 / 0.07)
    assert cpt(c, 0.5, 0.9, 0.0) == 0.0
    assert np.isnan(cpt(c, 0.5, 0.9, 1.2))  # never reached
    assert cpt_routellm(c, 0.5, 0.9, 1.2) == 1.0  # np.interp clips to the last point


def test_cost_saving_at_95_percent_of_strong_quality():
    weak, strong = np.array([1, 0, 0, 1.0]), np.ones(4)
    score = [1, 4, 3, 2]  # prompt 1, then 2, then 3, then 0 go strong
    # quality 0.5, 0.75, 1.0 at 0, 25, 50%: 0.95 is reached 0.8 of the way from 25% to 50% -> 45% strong calls
    c = sweep(score, weak, strong, quantiles=None, cost_per_call={"strong": 1.0, "weak": 0.1})
    saving, fraction = cost_saving(c, strong.mean(), 0.95)
    assert fraction == pytest.approx(0.45)
    assert saving == pytest.approx(1 - (0.1 + 0.45 * 0.9))
    # per-prompt strong costs 1..4, weak 0.5: cost 0.875 at 25%, 1.5 at 50%, all-strong 2.5
    c = sweep(score, weak, strong, quantiles=None, cost_per_call={"strong": [1, 2, 3, 4], "weak": 0.5})
    assert cost_saving(c, strong.mean())[0] == pytest.approx(1 - (0.875 + 0.8 * 0.625) / 2.5)
    assert call_cost(1000, 500, 10.0, 30.0) == pytest.approx(0.025)
    with pytest.raises(DataError, match="cost_per_call"):
        sweep(score, weak, strong, cost_per_call={"strong": 1.0})
    with pytest.raises(DataError, match="cost_per_call"):
        sweep(score, weak, strong, cost_per_call={"strong": 1.0, "weak": -1.0})


def test_classifier_metrics_on_calibrated_and_miscalibrated_toys():
    p = [0.25] * 4 + [0.75] * 4
    y = [1, 0, 0, 0, 1, 1, 1, 0]
    m = classifier_metrics(p, y)
    assert m["ece"] == pytest.approx(0.0)
    assert m["brier"] == pytest.approx(0.1875)
    assert m["roc_auc"] == pytest.approx(0.75)  # (9 wins + 6 ties / 2) / 16 pairs
    assert expected_calibration_error([0.9] * 4, [1, 0, 1, 0]) == pytest.approx(0.4)
    # p = 1.0 lands in the last bin, p = 0.1 in the second
    assert expected_calibration_error([1.0, 0.1], [1, 0]) == pytest.approx(0.05)
    assert np.isnan(classifier_metrics([0.2, 0.7], [1, 1])["roc_auc"])
    with pytest.raises(DataError, match="0 or 1"):
        classifier_metrics([0.2, 0.7], [0.5, 1])


def separable(seed=0, n_train=300, n_test=200, dim=16):
    """Two clusters; the weak model passes exactly on cluster A, the strong one always."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=(2, dim)) * 3

    def draw(n):
        y = rng.integers(0, 2, n)
        return centre[y] + rng.normal(size=(n, dim)), y.astype(float)

    return draw(n_train), draw(n_test)


def test_knn_and_logistic_beat_random_on_a_separable_set():
    (x_tr, y_tr), (x_te, y_te) = separable()
    scores = {
        "knn": knn_scores(x_tr, y_tr, x_te, k=20),
        "logistic": logistic_scores(x_tr, y_tr, x_te, sample_weight=np.full(y_tr.size, 2.0)),
    }
    report = evaluate(scores, y_te, np.ones_like(y_te), labels=y_te, p_weak={k: 1 - s for k, s in scores.items()})
    best = report["scorers"]["oracle"]["apgr"]  # 0.75 here: strong helps on half the prompts, by 1
    assert best == pytest.approx(0.75, abs=0.03)
    assert report["scorers"]["random"]["apgr"] == pytest.approx(0.5)
    for name in scores:
        m = report["scorers"][name]
        assert m["apgr"] > best - 0.02
        assert m["roc_auc"] > 0.98


def test_bad_input_raises_data_error_naming_the_problem():
    with pytest.raises(DataError, match="empty"):
        sweep([], [], [])
    with pytest.raises(DataError, match="expected 5"):
        sweep([1, 2, 3], W5, S5)
    with pytest.raises(DataError, match="NaN"):
        sweep([1, np.nan, 3, 4, 5], W5, S5)
    with pytest.raises(DataError, match=r"outside \[0, 1\]"):
        sweep([1, 2, 3, 4, 5], W5, [1, 1, 1.5, 0, 0])
    with pytest.raises(DataError, match="reserved"):
        evaluate({"oracle": np.zeros(5)}, W5, S5)
    with pytest.raises(DataError, match="dims"):
        knn_scores(np.ones((4, 3)), [1, 0, 1, 0], np.ones((2, 5)))
    with pytest.raises(DataError, match="each label"):
        logistic_scores(np.eye(4), [1, 0, 1, 0], np.eye(4))


def test_evaluate_is_json_ready_and_feeds_the_table_and_plot(tmp_path):
    rng = np.random.default_rng(3)
    weak, strong = rng.integers(0, 2, 100).astype(float), rng.integers(0, 2, 100).astype(float)
    router = oracle_scores(weak, strong) + rng.normal(0, 30, 100)
    report = evaluate(
        {"router": router}, weak, strong, cost_per_call={"strong": 1.0, "weak": 0.06}, routellm_random=True
    )
    report = json.loads(json.dumps(report, allow_nan=False))
    assert list(report["scorers"]) == ["router", "random", "oracle", "optimal", "random_routellm"]
    apgrs = {name: m["apgr"] for name, m in report["scorers"].items()}
    assert apgrs["optimal"] >= apgrs["oracle"] > apgrs["router"] > apgrs["random"]
    table = markdown_table(report)
    assert table.count("\n") == 6 and "| router |" in table and "APGR (RouteLLM)" in table
    png = plot_frontier(report, tmp_path / "frontier.png", benchmark="toy", strong_model="s", weak_model="w")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_apgr_intervals_cover_the_estimate_shrink_with_more_prompts_and_tell_leads_from_noise():
    rng = np.random.default_rng(5)

    def table(n):
        weak, strong = (rng.random(n) < 0.4).astype(float), (rng.random(n) < 0.8).astype(float)
        good = oracle_scores(weak, strong) + rng.normal(0, 1.5, n)  # a router that ranks well, with noise
        return weak, strong, {"good": good, "noise": rng.normal(size=n), "noise too": rng.normal(size=n)}

    weak, strong, scores = table(300)
    cis = apgr_intervals(scores, weak, strong, lead_of="good", resamples=300)
    for name, s in scores.items():
        lo, hi = cis[name]["apgr_ci"]
        assert lo < apgr(sweep(s, weak, strong, None), weak.mean(), strong.mean()) < hi
    assert "lead_ci" not in cis["good"] and cis["noise"]["lead_ci"][0] > 0  # a real lead: the interval excludes 0
    lo, hi = apgr_intervals(scores, weak, strong, lead_of="noise", resamples=300)["noise too"]["lead_ci"]
    assert lo < 0 < hi  # two random scorers: indistinguishable
    weak4, strong4, scores4 = table(1200)
    wide = np.diff(cis["good"]["apgr_ci"])[0]
    narrow = np.diff(apgr_intervals(scores4, weak4, strong4, lead_of="good", resamples=300)["good"]["apgr_ci"])[0]
    assert narrow < 0.7 * wide  # ~1/sqrt(4) of the width with 4x the prompts
    assert apgr_intervals(scores, weak, strong, "good", resamples=200, seed=1) == apgr_intervals(
        scores, weak, strong, "good", resamples=200, seed=1
    )
    tied = apgr_intervals(
        {"a": np.arange(4.0), "b": -np.arange(4.0)}, [1, 0, 1, 0], [0, 1, 1, 0], lead_of="a", resamples=50
    )
    assert np.isnan(tied["a"]["apgr_ci"]).all()  # equal means: APGR undefined, no interval (and no warning spam)
    with pytest.raises(DataError, match="'best' is not among the scorers"):
        apgr_intervals(scores, weak, strong, lead_of="best")


@pytest.mark.parametrize("name, oracle_apgr", [("gsm8k", 1.133), ("mmlu", 1.297)])
def test_routellm_oracle_apgr_matches_the_datasets_readme(name, oracle_apgr):
    path = DATASETS / f"routellm_{name}.parquet"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    df = pd.read_parquet(path, columns=["prompt_id", "prompt", "model", "score", "contaminated"])
    df = df[~df["contaminated"]]
    wide = df.pivot(index="prompt_id", columns="model", values="score")
    prompts = df.drop_duplicates("prompt_id").set_index("prompt_id").loc[wide.index, "prompt"]
    report = evaluate({"length": prompt_length_scores(prompts.tolist())}, wide[WEAK], wide[STRONG])
    # the README's "oracle APGR" is the at-most-k-strong-calls optimum at every strong-call fraction
    assert round(report["scorers"]["optimal"]["apgr"], 3) == oracle_apgr
    assert report["scorers"]["oracle"]["apgr"] < report["scorers"]["optimal"]["apgr"]
    length = report["scorers"]["length"]
    assert 0.0 < length["apgr"] < 1.0 and 0.0 < length["cpt50"] < 1.0 and 0.0 < length["apgr_routellm"] < 1.0
