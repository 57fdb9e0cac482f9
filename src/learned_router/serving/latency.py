"""Each provider's recent latency: a sliding window of its last calls, summarised as the p95.

A call counts when it answered (a stream: its first event) or timed out on the provider's own timeout (a lower
bound of its latency). Fast failures say nothing about latency and are left out, and so are calls cut short by a
client's latency budget. Calls older than `max_age_s` are forgotten, so a provider that was slow once and then
skipped by tight budgets gets trusted again: with fewer than `min_samples` recent calls its p95 is unknown.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable


class LatencyWindow:
    def __init__(self, window: int, max_age_s: float, min_samples: int, clock: Callable[[], float] = time.monotonic):
        self.max_age_s = max_age_s
        self.min_samples = min_samples
        self._clock = clock
        self._calls: deque[tuple[float, float]] = deque(maxlen=window)  # (when, seconds)

    def add(self, seconds: float) -> None:
        self._calls.append((self._clock(), seconds))

    def p95(self) -> float | None:
        """The 95th percentile (nearest rank) of the recent calls' seconds; None when there are too few."""
        cutoff = self._clock() - self.max_age_s
        while self._calls and self._calls[0][0] < cutoff:
            self._calls.popleft()
        if len(self._calls) < self.min_samples:
            return None
        ordered = sorted(s for _, s in self._calls)
        return ordered[math.ceil(0.95 * len(ordered)) - 1]
