"""What a router predicts for prompts, and the one formula that turns it into pass chances. numpy only.

Every predictor returns `Outputs` from `predict(prompts)`: the exported graph (`scorer.Router`), the torch model it
was exported from (`model.QualityModel`), and the eval runners that refit it. The service, calibration, the export
check and the evals all read pass chances from here, so the policy evaluated is the policy served.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .errors import RouterError

GENERIC = "generic"  # the model-agnostic output: 1 - the prompt's difficulty


def pass_chances(quality: np.ndarray, against: np.ndarray) -> np.ndarray:
    """A model's pass chance against a stronger one: 1 - max(0, their predicted quality gap). Quality is each model's
    predicted answer quality in [0, 1] (the router's `quality` output), so this is 1 when the model is predicted to
    answer as well, and falls by the quality the stronger model would add."""
    return 1.0 - np.clip(np.asarray(against) - np.asarray(quality), 0.0, 1.0)


def column_of(models: Sequence[str], name: str, where: str = "the router") -> int:
    """The column of a model name (or `generic`, last) among pass chances of `models`; RouterError naming the closest
    names if unknown."""
    names = [*models, GENERIC]
    if name not in names:
        near = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"closest: {', '.join(near)}; " if near else ""
        raise RouterError(
            f"{where}: the router was not trained on {name!r} ({hint}{len(models)} models in "
            f"router.json 'models'); use '{GENERIC}' for a model it does not know"
        )
    return names.index(name)


@dataclass(frozen=True)
class Outputs:
    """A router's predictions for n prompts: each model's answer quality (n, len(models)) and the prompt's difficulty
    (n,), both in [0, 1]; the sentence embedding (n, dim) where the predictor gives it. `strong` is the model every
    pass chance is measured against."""

    models: tuple[str, ...]
    strong: str
    quality: np.ndarray
    difficulty: np.ndarray
    embedding: np.ndarray | None = None

    @property
    def names(self) -> list[str]:
        """The columns of `pass_chances`: each model, then `generic`."""
        return [*self.models, GENERIC]

    def column(self, name: str, where: str = "the router") -> int:
        """The column of `pass_chances` for a model name (or `generic`)."""
        return column_of(self.models, name, where)

    def pass_chances(self) -> np.ndarray:
        """(n, len(models) + 1): each model's pass chance against `strong`, then `generic` (1 - difficulty)."""
        strong = self.quality[:, self.models.index(self.strong)]
        return np.c_[pass_chances(self.quality, strong[:, None]), 1.0 - self.difficulty].astype(np.float32)

    def pair(self, weak: str, strong: str | None = None, where: str = "the router") -> np.ndarray:
        """(n,): `weak`'s pass chance against `strong` (default: the router's strong model); `generic` as the weak
        model gives 1 - difficulty, whatever the strong model."""
        w, s = self.column(weak, where), self.column(strong or self.strong, where)
        if s == len(self.models):
            raise RouterError(f"'{GENERIC}' stands for the weak side only; name a strong model the router knows")
        if w == len(self.models):
            return 1.0 - self.difficulty
        return pass_chances(self.quality[:, w], self.quality[:, s])

    def rows(self, index) -> Outputs:
        """The outputs of the prompts at `index` (an integer array, slice or boolean mask)."""
        return Outputs(
            self.models,
            self.strong,
            self.quality[index],
            self.difficulty[index],
            None if self.embedding is None else self.embedding[index],
        )


class Predictor(Protocol):
    """Anything that predicts `Outputs` for prompts: the exported `Router`, the torch `QualityModel`."""

    def predict(self, prompts: Sequence[str]) -> Outputs: ...
