"""The routing policy over tiers (cheapest first): which tiers can take a request, which one it goes to, and why.

A provider can take a request unless, checked in this order: its tier is below the one the request's task type is
pinned to (`task_type`, config task_types.min_tier), the request's data class does not allow it
(`data_class`), the request does not fit its context window (`context`), its recent p95 latency exceeds what is
left of the request's latency budget (`latency`), or its circuit is open (`circuit_open`). A tier is eligible when
at least one of its providers can take the request.

Each tier's pass chance is its router output (`score`), or 1.0 for an unscored tier. Walk the eligible tiers
cheapest first and take the first whose pass chance >= the effective threshold; when none clears it, the eligible
tier with the highest pass chance (the cheapest among equals). With a budget, a tier that what is left of it cannot
pay for (budget.Pacer.affordable) gives way to the cheapest eligible tier.

The rule that decided is the last one that changed the answer: the tier the base threshold would pick among all
tiers; then the one the effective threshold picks (`budget` when they differ); then, when that tier cannot take
the request, the rule that excluded it; then `budget` when the budget cannot pay for the result. Else `score`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..scorer import choose_tier
from .providers import Provider

EXCLUSIONS = ("task_type", "data_class", "context", "latency", "circuit_open")  # checked in this order


@dataclass(frozen=True)
class Standing:
    """Whether one provider can take the request: `rule` is None, or the first rule that excludes it."""

    provider: Provider
    rule: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class TierOption:
    name: str
    pass_chance: float
    standings: list[Standing]

    @property
    def eligible(self) -> bool:
        return any(s.rule is None for s in self.standings)

    @property
    def rule(self) -> str:
        """Why an ineligible tier is: the rule that excluded its last providers."""
        return max((s.rule for s in self.standings if s.rule), key=EXCLUSIONS.index)

    def why(self) -> str:
        return "; ".join(f"{s.provider.name}: {s.detail}" for s in self.standings if s.rule)


@dataclass(frozen=True)
class Skip:
    tier: str
    rule: str
    detail: str

    def as_dict(self) -> dict:
        return {"tier": self.tier, "rule": self.rule, "detail": self.detail}


@dataclass(frozen=True)
class Choice:
    index: int
    rule: str
    reason: str
    skipped: list[Skip]


class NoEligibleTier(Exception):
    """No tier has a provider that can take the request."""

    def __init__(self, options: list[TierOption]):
        super().__init__("no tier can take this request")
        self.options = options


def standing(
    provider: Provider,
    need_tokens: int,
    allowed: frozenset[str] | None,
    data_class: str | None,
    remaining_s: float | None,
) -> Standing:
    """Check one provider against the rules, in the order of EXCLUSIONS."""
    cfg = provider.config
    if allowed is not None and provider.name not in allowed:
        return Standing(provider, "data_class", f"not allowed for data class {data_class!r}")
    if cfg.context_window < need_tokens:
        return Standing(provider, "context", f"context window {cfg.context_window} < ~{need_tokens} tokens")
    if remaining_s is not None and (p95 := provider.latency.p95()) is not None and p95 > remaining_s:
        return Standing(
            provider,
            "latency",
            f"p95 latency {p95 * 1000:.0f} ms > {remaining_s * 1000:.0f} ms left of the latency budget",
        )
    if provider.breaker.state == "open":
        return Standing(provider, "circuit_open", "circuit open")
    return Standing(provider)


def pick(options: list[TierOption], threshold: float, among: list[int]) -> int:
    """The tier policy (scorer.choose_tier) over the tiers `among` (cheapest first)."""
    return among[int(choose_tier(np.array([[options[i].pass_chance for i in among]]), threshold)[0])]


def choose(
    options: list[TierOption], threshold: float, effective: float, affordable: Callable[[int], bool] | None = None
) -> Choice:
    """The tier for a request; `affordable(i)` says whether what is left of the budget pays for tier i."""
    eligible = [i for i, o in enumerate(options) if o.eligible]
    if not eligible:
        raise NoEligibleTier(options)
    everything = list(range(len(options)))
    by_base, by_score = pick(options, threshold, everything), pick(options, effective, everything)
    index = pick(options, effective, eligible)
    chosen = options[index]
    cleared = chosen.pass_chance >= effective
    skipped = [_skip(o, effective) for i, o in enumerate(options) if i < index or (i != index and not cleared)]
    if cleared:
        reason = f"{chosen.name} is the cheapest eligible tier whose pass chance {chosen.pass_chance:.4f} >= threshold {effective:.4f}"
    else:
        reason = f"no eligible tier clears threshold {effective:.4f}; {chosen.name} has the highest pass chance {chosen.pass_chance:.4f}"
    if index != by_score:
        rule = options[by_score].rule
        reason = f"{options[by_score].name} cannot take it ({options[by_score].why()}); {reason}"
    elif by_score != by_base:
        rule = "budget"
        reason = f"budget pacing moved the threshold from {threshold:.4f} to {effective:.4f}; {reason}"
    else:
        rule = "score"
    if affordable is not None and index != eligible[0] and not affordable(index):
        cheapest = eligible[0]
        skipped = [_skip(o, effective) for o in options[:cheapest]]
        skipped.append(Skip(chosen.name, "budget", "its estimated cost exceeds what is left of the budget"))
        index, rule = cheapest, "budget"
        reason = f"what is left of the budget cannot pay for {chosen.name}; {options[cheapest].name} is the cheapest eligible tier"
    return Choice(index, rule, reason, skipped)


def _skip(option: TierOption, threshold: float) -> Skip:
    if not option.eligible:
        return Skip(option.name, option.rule, option.why())
    return Skip(option.name, "score", f"pass chance {option.pass_chance:.4f} < threshold {threshold:.4f}")


def fallback_order(index: int, n_tiers: int, other_tiers: bool) -> list[int]:
    """The chosen tier, then (if `other_tiers`) the pricier tiers going up, then the cheaper going down."""
    if not other_tiers:
        return [index]
    return [index, *range(index + 1, n_tiers), *range(index - 1, -1, -1)]
