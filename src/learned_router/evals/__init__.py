"""Evaluation maths for routers: routed-quality curves, APGR/CPT/cost metrics (ours and RouteLLM's conventions),
classifier metrics, baselines, plots. Pure functions on arrays: numpy, pandas, scikit-learn, matplotlib; no torch.
"""

from .baselines import (
    knn_scores,
    logistic_scores,
    oracle_envelope,
    oracle_scores,
    prompt_length_scores,
    random_scores,
    routellm_random_curve,
)
from .classifier import classifier_metrics, expected_calibration_error
from .frontier import Curve, apgr, auc, call_cost, cost_saving, cpt, cpt_routellm, sweep
from .plots import plot_frontier
from .report import REFERENCES, apgr_intervals, curve_metrics, evaluate, markdown_table

__all__ = [
    "Curve",
    "sweep",
    "auc",
    "apgr",
    "cpt",
    "cpt_routellm",
    "cost_saving",
    "call_cost",
    "classifier_metrics",
    "expected_calibration_error",
    "random_scores",
    "routellm_random_curve",
    "oracle_scores",
    "oracle_envelope",
    "prompt_length_scores",
    "knn_scores",
    "logistic_scores",
    "evaluate",
    "apgr_intervals",
    "curve_metrics",
    "markdown_table",
    "REFERENCES",
    "plot_frontier",
]
