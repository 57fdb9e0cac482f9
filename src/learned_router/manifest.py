"""A router folder's layout and records: `router.json` (what it serves) and `checkpoint/training.json` (how it was
made). Torch-free."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError, model_validator

from .errors import RouterFolderError, first_error, shown
from .outputs import GENERIC

VARIANT_FILES = {"int8": "model.int8.onnx", "fp32": "model.onnx"}
ROLES = ("tokenizer", "residual")  # the other files a router folder lists
CALIBRATION_SHARES = [round(i / 20, 2) for i in range(21)]  # strong-call shares of the calibration table


class EncoderInfo(BaseModel):
    name: str
    max_seq_length: int
    dim: int
    pooling: Literal["mean"] = "mean"
    normalize: bool = True
    truncation: Literal["head"] = "head"  # keeps the first max_seq_length tokens
    layers: int  # transformer blocks used
    fingerprint: str  # sha256 of the encoder weights: a router only fits its own encoder


class FileEntry(BaseModel):
    path: str
    sha256: str
    bytes: int


class Calibration(BaseModel):
    """Per output, the pass chances at each share of strong calls (`CALIBRATION_SHARES`) on the calibration mix: the
    threshold below which that share of its prompts falls."""

    mix: str  # which prompts, e.g. "held-out prompts of the chat sources"
    prompts: int
    thresholds: dict[str, list[float]]

    def threshold_for(self, strong_fraction: float, output: str) -> float:
        if not 0.0 <= strong_fraction <= 1.0:
            raise ValueError(f"strong_fraction must be in [0, 1], got {strong_fraction}")
        if output not in self.thresholds:
            raise ValueError(f"no calibration for output {output!r}")
        return float(np.interp(strong_fraction, CALIBRATION_SHARES, self.thresholds[output]))

    def strong_fraction_at(self, threshold: float, output: str) -> float:
        t = np.maximum.accumulate(np.asarray(self.thresholds[output]))
        return float(np.interp(threshold, t, CALIBRATION_SHARES))

    @classmethod
    def of(cls, pass_chances: np.ndarray, outputs: list[str], mix: str) -> "Calibration":
        """The table of pass chances (prompts x outputs): a share f of the prompts lies below each output's
        f-quantile, so that threshold sends them to the stronger side. Each quantile is the midpoint of the two pass
        chances around it: where the prompts fall in two groups, the threshold between them lies mid-gap."""
        cuts = np.quantile(pass_chances, CALIBRATION_SHARES, axis=0, method="midpoint")
        return cls(
            mix=mix,
            prompts=len(pass_chances),
            thresholds={n: [round(float(c), 5) for c in cuts[:, j]] for j, n in enumerate(outputs)},
        )


class ExportCheck(BaseModel):
    """How the exported graphs were checked against the torch model (`parity.judge`): on which CPU, which variants
    passed, and the torch model's outputs on the built-in probe prompts, which `Router` compares with on load."""

    cpu: str
    onnxruntime: str
    models: list[str]  # the (weak, strong) pair whose outputs are kept
    passed: dict[str, bool]  # variant -> it passed the gate on `cpu` (a failed one is not in the folder)
    reasons: dict[str, str] = {}  # variant -> why it failed
    probes: list[str]
    quality: list[list[float]]  # the torch model's, probes x (weak, strong)
    difficulty: list[float]


class ResidualInfo(BaseModel):
    """A two-level router's top level (residual.py): fitted on the user's grades over a prior router's graph."""

    prior: str  # name@digest of the prior's router.json
    prior_path: str
    graph_models: list[str]  # the graph's quality columns (the prior's models); `models` adds the user's own after them
    models: list[str]  # the models the top level corrects (or adds)
    base: list[str]  # per model: the prior's output it starts from (its own quality, or generic)
    prompts: int  # labelled prompts it was fitted on
    use_base: bool  # what cross-validation chose: the prior's output as a term (False: the prior misled on the data)
    ridge: float | None  # the embedding's ridge strength (None: left out)
    width: float | None
    shrink: float
    objective: str
    tried: dict[str, float]  # each option's cross-validated figure


