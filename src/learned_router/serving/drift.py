"""Drift: how far the recent traffic has moved from a reference, per signal, as a population-stability index.

Three signals over the last `window` routed requests: the pass chance of the cheapest scored tier (binned at the
reference's deciles), the task type and the chosen tier. PSI = sum over bins of (a - e) * ln(a / e), a and e the
window's and the reference's shares (each floored at 1e-4); under 0.1 is usually read as stable, above 0.25 as a
shift.

The reference is, in order: the JSON file `drift.reference` (written by POST /v1/drift/reference, the operator's
snapshot of a window they trust); else the router's calibration mix for the pass chance (its deciles) and, for the
task type and tier, the first full window after start. When another router comes into service (reload,
rollback), the pass chance and the tier start again against that router (`DriftMonitor.router_changed`).
"""

from __future__ import annotations

import bisect
import datetime as dt
import json
import logging
import math
import os
from collections import Counter, deque
from pathlib import Path

import numpy as np

from .config import DriftConfig
from .errors import APIError, ConfigError

log = logging.getLogger("learned_router.serving")
SIGNALS = ("pass_chance", "task_type", "tier")
FLOOR = 1e-4
DECILES = [i / 10 for i in range(1, 10)]
RECOVERED = 0.8  # a drifted signal is logged as back once its PSI is under this share of the threshold (no flapping)


def psi(reference: dict[str, float], counts: dict[str, int]) -> float:
    """Population-stability index of `counts` against the `reference` shares, over the union of their buckets."""
    total = sum(counts.values())
    if total == 0:
        return math.nan
    out = 0.0
    for key in set(reference) | set(counts):
        e, a = max(reference.get(key, 0.0), FLOOR), max(counts.get(key, 0) / total, FLOOR)
        out += (a - e) * math.log(a / e)
    return out


def bucket(edges: list[float], p: float) -> str:
    """The decile bucket of a pass chance: the number of reference edges at or below it."""
    return str(bisect.bisect_right(edges, p))


def pass_chance_reference(values: np.ndarray) -> dict:
    """Decile edges of `values` and the share of them in each bucket (ties can make a bucket empty)."""
    edges = [float(x) for x in np.unique(np.quantile(values, DECILES))]
    counts = Counter(bucket(edges, float(v)) for v in values)
    return {"edges": edges, "shares": {k: n / len(values) for k, n in counts.items()}}


def calibration_reference(manifest, output: str) -> dict | None:
    """The pass chance's reference from the router's calibration mix (its deciles of `output`), if it has one."""
    try:
        edges = [float(x) for x in np.unique([manifest.calibration.threshold_for(q, output) for q in DECILES])]
        cdf = [0.0, *(manifest.calibration.strong_fraction_at(e, output) for e in edges), 1.0]
    except (ValueError, KeyError, AttributeError):
        return None
    return {"edges": edges, "shares": {str(i): max(cdf[i + 1] - cdf[i], 0.0) for i in range(len(edges) + 1)}}


