"""The service's task types: each request's type (inferred from the router's embedding, or named by the request) and
the rules a type carries (a threshold offset, a cheapest tier).

Inference rides on the scoring call: `score` returns the router's pass chances with one more column, the index of the
prompt's inferred type, so the batcher and its thread are unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from ..errors import RouterError
from ..tasktypes import UNKNOWN, TaskClassifier, load_types, types_path
from .config import ServiceConfig
from .errors import APIError, ConfigError

log = logging.getLogger("learned_router.serving")


class TaskTyping:
    """The configured types, their classifier (None: the router has no embedding output) and their rules."""

    def __init__(self, config: ServiceConfig, router):
        cfg = config.task_types
        path = types_path(getattr(router, "path", config.router.path), cfg.file)
        try:
            types = load_types(path)
        except RouterError as e:
            raise ConfigError(f"task_types.file: {e}") from None
        self.names = list(types)
        for key in ("threshold_offsets", "min_tier"):
            for name in getattr(cfg, key):
                if name not in types:
                    raise ConfigError(
                        f"task_types.{key}.{name}: unknown task type; types in {path}: {', '.join(self.names)}"
                    )
        self.offsets = cfg.threshold_offsets
        self.min_tier = {name: [t.name for t in config.tiers].index(tier) for name, tier in cfg.min_tier.items()}
        self._router = router
        self.classifier = None
        if getattr(router, "has_embedding", False):
            self.classifier = TaskClassifier.build(types, router.embed)
        else:
            log.warning(
                "task types: the router at %s has no embedding output, so types are not inferred (requests "
                "without x-router-task-type are '%s'); re-export it with learned-router export to infer them",
                config.router.path,
                UNKNOWN,
            )

    @property
    def labels(self) -> list[str]:
        """Every value a request's type can take (metric labels)."""
        return [*self.names, UNKNOWN]

    def score(self, prompts: Sequence[str]) -> np.ndarray:
        """The router's pass chances (n, K) and, as column K, each prompt's inferred type index."""
        outputs = self._router.predict(prompts)
        if self.classifier is None:
            return outputs.pass_chances()
        return np.c_[outputs.pass_chances(), self.classifier.classify(outputs.embedding)]

    def split(self, row: np.ndarray | None) -> tuple[np.ndarray | None, str]:
        """A scored row as (pass chances, inferred type)."""
        if row is None:
            return None, UNKNOWN
        if self.classifier is None:
            return row, UNKNOWN
        return row[:-1], self.names[int(row[-1])]

    def check(self, name: str) -> str:
        """A type a request names; 400 naming it when it is not configured."""
        if name not in self.names:
            raise APIError(
                400,
                f"unknown task type {name!r}; configured types: {', '.join(self.names)}",
                param="router.task_type",
                code="unknown_task_type",
            )
        return name