class Manifest(BaseModel):
    """What a router serves. Its graph outputs `quality` (prompts x `models`, each model's predicted answer quality
    in [0, 1]), `difficulty` (per prompt, in [0, 1]) and, since task types, `embedding` (the prompt's unit sentence
    embedding); `scorer.Router` turns the first two into pass chances: a model's against the `strong` model, and
    `generic` (1 - difficulty) for models it was not trained on."""

    format_version: Literal[2] = 2
    name: str
    models: list[str] = Field(min_length=1)
    strong: str  # the reference strong model: pass chances are against it
    weak: str  # the default weak model of `route`
    encoder: EncoderInfo
    default_threshold: float = Field(ge=0.0, le=1.0)  # for the (strong, weak) pair
    calibration: Calibration
    files: dict[str, FileEntry]
    data: list[dict] = []
    metrics: dict[str, float] = {}
    parity: dict[str, float] = {}
    check: ExportCheck | None = None
    residual: ResidualInfo | None = None
    versions: dict[str, str] = {}
    created_at: str = ""

    @model_validator(mode="after")
    def _models(self) -> "Manifest":
        if len(set(self.models)) != len(self.models) or GENERIC in self.models:
            raise ValueError(f"models must be distinct names other than {GENERIC!r}")
        for role in ("strong", "weak"):
            if getattr(self, role) not in self.models:
                raise ValueError(f"the {role} model {getattr(self, role)!r} is not among the router's models")
        return self

    @property
    def outputs(self) -> list[str]:
        """The pass-chance columns of `Router.score`, in order."""
        return [*self.models, GENERIC]

    def threshold_for(self, strong_fraction: float, output: str | None = None) -> float:
        """The threshold on `output`'s pass chance (default: the weak model's) that sends about `strong_fraction` of
        the calibration mix to the stronger side."""
        return self.calibration.threshold_for(strong_fraction, output or self.weak)

    def strong_fraction_at(self, threshold: float, output: str | None = None) -> float:
        return self.calibration.strong_fraction_at(threshold, output or self.weak)


class TrainingRecord(BaseModel):
    """checkpoint/training.json: the recipe, the data and what training measured; export and eval read it."""

    name: str
    recipe: dict
    data: list[dict]
    encoder_path: str | None  # None: the packaged all-MiniLM-L6-v2
    encoder: EncoderInfo
    strong: str
    weak: str
    default_threshold: float
    calibration: Calibration
    metrics: dict[str, float]


class RouterFolder:
    """The files of a router folder, by role."""

    MANIFEST, TOKENIZER, CHECKPOINT, RECORD = "router.json", "tokenizer.json", "checkpoint", "training.json"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def manifest_path(self) -> Path:
        return self.path / self.MANIFEST

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.TOKENIZER

    @property
    def checkpoint(self) -> Path:
        return self.path / self.CHECKPOINT

    @property
    def record_path(self) -> Path:
        return self.checkpoint / self.RECORD

    def model_path(self, variant: str) -> Path:
        return self.path / VARIANT_FILES[variant]

    def manifest(self) -> Manifest:
        try:
            is_dir, exists = self.path.is_dir(), self.path.exists()
        except (OSError, ValueError) as e:  # a name too long for the file system, say
            raise RouterFolderError(
                f"{shown(self.path)}: cannot be a router folder ({getattr(e, 'strerror', None) or e})"
            ) from None
        if exists and not is_dir:
            raise RouterFolderError(f"{self.path}: a file, not a router folder (a folder with {self.MANIFEST})")
        if not is_dir:
            raise RouterFolderError(f"router folder not found: {self.path}")
        return read_model(
            self.manifest_path, Manifest, f"a router folder needs {self.MANIFEST}, {self.TOKENIZER} and an ONNX model"
        )

    def record(self) -> TrainingRecord:
        return read_model(self.record_path, TrainingRecord, "it is written by 'learned-router train'")

    def write_manifest(self, manifest: Manifest) -> None:
        """Replace router.json whole (a new file renamed over it): a service reloading meanwhile reads the old or the new."""
        tmp = self.manifest_path.with_name(self.MANIFEST + ".tmp")
        tmp.write_text(manifest.model_dump_json(indent=2) + "\n")
        os.replace(tmp, self.manifest_path)

    def write_record(self, record: TrainingRecord) -> None:
        self.record_path.write_text(record.model_dump_json(indent=2) + "\n")

    def entry(self, name: str) -> FileEntry:
        p = self.path / name
        return FileEntry(path=name, sha256=sha256_file(p), bytes=p.stat().st_size)

    def verify(self, entry: FileEntry) -> Path:
        p = self.path / entry.path
        if not p.is_file():
            raise RouterFolderError(f"{p}: missing (listed in {self.MANIFEST})")
        if p.stat().st_size != entry.bytes or sha256_file(p) != entry.sha256:
            raise RouterFolderError(
                f"{p}: corrupted (size or sha256 differs from {self.MANIFEST}); re-export the router"
            )
        return p


def read_model(path: Path, model: type[BaseModel], hint: str):
    """A pydantic record from a JSON file, or one RouterFolderError line naming the file and field."""
    if path.is_dir() or not path.is_file():
        raise RouterFolderError(f"{path}: missing; {hint}")
    try:
        return model.model_validate(json.loads(path.read_bytes()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RouterFolderError(f"{path}: not valid JSON ({e})") from None
    except ValidationError as e:
        loc, msg = first_error(e)
        raise RouterFolderError(f"{path}: field '{'.'.join(map(str, loc)) or '(top level)'}': {msg}") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(folder: Path) -> Manifest:
    return RouterFolder(folder).manifest()