class DriftMonitor:
    """The window, the reference and the PSI per signal; logs when a signal crosses `threshold` (and when it is back
    under RECOVERED x threshold).
    Counts are kept as requests come and go, so a request costs a few dictionary updates and a PSI over ~20 buckets."""

    def __init__(self, cfg: DriftConfig, calibration: dict | None = None):
        self.cfg = cfg
        self.window: deque[tuple[float | None, str, str]] = deque()
        self._counts = {s: Counter() for s in SIGNALS}
        self.reference: dict = {}
        self.source = "none"
        self.drifted = dict.fromkeys(SIGNALS, False)
        if calibration is not None:
            self.reference = {"pass_chance": calibration}
            self.source = "the router's calibration mix (pass chance); the first full window (task type, tier)"
        if cfg.reference and Path(cfg.reference).is_file():
            self.reference, self.source = read_reference(cfg.reference), cfg.reference
        if cfg.reference and not os.access(Path(cfg.reference).parent, os.W_OK):  # found now, not at the first snapshot
            raise ConfigError(f"drift.reference {cfg.reference}: its folder is missing or not writable")

    def observe(self, pass_chance: float | None, task_type: str, tier: str) -> None:
        row = (pass_chance, task_type, tier)
        self.window.append(row)
        self._count(row, 1)
        if len(self.window) > self.cfg.window:
            self._count(self.window.popleft(), -1)
        if len(self.window) == self.cfg.window and not {"task_type", "tier"} <= set(self.reference):
            taken = self.distributions()
            missing = [k for k in SIGNALS if not self.reference.get(k)]
            self._use(self.reference | {k: taken[k] for k in missing}, self.source)
            log.info("drift: reference for %s taken from the first %d requests", ", ".join(missing), len(self.window))
        for signal, value in self.psi().items():
            if not self.drifted[signal] and value > self.cfg.threshold:  # NaN: never
                self.drifted[signal] = True
                log.warning(
                    "drift: %s PSI %.3f > %g over the last %d requests (reference: %s)",
                    signal,
                    value,
                    self.cfg.threshold,
                    len(self.window),
                    self.source,
                )
            elif self.drifted[signal] and not value > self.cfg.threshold * RECOVERED:
                self.drifted[signal] = False
                log.info("drift: %s PSI %.3f back under %g", signal, value, self.cfg.threshold * RECOVERED)

    def router_changed(self, calibration: dict | None, version: str) -> None:
        """A reloaded (or rolled back) router serves from now on. Its pass chances and tiers are not the old one's, so
        those two signals start again: the pass chance against the new router's calibration mix (else its first full
        window), the tier against its first full window. The window's requests of the old router go; the task types'
        reference stays (they describe the traffic, not the router)."""
        self.window.clear()
        self._counts = {s: Counter() for s in SIGNALS}
        self.drifted = dict.fromkeys(SIGNALS, False)
        self.reference = {k: v for k, v in self.reference.items() if k == "task_type"}
        if calibration is not None:
            self.reference["pass_chance"] = calibration
        self.source = (
            f"since {version} serves: its calibration mix (pass chance)"
            if calibration is not None
            else f"since {version} serves: its first full window"
        ) + ("; task types as before" if "task_type" in self.reference else "")
        log.info("drift: %s serves; the pass chance and tier references start again (%s)", version, self.source)

    def _count(self, row: tuple[float | None, str, str], n: int) -> None:
        p, task_type, tier = row
        ref = self.reference.get("pass_chance")
        if p is not None and ref:
            self._counts["pass_chance"][bucket(ref["edges"], p)] += n
        self._counts["task_type"][task_type] += n
        self._counts["tier"][tier] += n

    def _use(self, reference: dict, source: str) -> None:
        """Compare with `reference` from now on (the window's pass chances re-binned at its edges)."""
        self.reference, self.source = reference, source
        ref = reference.get("pass_chance")
        self._counts["pass_chance"] = (
            Counter(bucket(ref["edges"], p) for p, _, _ in self.window if p is not None) if ref else Counter()
        )

    def distributions(self) -> dict:
        """The window's shares per signal, in the reference's form (pass chance binned at the window's deciles)."""
        n = max(len(self.window), 1)
        pcs = np.array([p for p, _, _ in self.window if p is not None])
        out = {k: {v: c / n for v, c in self._counts[k].items() if c} for k in ("task_type", "tier")}
        out["pass_chance"] = pass_chance_reference(pcs) if len(pcs) else None
        return out

    def psi(self) -> dict[str, float]:
        """PSI per signal; NaN with fewer than min_requests in the window or no reference for it yet."""
        out = dict.fromkeys(SIGNALS, math.nan)
        if len(self.window) < self.cfg.min_requests:
            return out
        for signal in SIGNALS:
            ref = self.reference.get(signal)
            if ref:
                out[signal] = psi(ref["shares"] if signal == "pass_chance" else ref, self._counts[signal])
        return out

    def snapshot(self) -> dict:
        """Make the current window the reference (written to `drift.reference` when set); 409 when it is too small."""
        if len(self.window) < self.cfg.min_requests:
            raise APIError(
                409,
                f"the drift window holds {len(self.window)} requests; a reference needs at least "
                f"{self.cfg.min_requests} (drift.min_requests)",
                code="drift_window_too_small",
            )
        reference = {k: v for k, v in self.distributions().items() if v} | {
            "requests": len(self.window),
            "taken_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if self.cfg.reference:
            try:
                write_reference(self.cfg.reference, reference)
            except OSError as e:
                raise APIError(
                    503,
                    f"drift.reference {self.cfg.reference}: cannot be written ({e.strerror}); the reference "
                    "is unchanged",
                    type="server_error",
                    code="drift_reference_unwritable",
                ) from None
        self._use(reference, self.cfg.reference or f"snapshot of {len(self.window)} requests")
        log.info(
            "drift: new reference from the last %d requests%s",
            len(self.window),
            f", written to {self.cfg.reference}" if self.cfg.reference else "",
        )
        return reference

    def state(self) -> dict:
        """What GET /v1/drift shows: each PSI, and the window's shares next to the reference's (pass chances in the
        reference's buckets)."""
        n = max(len(self.window), 1)
        window = {s: {k: c / n for k, c in self._counts[s].items() if c} for s in SIGNALS}
        return {
            "requests": len(self.window),
            "threshold": self.cfg.threshold,
            "psi": {k: None if math.isnan(v) else v for k, v in self.psi().items()},
            "reference_source": self.source,
            "window": window,
            "reference": {k: v for k, v in self.reference.items() if k in SIGNALS},
        }


def read_reference(path: str | os.PathLike) -> dict:
    try:
        ref = json.loads(Path(path).read_text(encoding="utf-8"))
        pc = ref.get("pass_chance")
        if pc is not None:
            assert isinstance(pc["edges"], list) and isinstance(pc["shares"], dict)
        assert all(isinstance(ref.get(k, {}), dict) for k in ("task_type", "tier"))
    except (OSError, ValueError, AssertionError, KeyError, TypeError, AttributeError):
        raise ConfigError(
            f"drift.reference: {path} is not a drift reference (take one with POST /v1/drift/reference)"
        ) from None
    return {k: v for k, v in ref.items() if k in SIGNALS and v}


def write_reference(path: str | os.PathLike, reference: dict) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(reference, indent=1), encoding="utf-8")
    tmp.replace(path)
