"""Whether two router folders are the same router, up to what retraining on another machine moves: the same models
and pair, thresholds and calibration within 0.002, test AUCs within 0.001, and outputs on the probe prompts within
0.01. File digests, creation times and library versions are left out."""

from __future__ import annotations

import numpy as np

from .scorer import Router

THRESHOLD_TOL, AUC_TOL, OUTPUT_TOL = 0.002, 1e-3, 0.01


def differences(a: Router, b: Router, prompts: list[str]) -> list[str]:
    """What differs beyond tolerance, one line each; empty when they are the same router."""
    ma, mb = a.manifest, b.manifest
    out = []
    if ma.models != mb.models:
        only_a, only_b = sorted(set(ma.models) - set(mb.models)), sorted(set(mb.models) - set(ma.models))
        out.append(
            f"models: {len(ma.models)} against {len(mb.models)}"
            + (f"; only in the first: {', '.join(only_a[:5])}" if only_a else "")
            + (f"; only in the second: {', '.join(only_b[:5])}" if only_b else "")
            + ("; same names in another order" if not only_a and not only_b else "")
        )
    for role in ("strong", "weak"):
        if getattr(ma, role) != getattr(mb, role):
            out.append(f"{role}: {getattr(ma, role)} against {getattr(mb, role)}")
    if abs(ma.default_threshold - mb.default_threshold) > THRESHOLD_TOL:
        out.append(f"default threshold: {ma.default_threshold} against {mb.default_threshold}")
    for name in sorted(set(ma.calibration.thresholds) & set(mb.calibration.thresholds)):
        gap = float(np.max(np.abs(np.subtract(ma.calibration.thresholds[name], mb.calibration.thresholds[name]))))
        if gap > THRESHOLD_TOL:
            out.append(f"calibration of {name}: thresholds differ by up to {gap:.4f}")
    for key in sorted(k for k in set(ma.metrics) | set(mb.metrics) if k.startswith("test_auc_")):
        x, y = ma.metrics.get(key), mb.metrics.get(key)
        if x is None or y is None or abs(x - y) > AUC_TOL:
            out.append(f"{key}: {x} against {y}")
    if ma.models == mb.models:
        oa, ob = a.predict(prompts), b.predict(prompts)
        gap = float(max(np.max(np.abs(oa.quality - ob.quality)), np.max(np.abs(oa.difficulty - ob.difficulty))))
        if gap > OUTPUT_TOL:
            out.append(f"outputs on {len(prompts)} probe prompts differ by up to {gap:.4f}")
    return out
