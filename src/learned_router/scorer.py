"""Score prompts with an exported router folder: onnxruntime + tokenizers, never torch."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from .errors import RouterError, RouterFolderError
from . import parity
from .manifest import ROLES, Manifest, RouterFolder
from .outputs import Outputs, column_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    route: str  # "strong" or "weak" (as the `route` of `learned-router score`, whose `model` is the model's name)
    p_weak: float  # the weak model's pass chance against the strong one (`pass_chances`)
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
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RouterError(f"prompt {i}: not valid Unicode (character {e.start}: {e.reason})") from None
    return out


def choose_tier(pass_chances: np.ndarray, threshold: float | np.ndarray) -> np.ndarray:
    """The tier policy, per row of pass chances (tiers cheapest first): the first tier whose pass chance >= threshold,
    else the one most likely to pass (the cheapest among equals); `threshold` may be a column, one per row. The
    service and its budget pacer route with it."""
    p = np.asarray(pass_chances)
    clears = p >= threshold
    return np.where(clears.any(axis=1), clears.argmax(axis=1), p.argmax(axis=1))


def decide(p_weak: np.ndarray, threshold: float) -> list[Decision]:
    return [Decision("weak" if p >= threshold else "strong", float(p), threshold) for p in p_weak]


PREFIX_CHARS_PER_TOKEN = 16  # a long prompt's prefix to tokenize: 2,048 characters for 128 tokens


def default_threads() -> int | None:
    """OMP_NUM_THREADS when it is a positive whole number (the convention several processes on a few cores set), else
    None: onnxruntime's own default, every core."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def check_threshold(threshold: float) -> float:
    if not isinstance(threshold, (int, float)) or not 0.0 <= float(threshold) <= 1.0:
        raise RouterError(f"threshold must be a number in [0, 1], got {threshold!r}")
    return float(threshold)


