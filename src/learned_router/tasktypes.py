"""Task types: what kind of work a prompt is (code, math, writing, ...), from the router's own sentence embedding.

A types file (YAML) names each type with a short description and example prompts. A prompt's type is the one whose
centroid (the normalised mean of its examples' unit embeddings) is most similar to the prompt's embedding (cosine).
Adding a type is writing its examples; nothing is retrained. The embeddings come from the router's graph, in the same
onnxruntime call that scores a prompt (scorer.Router.predict), so inferring a type costs one (types x dim)
matrix product.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import RouterError, first_bad, first_error
from .yamlfile import load_yaml

FILE = "task_types.yaml"  # in a router folder, or this package's default
UNKNOWN = "unknown"  # a request with no text to embed, or a router without embeddings
TYPE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class TaskTypeError(RouterError):
    """A types file or evaluation table that cannot be used."""


class TaskType(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    description: str = Field(min_length=1)
    examples: list[str] = Field(min_length=3)

    @field_validator("examples")
    @classmethod
    def _texts(cls, v: list[str]) -> list[str]:
        if any(not e.strip() for e in v):
            raise ValueError("examples must be non-empty texts")
        return v


class TypesFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    types: dict[str, TaskType] = Field(min_length=2)

    @field_validator("types")
    @classmethod
    def _names(cls, v: dict[str, TaskType]) -> dict[str, TaskType]:
        for name in v:
            if not TYPE_NAME.match(name) or name == UNKNOWN:
                raise ValueError(
                    f"type name {name!r}: lowercase letters, digits, '_' or '-' (at most 32), not '{UNKNOWN}'"
                )
        return v


def types_path(router_path: str | os.PathLike | None = None, override: str | os.PathLike | None = None) -> Path:
    """The types file in use: `override`, else the router folder's task_types.yaml, else this package's."""
    if override is not None:
        return Path(override)
    if router_path is not None and (p := Path(router_path) / FILE).is_file():
        return p
    return Path(str(resources.files("learned_router") / FILE))


def load_types(path: str | os.PathLike) -> dict[str, TaskType]:
    """The types of a YAML file; TaskTypeError naming the file and key when it cannot be used."""
    data = load_yaml(path, TaskTypeError, "task types file not found")
    try:
        return TypesFile.model_validate(data).types
    except ValidationError as e:
        loc, msg = first_error(e)
        raise TaskTypeError(f"{path}: {'.'.join(map(str, loc)) or 'file'}: {msg}") from None


@dataclass
class TaskClassifier:
    """Nearest centroid over the types' example embeddings."""

    names: list[str]
    centroids: np.ndarray  # (types, dim), unit rows

    @classmethod
    def build(cls, types: dict[str, TaskType], embed: Callable[[Sequence[str]], np.ndarray]) -> TaskClassifier:
        """Embed every example once (`embed`: texts -> unit embeddings, e.g. Router.embed)."""
        names = list(types)
        rows = [embed(types[n].examples).mean(axis=0) for n in names]
        centroids = np.asarray(rows, dtype=np.float32)
        return cls(names, centroids / np.linalg.norm(centroids, axis=1, keepdims=True))

    def classify(self, embeddings: np.ndarray) -> np.ndarray:
        """Each embedding's type index, (n,)."""
        return np.argmax(np.asarray(embeddings, dtype=np.float32) @ self.centroids.T, axis=1)

    def types_of(self, embeddings: np.ndarray) -> list[str]:
        return [self.names[i] for i in self.classify(embeddings)]


def read_table(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(prompts, labels) of a labelled CSV with columns `type` and `prompt` (others, such as `source`, are kept out)."""
    path = Path(path)
    if not path.is_file():
        raise TaskTypeError(f"{path}: table not found")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"type", "prompt"} - set(reader.fieldnames or [])
        if missing:
            raise TaskTypeError(f"{path}: needs the columns type and prompt (missing: {', '.join(sorted(missing))})")
        rows = list(reader)
    if not rows:
        raise TaskTypeError(f"{path}: no rows")
    first_bad(
        path,
        [not (r["prompt"] or "").strip() or not (r["type"] or "").strip() for r in rows],
        "empty type or prompt",
        error=TaskTypeError,
        unit="line",
        first=2,
    )
    return [r["prompt"] for r in rows], [r["type"] for r in rows]


def evaluate(predicted: Sequence[str], labels: Sequence[str], names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per type: precision, recall and support (its labelled rows); plus `macro` (the unweighted means). A type never
    predicted has precision 0."""
    pred, true = np.asarray(predicted), np.asarray(labels)
    out = {}
    for n in names:
        hit = float(np.sum((pred == n) & (true == n)))
        out[n] = {
            "precision": hit / max(float(np.sum(pred == n)), 1.0),
            "recall": hit / max(float(np.sum(true == n)), 1.0),
            "support": float(np.sum(true == n)),
        }
    out["macro"] = {k: float(np.mean([out[n][k] for n in names])) for k in ("precision", "recall")} | {
        "support": float(len(true))
    }
    return out


def check_labels(labels: Sequence[str], names: Sequence[str], path: str | os.PathLike) -> None:
    unknown = sorted(set(labels) - set(names))
    if unknown:
        raise TaskTypeError(
            f"{path}: labels {', '.join(map(repr, unknown))} are not types of the types file ({', '.join(names)})"
        )
