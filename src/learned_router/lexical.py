"""Lexical experts: per training source, a logistic regression on the prompt's word-piece bag (`embed.piece_bags`),
mixed by a gate that tells the source from the embedding. Their sum is added to a head's logit (`Head.attach_lexical`):
which words make the weak model fail differs by source (a number in a word problem, a subject's terms in MMLU), and
one bag fitted on all sources at once learns mostly the largest one."""

from __future__ import annotations

import numpy as np
from scipy import sparse
from sklearn.linear_model import LogisticRegression

ABSENT = -30.0  # the gate's bias for a source without training rows: never picked


def fit_expert(bags: sparse.csr_matrix, target: np.ndarray, weight: np.ndarray, c: float) -> np.ndarray:
    """One source's word weights: L2-regularised logistic regression (inverse strength `c`) on soft targets in
    [0, 1], each row entered once as a pass (weight t) and once as a fail (weight 1 - t). No intercept is kept:
    the head carries each source's base rate."""
    y = np.r_[np.ones(len(target)), np.zeros(len(target))]
    w = np.r_[target, 1 - target] * np.r_[weight, weight] / weight.mean()
    model = LogisticRegression(C=c, max_iter=3000).fit(sparse.vstack([bags, bags]), y, sample_weight=w)
    return model.coef_[0].astype(np.float32)


def fit_gate(emb: np.ndarray, sources: np.ndarray, n_sources: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax weights and biases (n_sources rows) of a multinomial logistic regression from the embedding to the
    source; with one source, a constant gate."""
    weight, bias = np.zeros((n_sources, emb.shape[1]), np.float32), np.full(n_sources, ABSENT, np.float32)
    present = np.unique(sources)
    if len(present) == 1:
        bias[present] = 0.0
        return weight, bias
    model = LogisticRegression(max_iter=3000).fit(emb, sources)
    coef, icpt = model.coef_, model.intercept_
    if len(present) == 2:  # sklearn keeps one row (class 1's logit): as a softmax, -z/2 and z/2
        coef, icpt = np.r_[-coef / 2, coef / 2], np.r_[-icpt / 2, icpt / 2]
    weight[present], bias[present] = coef, icpt
    return weight, bias


def fit_lexical(emb: np.ndarray, bags: sparse.csr_matrix, target: np.ndarray, weight: np.ndarray, sources: np.ndarray,
                n_sources: int, c: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The lexicon (vocabulary x sources: each expert's word weights) and the gate's weights and biases."""
    lexicon = np.zeros((bags.shape[1], n_sources), np.float32)
    for s in np.unique(sources):
        rows = np.flatnonzero(sources == s)
        if np.ptp(target[rows]) > 0:  # a constant target says nothing about words
            lexicon[:, s] = fit_expert(bags[rows], target[rows], weight[rows], c)
    return (lexicon, *fit_gate(emb, sources, n_sources))