class Router:
    """A trained router (onnxruntime + tokenizers only).

    `predict(prompts)`: `Outputs` (each trained model's predicted answer quality, the prompts' difficulty and
    embedding), as every predictor gives them. `score(prompts)`: the pass chances of `models` (each model against
    the router's strong model, and `generic` = 1 - difficulty), (n, len(models)). `route` picks weak or strong for one
    pair.

    Prompts longer than the encoder's limit keep their first `max_seq_length` tokens (head truncation), as in training.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        variant: str = "auto",
        threads: int | None = None,
        max_seq_length: int | None = None,
    ):
        """`threads`: onnxruntime's intra-op threads (default: `default_threads()`). `max_seq_length`: read this many
        tokens of each prompt instead of router.json's (`calibrate --max-seq-length` measures a budget before it
        writes it there)."""
        self.folder = RouterFolder(path)
        self.path = self.folder.path
        self.manifest: Manifest = self.folder.manifest()
        files = self.manifest.files
        if variant == "auto":
            variant = "int8" if "int8" in files else "fp32"
        if variant not in files:
            raise RouterFolderError(
                f"{self.path}: no '{variant}' model; this folder has {sorted(set(files) - set(ROLES))}"
            )
        self.variant = variant
        model_path = self.folder.verify(files[variant])
        if "tokenizer" not in files:
            raise RouterFolderError(f"{self.path}: router.json lists no tokenizer; re-export the router")
        tok_path = self.folder.verify(files["tokenizer"])
        try:
            tok = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise RouterFolderError(f"{tok_path}: cannot be read as a tokenizer ({e})") from None
        tok.no_padding()
        self.max_seq_length = max_seq_length or self.manifest.encoder.max_seq_length
        tok.enable_truncation(max_length=self.max_seq_length, direction="right")
        self._tok = tok
        self._pad_id = tok.token_to_id("[PAD]") or 0

        opts = ort.SessionOptions()
        threads = threads or default_threads()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            self._session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise RouterFolderError(f"{model_path}: onnxruntime cannot load it ({e})") from None
        outputs = {o.name: o for o in self._session.get_outputs()}
        self._outputs = ["quality", "difficulty"] + (["embedding"] if "embedding" in outputs else [])
        self._dim = int(outputs["embedding"].shape[-1]) if "embedding" in outputs else None
        self.residual = self._load_residual()
        self.graph_models = self.manifest.residual.graph_models if self.residual else self.manifest.models
        self.check = self.self_check()

    def _load_residual(self):
        """The top level of a two-level router (residual.py), or None."""
        from .residual import Residual

        info = self.manifest.residual
        if info is None:
            return None
        if "residual" not in self.manifest.files:
            raise RouterFolderError(f"{self.path}: router.json describes a top level but lists no residual file")
        if not self.has_embedding:
            raise RouterFolderError(f"{self.path}: a top level needs the graph's embedding output; re-export the prior")
        path = self.folder.verify(self.manifest.files["residual"])
        try:
            fitted = Residual.load(path)
        except (OSError, ValueError, KeyError) as e:
            raise RouterFolderError(f"{path}: not a readable top level ({type(e).__name__}: {e})") from None
        if fitted.models != info.models or not set(fitted.models) <= set(self.manifest.models):
            raise RouterFolderError(f"{path}: its models differ from router.json's")
        return fitted

    def self_check(self) -> parity.Verdict | None:
        """This graph on this CPU against the torch model, on the probe prompts whose outputs the exporter kept
        (router.json `check`); None when it kept none. Logs a warning with the figures when it fails the export's gate."""
        c, m = self.manifest.check, self.manifest
        if c is None or not c.probes:
            return None
        whole = [
            i for i, p in enumerate(c.probes) if self.n_tokens(p) < self.max_seq_length
        ]  # read alike at any budget
        quality, difficulty, _ = self.graph([c.probes[i] for i in whole])
        pair = [self.graph_models.index(name) for name in c.models]
        reference = np.asarray(c.quality)[whole], np.asarray(c.difficulty)[whole]
        verdict = parity.judge(
            self.variant, (quality[:, pair], difficulty), reference, (0, 1), m.default_threshold, m.calibration.prompts
        )
        if not verdict.passed:
            log.warning(
                "%s: the %s graph on this CPU (%s) routes unlike the torch model it was exported from on %s: %s "
                "(%s); serve another variant or re-export the router on this machine",
                self.path,
                self.variant,
                parity.cpu(),
                c.cpu,
                verdict.summary(),
                "; ".join(verdict.failures),
            )
        return verdict

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs) -> "Router":
        return cls(path, **kwargs)

    @property
    def models(self) -> list[str]:
        """The columns of `score`: each trained model's pass chance, then `generic`."""
        return self.manifest.outputs

    @property
    def default_threshold(self) -> float:
        return self.manifest.default_threshold

    @property
    def has_embedding(self) -> bool:
        """Whether the graph also outputs the prompt's sentence embedding (routers exported since it does)."""
        return self._dim is not None

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(
            x.astype(np.float32) for x in self._session.run(self._outputs, {"input_ids": ids, "attention_mask": mask})
        )

    def predict(self, prompts: Sequence[str], batch_size: int = 32) -> Outputs:
        """Each model's quality, the prompts' difficulty and (where the graph has it) their embedding, in input order;
        a two-level router's top level applied.

        int8 runs one prompt per call: its activations are quantised per call, so a padded batch would shift a prompt's
        scores by its companions. fp32 batches prompts of similar length, exactly as single.
        """
        prompts = check_prompts(prompts)
        outputs = Outputs(tuple(self.graph_models), self.manifest.strong, *self.graph(prompts, batch_size))
        if self.residual is not None:
            outputs = self.residual.apply(outputs, prompts, self.manifest.models)
        return outputs

    def embed(self, prompts: Sequence[str]) -> np.ndarray:
        """The prompts' unit sentence embeddings (n, dim), from the same onnxruntime call that scores them."""
        if not self.has_embedding:
            raise RouterError(
                f"{self.path}: this router's graph has no embedding output; re-export it "
                "(learned-router export --router PATH) to infer task types"
            )
        return self.predict(prompts).embedding

    def encode(self, prompts: list[str]) -> list:
        """Each prompt's tokens as the graph reads them: its first `max_seq_length`, exactly as tokenizing it whole
        and truncating. A long prompt is tokenized from a prefix cut at whitespace (whole words only), and whole
        only when that prefix does not hold more tokens than are read: a 20,000-token prompt costs what a short
        one does."""
        limit = self.max_seq_length * PREFIX_CHARS_PER_TOKEN
        cut = [
            p if len(p) <= limit else p[: max(p.rfind(" ", 0, limit), p.rfind("\n", 0, limit), 0)] or p for p in prompts
        ]
        encs = self._tok.encode_batch(cut)
        short = [i for i, (p, c, e) in enumerate(zip(prompts, cut, encs)) if c is not p and not e.overflowing]
        for i, e in zip(short, self._tok.encode_batch([prompts[i] for i in short])):
            encs[i] = e
        return encs

    def graph(self, prompts: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The ONNX graph's own outputs: (quality of `graph_models`, difficulty, embedding or None)."""
        prompts = check_prompts(prompts)
        quality = np.empty((len(prompts), len(self.graph_models)), dtype=np.float32)
        difficulty = np.empty(len(prompts), dtype=np.float32)
        embedding = np.empty((len(prompts), self._dim), dtype=np.float32) if self._dim else None
        encs = self.encode(prompts)
        if self.variant == "int8" or len(prompts) == 1:  # single prompts are never padded
            for i, enc in enumerate(encs):
                ids = np.asarray([enc.ids], dtype=np.int64)
                out = self._run(ids, np.ones_like(ids))
                quality[i], difficulty[i] = out[0][0], out[1][0]
                if embedding is not None:
                    embedding[i] = out[2][0]
            return quality, difficulty, embedding
        order = np.argsort([len(e.ids) for e in encs], kind="stable")  # similar lengths share a batch
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = [encs[i] for i in idx]
            longest = max(len(e.ids) for e in batch)
            for e in batch:
                e.pad(longest, pad_id=self._pad_id, pad_token="[PAD]")
            ids = np.asarray([e.ids for e in batch], dtype=np.int64)
            mask = np.asarray([e.attention_mask for e in batch], dtype=np.int64)
            out = self._run(ids, mask)
            quality[idx], difficulty[idx] = out[0], out[1]
            if embedding is not None:
                embedding[idx] = out[2]
        return quality, difficulty, embedding

    def score(self, prompts: Sequence[str]) -> np.ndarray:
        """Pass chances, (n, len(outputs)): each model's against the strong model, then `generic`."""
        return self.predict(prompts).pass_chances()

    def pass_chance(self, prompts: Sequence[str], weak: str | None = None, strong: str | None = None) -> np.ndarray:
        """The weak model's pass chance against the strong one (default: the router's pair); `generic` as the weak
        model gives 1 - difficulty, whatever the strong model."""
        for name in (weak, strong):
            if name is not None:
                self.column(name)  # before scoring: an unknown name costs no inference
        return self.predict(prompts).pair(weak or self.manifest.weak, strong, str(self.path))

    def column(self, name: str) -> int:
        """The column of `score` for a model name (or `generic`); RouterError listing the outputs if unknown."""
        return column_of(self.manifest.models, name, str(self.path))

    def threshold(
        self,
        weak: str,
        strong: str,
        threshold: float | None = None,
        strong_fraction: float | None = None,
    ) -> float:
        """The threshold `weak` routes at against `strong`: the one given, the one that sends `strong_fraction` of the
        calibration mix strong, or by default the router's own for its pair and, for another pair, the one giving the
        same share of strong calls."""
        if threshold is not None and strong_fraction is not None:
            raise RouterError("give a threshold or a strong fraction, not both")
        if strong_fraction is not None:
            if not 0 <= strong_fraction <= 1:
                raise RouterError(f"strong fraction must be in [0, 1], got {strong_fraction}")
            return self.manifest.threshold_for(strong_fraction, weak)
        if threshold is not None:
            return check_threshold(threshold)
        if (weak, strong) == (self.manifest.weak, self.manifest.strong):
            return self.default_threshold
        return self.manifest.threshold_for(self.manifest.strong_fraction_at(self.default_threshold), weak)

    def route(
        self, prompts: Sequence[str], threshold: float | None = None, weak: str | None = None, strong: str | None = None
    ) -> list[Decision]:
        """Weak when its pass chance >= threshold, else strong. A higher threshold buys quality with strong calls.
        The default threshold is the router's for its own pair; for another pair, pass one (or `threshold_for`)."""
        t = self.default_threshold if threshold is None else check_threshold(threshold)
        return decide(self.pass_chance(prompts, weak, strong), t)

    def n_tokens(self, prompt: str, whole: bool = False) -> int:
        """Encoder tokens the router reads from `prompt` (after truncation), or with `whole` the prompt's own count."""
        if not whole:
            return len(self.encode([prompt])[0].ids)
        tok = Tokenizer.from_str(self._tok.to_str())
        tok.no_truncation()
        return len(tok.encode(prompt).ids)
