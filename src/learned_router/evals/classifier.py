"""How well p_weak predicts the binary label (1 = the weak model's answer passes)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import brier_score_loss, roc_auc_score

from .checks import as_binary, as_unit


def expected_calibration_error(p_weak, labels, n_bins: int = 10) -> float:
    """ECE with equal-width bins on [0, 1]: sum over bins of (share of prompts) * |mean p - mean label|.

    Bins are [0, 0.1), [0.1, 0.2), ..., [0.9, 1.0]; empty bins count zero.
    """
    p = as_unit(p_weak, "p_weak")
    y = as_binary(labels, "labels", p.size)
    bins = np.digitize(p, np.linspace(0.0, 1.0, n_bins + 1)[1:-1])
    gap = np.bincount(bins, weights=p - y, minlength=n_bins)
    return float(np.abs(gap).sum() / p.size)


def classifier_metrics(p_weak, labels, n_bins: int = 10) -> dict[str, float]:
    """ROC-AUC (NaN when only one class is present), ECE (`n_bins` equal-width bins) and Brier score."""
    p = as_unit(p_weak, "p_weak")
    y = as_binary(labels, "labels", p.size)
    return {
        "roc_auc": float(roc_auc_score(y, p)) if np.unique(y).size == 2 else float("nan"),
        "ece": expected_calibration_error(p, y, n_bins),
        "brier": float(brier_score_loss(y, p)),
    }
