"""Score prompts with an exported router folder: onnxruntime + tokenizers, never torch."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from .errors import RouterError, RouterFolderError
from .manifest import Manifest, read_manifest, verify_file


@dataclass(frozen=True)
class Decision:
    model: str  # "strong" or "weak"
    p_weak: float  # probability that the weak model's answer passes the bar
    threshold: float


def check_prompts(prompts: Sequence[object]) -> list[str]:
    """Prompts must be non-empty strings; the error names the first bad one by index."""
    if isinstance(prompts, str):
        raise RouterError("prompts must be a list of strings, not one string")
    out = list(prompts)
    for i, p in enumerate(out):
        if not isinstance(p, str):
            raise RouterError(f"prompt {i}: expected text, got {type(p).__name__}")
        if not p.strip():
            raise RouterError(f"prompt {i}: empty prompt")
    return out


def choose_tier(pass_chances: np.ndarray, threshold: float | np.ndarray) -> np.ndarray:
    """The tier policy, per row of pass chances (tiers cheapest first): the first tier whose pass chance >= threshold,
    else the one most likely to pass (the cheapest among equals); `threshold` may be a column, one per row. The
    service, its budget pacer and `eval-tiers` all route with it."""
    p = np.asarray(pass_chances)
    clears = p >= threshold
    return np.where(clears.any(axis=1), clears.argmax(axis=1), p.argmax(axis=1))


def check_threshold(threshold: float) -> float:
    if not isinstance(threshold, (int, float)) or not 0.0 <= float(threshold) <= 1.0:
        raise RouterError(f"threshold must be a number in [0, 1], got {threshold!r}")
    return float(threshold)


class Router:
    """A trained router. Binary: `score` gives P(weak answer passes), shape (n,); `route` sends to weak when it clears
    the threshold. Tiers: `score` gives P(answer passes) for each of `models`, shape (n, len(models)).

    Prompts longer than the encoder's limit keep their first `max_seq_length` tokens (head truncation),
    as sentence-transformers does when the head is trained.
    """

    def __init__(self, path: str | os.PathLike, variant: str = "auto", threads: int | None = None):
        self.path = Path(path)
        self.manifest: Manifest = read_manifest(self.path)
        files = self.manifest.files
        if variant == "auto":
            variant = "int8" if "int8" in files else "fp32"
        if variant not in files:
            raise RouterFolderError(f"{self.path}: no '{variant}' model; this folder has {sorted(files)}")
        self.variant = variant
        model_path = verify_file(self.path, files[variant])
        if "tokenizer" not in files:
            raise RouterFolderError(f"{self.path}: router.json lists no tokenizer; re-export the router")
        tok_path = verify_file(self.path, files["tokenizer"])
        try:
            tok = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise RouterFolderError(f"{tok_path}: cannot be read as a tokenizer ({e})") from None
        tok.no_padding()
        tok.enable_truncation(max_length=self.manifest.encoder.max_seq_length, direction="right")
        self._tok = tok
        self._pad_id = tok.token_to_id("[PAD]") or 0

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            self._session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise RouterFolderError(f"{model_path}: onnxruntime cannot load it ({e})") from None

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs) -> "Router":
        return cls(path, **kwargs)

    @property
    def models(self) -> list[str]:
        """What `score` predicts for, in column order: [the weak model] for a binary router, else each candidate."""
        return self.manifest.outputs

    @property
    def default_threshold(self) -> float:
        return self.manifest.default_threshold

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self._session.run(None, {"input_ids": ids, "attention_mask": mask})[0].astype(np.float32)

    def score(self, prompts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """P(weak answer passes) for each prompt (tiers: each model's P(pass) per prompt), in input order.

        int8 runs one prompt per call: its activations are quantised per call, so a padded batch would shift a prompt's
        score by its companions (up to ~0.03 measured). fp32 batches prompts of similar length, exactly as single.
        """
        prompts = check_prompts(prompts)
        out = np.empty((len(prompts),) if self.manifest.kind == "binary" else (len(prompts), len(self.models)), dtype=np.float32)
        encs = self._tok.encode_batch(prompts)
        if self.variant == "int8" or len(prompts) == 1:  # single prompts are never padded
            for i, enc in enumerate(encs):
                ids = np.asarray([enc.ids], dtype=np.int64)
                out[i] = self._run(ids, np.ones_like(ids))[0]
            return out
        order = np.argsort([len(e.ids) for e in encs], kind="stable")  # similar lengths share a batch
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            longest = max(len(encs[i].ids) for i in idx)
            batch = [encs[i] for i in idx]
            for e in batch:
                e.pad(longest, pad_id=self._pad_id, pad_token="[PAD]")
            ids = np.asarray([e.ids for e in batch], dtype=np.int64)
            mask = np.asarray([e.attention_mask for e in batch], dtype=np.int64)
            out[idx] = self._run(ids, mask)
        return out

    def route(self, prompts: Sequence[str], threshold: float | None = None) -> list[Decision]:
        """Weak when P(weak passes) >= threshold, else strong. A higher threshold buys quality with strong calls."""
        if self.manifest.kind != "binary":
            raise RouterError(f"{self.path}: route() is for binary routers; this one scores {len(self.models)} models")
        t = self.default_threshold if threshold is None else check_threshold(threshold)
        return [Decision("weak" if p >= t else "strong", float(p), t) for p in self.score(prompts)]

    def n_tokens(self, prompt: str) -> int:
        """Encoder tokens the router reads from `prompt` (after truncation)."""
        return len(self._tok.encode(prompt).ids)
