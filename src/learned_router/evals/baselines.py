"""Baseline routers on the same test prompts. Each `*_scores` returns one strong score per test prompt
(higher = more in need of the strong model), so `frontier.sweep` applies to it as to the router;
for the learned ones (kNN, logistic) p_weak = 1 - score.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.neighbors import NearestNeighbors

from ..errors import DataError
from .checks import as_array, as_binary, as_embeddings, as_pair, as_unit, as_weights
from .frontier import Curve, sweep


def random_scores(n: int) -> np.ndarray:
    """Every prompt ties, so the exact sweep gives the expected random line from all-weak to all-strong (APGR 0.5)."""
    if n < 1:
        raise DataError("random baseline: no prompts")
    return np.zeros(n)


def routellm_random_curve(weak, strong, quantiles: int = 10, repeats: int = 10, seed: int = 0) -> Curve:
    """RouteLLM's random router: `random.seed(seed)`, `repeats` runs of one `random.uniform(0, 1)` per prompt
    (in input order), each swept at `quantiles` cut points, quality averaged per strong fraction."""
    weak, strong = as_pair(weak, strong)
    rng = random.Random(seed)
    runs = []
    for _ in range(repeats):
        c = sweep([rng.uniform(0, 1) for _ in range(weak.size)], weak, strong, quantiles)
        runs.append(pd.DataFrame({"strong_fraction": c.strong_fraction, "quality": c.quality}))
    mean = pd.concat(runs).groupby("strong_fraction", as_index=False)["quality"].mean()
    return Curve(mean["strong_fraction"].to_numpy(), mean["quality"].to_numpy(), np.full(len(mean), np.nan))


def oracle_scores(weak, strong) -> np.ndarray:
    """The best routing at every exact share of strong calls: largest gain (strong - weak) first, the losses last.

    Returned as distinct ranks; ties among equal gains are broken by position, which leaves quality unchanged.
    """
    weak, strong = as_pair(weak, strong)
    ranks = np.empty(weak.size)
    ranks[np.argsort(strong - weak, kind="stable")] = np.arange(weak.size)
    return ranks


def oracle_envelope(weak, strong, points: int | None = None) -> Curve:
    """Best quality with *at most* each share of strong calls: the oracle curve made non-decreasing, as RouteLLM's
    `get_optimal_accuracy` (never routes a loss to strong) and the datasets README's "oracle APGR" compute it.

    points=None: every k/n; points=q: q+1 even fractions (RouteLLM plots 0, 10, ..., 100%), interpolated linearly.
    `threshold` is the oracle's threshold that first reaches the quality (NaN at interpolated points). Not a score
    routing (it ends above the strong model when the weak one sometimes wins), so it has no cost.
    """
    exact = sweep(oracle_scores(weak, strong), weak, strong, quantiles=None)
    quality = np.maximum.accumulate(exact.quality)
    new_best = exact.quality > np.concatenate([[-np.inf], quality[:-1]])
    best = np.maximum.accumulate(np.where(new_best, np.arange(quality.size), 0))  # fewest calls for that quality
    if points is None:
        return Curve(exact.strong_fraction, quality, exact.threshold[best])
    fractions = np.linspace(0.0, 1.0, points + 1)
    return Curve(fractions, np.interp(fractions, exact.strong_fraction, quality), np.full(fractions.size, np.nan))


def prompt_length_scores(prompts: Sequence[str], count: Callable[[str], int] = len) -> np.ndarray:
    """Longer prompt => strong. `count` gives the length: characters by default, or e.g. a tokenizer's count."""
    if isinstance(prompts, str) or len(prompts) == 0:
        raise DataError("prompt-length baseline: expected a non-empty list of prompts")
    return as_array([count(p) for p in prompts], "prompt length")


def knn_scores(train_emb, train_labels, test_emb, k: int = 30, gamma: float = 10.0, sample_weight=None) -> np.ndarray:
    """Similarity-weighted kNN: p_weak = mean of the k most cosine-similar training labels, weighted by
    exp(gamma * similarity) (times sample_weight), in the spirit of RouteLLM's SW ranking. Returns 1 - p_weak.

    Labels are in [0, 1] (soft labels allowed). k is fixed, not tuned.
    """
    train = as_embeddings(train_emb, "train embeddings")
    y = as_unit(train_labels, "train labels", train.shape[0])
    test = as_embeddings(test_emb, "test embeddings", train.shape[1])
    w = as_weights(sample_weight, y.size)
    if k < 1:
        raise DataError(f"knn: k must be >= 1, got {k}")
    nn = NearestNeighbors(n_neighbors=min(k, y.size), metric="cosine", algorithm="brute").fit(train)
    dist, idx = nn.kneighbors(test)
    sim = 1.0 - dist
    weights = np.exp(gamma * (sim - sim.max(axis=1, keepdims=True))) * w[idx]
    return 1.0 - (weights * y[idx]).sum(axis=1) / weights.sum(axis=1)


def logistic_scores(train_emb, train_labels, test_emb, sample_weight=None, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Logistic regression on the embeddings, C in 1e-3..1e2 chosen by stratified CV log-loss on the training set
    only, then refit on all of it.

    Labels are 0/1 (1 = weak passes). Returns 1 - p_weak.
    """
    train = as_embeddings(train_emb, "train embeddings")
    y = as_binary(train_labels, "train labels", train.shape[0])
    test = as_embeddings(test_emb, "test embeddings", train.shape[1])
    w = as_weights(sample_weight, y.size)
    if min(np.bincount(y.astype(int), minlength=2)) < folds:
        raise DataError(f"logistic baseline: each label needs at least {folds} training prompts for {folds}-fold CV")
    model = GridSearchCV(
        LogisticRegression(max_iter=2000),
        {"C": np.logspace(-3, 2, 6)},
        scoring="neg_log_loss",
        cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
    )
    model.fit(train, y.astype(int), sample_weight=w)  # weights the fits; the CV log-loss is unweighted
    return model.predict_proba(test)[:, 0]
