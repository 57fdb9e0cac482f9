"""Evaluators a trainer is handed (`train(..., evaluators=...)`, `train --eval FILE`): each scores any predictor
(`outputs.Predictor`: the torch model while training, the router folder after a top level is fitted) on graded
prompts it did not train on, and returns named figures that go to MLflow and router.json `metrics`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import grade_table, group_of, load_grades
from .errors import DataError
from .outputs import Predictor
from .parity import apgr_of

MIN_PROMPTS = 30  # fewer graded prompts than this give no routing figure worth logging
RESAMPLES = 1000


@dataclass(frozen=True)
class RoutingEvaluator:
    """APGR of routing one pair by the predictor's pass chance (the weak model's against the strong one), on prompts
    with both models' grades in [0, 1], with its 95% bootstrap interval over the prompts."""

    name: str
    prompts: list[str]
    weak_grades: np.ndarray
    strong_grades: np.ndarray
    weak: str
    strong: str

    @classmethod
    def from_file(cls, path: str | Path, weak: str, strong: str) -> "RoutingEvaluator":
        """A graded table's prompts where both models are graded (absolute, or against one baseline); named
        `eval_<file stem>`."""
        table = grade_table(load_grades([path], val=0.0, test=0.0).obs)
        missing = [m for m in (weak, strong) if m not in table.columns]
        if missing:
            raise DataError(
                f"--eval {path}: {', '.join(missing)} not graded there (graded: {', '.join(table.columns[:12])})"
            )
        both = table[[weak, strong]].dropna()
        name = "eval_" + "".join(c if c.isalnum() else "_" for c in Path(path).stem)
        return cls(
            name, list(both.index), both[weak].to_numpy(float), both[strong].to_numpy(float), weak, strong
        ).checked()

    def problem(self) -> str | None:
        """Why it can give no routing figure (fewer than `MIN_PROMPTS` prompts, or the pair's mean grades equal); None
        when it can."""
        if len(self.prompts) < MIN_PROMPTS:
            return (
                f"{len(self.prompts)} prompts graded for both {self.weak} and {self.strong} "
                f"(training's own left out); at least {MIN_PROMPTS} are needed"
            )
        if self.weak_grades.mean() == self.strong_grades.mean():
            return f"{self.weak} and {self.strong} have equal mean grades: routing gains nothing"
        return None

    def checked(self) -> "RoutingEvaluator":
        """Itself; DataError naming its `problem`, if any."""
        if (why := self.problem()) is not None:
            raise DataError(f"{self.name}: {why}")
        return self

    def rows(self, index: np.ndarray) -> "RoutingEvaluator":
        """The evaluator on the prompts at `index` (integer positions or a boolean mask)."""
        return RoutingEvaluator(
            self.name,
            list(np.asarray(self.prompts, dtype=object)[index]),
            self.weak_grades[index],
            self.strong_grades[index],
            self.weak,
            self.strong,
        )

    def without(self, groups: set[str]) -> "RoutingEvaluator":
        """The evaluator without the prompts whose normalised text (`data.group_of`) is in `groups`: a trainer hands
        it the prompts it trained on."""
        return self.rows(np.array([group_of(p) not in groups for p in self.prompts], dtype=bool)).checked()

    def __call__(self, predictor: Predictor) -> dict[str, float]:
        p = predictor.predict(self.prompts).pair(self.weak, self.strong)
        w, s = self.weak_grades, self.strong_grades
        rng = np.random.default_rng(0)
        boot = [apgr_of(p[i], w[i], s[i]) for i in (rng.integers(0, len(p), len(p)) for _ in range(RESAMPLES))]
        low, high = np.nanpercentile(boot, [2.5, 97.5])
        return {
            f"{self.name}_apgr": apgr_of(p, w, s),
            f"{self.name}_apgr_low": float(low),
            f"{self.name}_apgr_high": float(high),
            f"{self.name}_prompts": float(len(p)),
        }
