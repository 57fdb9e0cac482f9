"""Lexical experts: per training source, a logistic regression on the prompt's word-piece bag (`embed.piece_bags`)
and the head's input (embedding, and the standardised log length if the head takes it), mixed by a gate that tells
the source from the embedding. Their mix is added to a head's logit, or is the whole head (`HeadConfig.hidden` 0):
what makes the weak model fail differs by source (a number in a word problem, a subject's terms in MMLU), and one
model fitted on all sources at once learns mostly the largest one."""

from __future__ import annotations

import numpy as np
from scipy import sparse
from sklearn.linear_model import LogisticRegression

ABSENT = -30.0  # the gate's bias for a source without training rows: never picked


def fit_expert(feats: sparse.csr_matrix, target: np.ndarray, weight: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    """One source's weights and intercept: L2-regularised logistic regression (inverse strength `c`) on soft targets
    in [0, 1], each row entered once as a pass (weight t) and once as a fail (weight 1 - t). A constant target gives
    zero weights and that target's logit."""
    if np.ptp(target) == 0:
        t = float(np.clip(target[0], 1e-4, 1 - 1e-4))
        return np.zeros(feats.shape[1], np.float32), float(np.log(t / (1 - t)))
    y = np.r_[np.ones(len(target)), np.zeros(len(target))]
    w = np.r_[target, 1 - target] * np.r_[weight, weight] / weight.mean()
    model = LogisticRegression(C=c, max_iter=5000).fit(sparse.vstack([feats, feats]).tocsr(), y, sample_weight=w)
    return model.coef_[0].astype(np.float32), float(model.intercept_[0])


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


def source_centred(target: np.ndarray, weight: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Targets shifted per source to the pooled mean (clipped to [0, 1]): the sources' pass rates differ by their
    grading schemes (MMLU's correctness, where ties are most prompts, against AlpacaEval's judge), not by what a prompt
    of their kind asks of the weak model, so a prompt's source must not set its pass chance."""
    out = target.astype(float).copy()
    pooled = np.average(target, weights=weight)
    for s in np.unique(sources):
        rows = sources == s
        out[rows] += pooled - np.average(target[rows], weights=weight[rows])
    return np.clip(out, 0.0, 1.0)


def fit_lexical(inputs: np.ndarray, emb_dim: int, bags: sparse.csr_matrix, target: np.ndarray, weight: np.ndarray,
                sources: np.ndarray, n_sources: int, c: float) -> dict[str, np.ndarray]:
    """The experts (word weights: vocabulary x sources; input weights: input width x sources; biases) and the gate's
    weights and biases, as `Head.attach_lexical` takes them. `inputs`: the head's standardised input rows."""
    lexicon = np.zeros((bags.shape[1], n_sources), np.float32)
    input_weight = np.zeros((inputs.shape[1], n_sources), np.float32)
    bias = np.zeros(n_sources, np.float32)
    feats = sparse.hstack([bags, sparse.csr_matrix(inputs)]).tocsr()
    present = np.unique(sources)
    for s in present:
        rows = np.flatnonzero(sources == s)
        coef, bias[s] = fit_expert(feats[rows], target[rows], weight[rows], c)
        lexicon[:, s], input_weight[:, s] = coef[: bags.shape[1]], coef[bags.shape[1] :]
    # one bias for all: each source's own is mostly its grading scheme's pass rate (see source_centred)
    bias[:] = np.average(bias[present], weights=[weight[sources == s].sum() for s in present])
    gate_weight, gate_bias = fit_gate(inputs[:, :emb_dim], sources, n_sources)
    return {"lexicon": lexicon, "input_weight": input_weight, "bias": bias, "gate_weight": gate_weight, "gate_bias": gate_bias}
