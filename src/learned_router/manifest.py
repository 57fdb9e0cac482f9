"""`router.json`: what a router folder holds and how it was made. Torch-free."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from .errors import RouterFolderError

MANIFEST = "router.json"
TOKENIZER = "tokenizer.json"
VARIANT_FILES = {"int8": "model.int8.onnx", "fp32": "model.onnx"}


class LabelPolicy(BaseModel):
    """Turns a (weak score, strong score) pair into "the weak answer passes".

    relative: weak >= strong - margin (the weak answer is about as good as the strong one's).
    absolute: weak >= min_score (the weak answer clears a fixed quality bar).
    tie_target (relative only): what the head trains toward where both answers got the same grade. The label says
    "passes" (1); 0.5 counts a tie half, so the head ranks prompts by the expected quality gap, as APGR scores them.
    """

    kind: Literal["relative", "absolute"] = "relative"
    margin: float = Field(0.0, ge=0.0, le=1.0)
    min_score: float = Field(0.5, ge=0.0, le=1.0)
    tie_target: float = Field(1.0, ge=0.0, le=1.0)

    def describe(self) -> str:
        if self.kind == "relative":
            ties = f" (ties train as {self.tie_target:g})" if self.tie_target != 1.0 else ""
            return f"weak >= strong - {self.margin:g}{ties}"
        return f"weak >= {self.min_score:g}"


class EncoderInfo(BaseModel):
    name: str
    max_seq_length: int
    dim: int
    pooling: Literal["mean"] = "mean"
    normalize: bool = True
    truncation: Literal["head"] = "head"  # keeps the first max_seq_length tokens
    layers: int | None = None  # transformer blocks used (None: all of them; routers from before the option)
    fingerprint: str  # sha256 of the encoder weights: a router only fits its own encoder


class CalibrationPoint(BaseModel):
    threshold: float
    strong_fraction: float


class FileEntry(BaseModel):
    path: str
    sha256: str
    bytes: int


class Manifest(BaseModel):
    """binary: one output, P(weak passes) for the `strong`/`weak` pair. tiers: one output per name in `models`,
    P(that model's answer passes)."""

    format_version: Literal[1] = 1
    name: str
    kind: Literal["binary", "tiers"] = "binary"
    strong: str = ""
    weak: str = ""
    models: list[str] = []
    label_policy: LabelPolicy | None = None  # binary routers: how the training labels were made
    encoder: EncoderInfo
    default_threshold: float = Field(ge=0.0, le=1.0)
    calibration: list[CalibrationPoint]
    files: dict[str, FileEntry]
    data: list[dict] = []
    metrics: dict[str, float] = {}
    parity: dict[str, float] = {}
    versions: dict[str, str] = {}
    created_at: str = ""

    @model_validator(mode="after")
    def _outputs(self) -> "Manifest":
        if self.kind == "binary" and not (self.strong and self.weak and self.label_policy):
            raise ValueError("a binary router names its strong and weak models and its label policy")
        if self.kind == "tiers" and (not self.models or len(set(self.models)) != len(self.models)):
            raise ValueError("a tiers router lists its models, each once")
        return self

    @property
    def outputs(self) -> list[str]:
        """The names of the graph's outputs, in column order."""
        return [self.weak] if self.kind == "binary" else list(self.models)

    def strong_fraction_at(self, threshold: float) -> float:
        """Expected share of strong calls at `threshold`, interpolated on the validation table."""
        import numpy as np

        pts = sorted(self.calibration, key=lambda p: p.threshold)
        return float(np.interp(threshold, [p.threshold for p in pts], [p.strong_fraction for p in pts]))

    def threshold_for(self, strong_fraction: float) -> float:
        """The threshold whose expected share of strong calls is `strong_fraction` (0..1)."""
        import numpy as np

        if not 0.0 <= strong_fraction <= 1.0:
            raise ValueError(f"strong_fraction must be in [0, 1], got {strong_fraction}")
        pts = sorted(self.calibration, key=lambda p: p.strong_fraction)
        return float(np.interp(strong_fraction, [p.strong_fraction for p in pts], [p.threshold for p in pts]))

    def write(self, folder: Path) -> None:
        (Path(folder) / MANIFEST).write_text(self.model_dump_json(indent=2) + "\n")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entry(folder: Path, name: str) -> FileEntry:
    p = Path(folder) / name
    return FileEntry(path=name, sha256=sha256_file(p), bytes=p.stat().st_size)


def read_manifest(folder: Path) -> Manifest:
    folder = Path(folder)
    if not folder.is_dir():
        raise RouterFolderError(f"router folder not found: {folder}")
    path = folder / MANIFEST
    if not path.is_file():
        raise RouterFolderError(f"{path}: missing; a router folder needs {MANIFEST}, {TOKENIZER} and an ONNX model")
    try:
        return Manifest.model_validate(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise RouterFolderError(f"{path}: not valid JSON ({e})") from None
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise RouterFolderError(f"{path}: field '{loc}': {first['msg']}") from None


def verify_file(folder: Path, entry: FileEntry) -> Path:
    p = Path(folder) / entry.path
    if not p.is_file():
        raise RouterFolderError(f"{p}: missing (listed in {MANIFEST})")
    if p.stat().st_size != entry.bytes or sha256_file(p) != entry.sha256:
        raise RouterFolderError(f"{p}: corrupted (size or sha256 differs from {MANIFEST}); re-export the router")
    return p
