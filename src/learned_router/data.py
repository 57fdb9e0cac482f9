"""Labeled routing data: read sources, map model names, apply the label policy, split by prompt.

Three input shapes, told apart by their columns:
- long (the shared datasets): prompt_id, prompt, model, score in [0, 1] (+ source, contaminated, turns, category)
- battles (Chatbot Arena style): prompt, model_a, model_b, winner in {model_a, model_b, tie, tie (bothbad)}
- labels: prompt, label in {0, 1} (1 = the weak model's answer passes)

The output is one row per (source, prompt): prompt, label, weight, source, group, split, weak/strong scores.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from .errors import DataError
from .manifest import LabelPolicy, sha256_file

FORMATS = {
    "long": ("prompt", "model", "score"),
    "battles": ("prompt", "model_a", "model_b", "winner"),
    "labels": ("prompt", "label"),
}
WINNERS = {"model_a", "model_b", "tie", "tie (bothbad)"}
READERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


@dataclass
class Source:
    """One input file and how much each of its rows counts in the loss."""

    path: Path
    weight: float = 1.0
    name: str = ""
    table: pd.DataFrame = field(default=None, repr=False)
    fmt: str = ""

    def fingerprint(self) -> dict:
        return {"name": self.name, "path": str(self.path), "sha256": sha256_file(self.path),
                "format": self.fmt, "rows": len(self.table), "weight": self.weight}


def read_table(path: Path) -> pd.DataFrame:
    """Read a parquet, JSONL or CSV file with the `datasets` library."""
    from datasets import disable_progress_bars, load_dataset

    disable_progress_bars()
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(READERS)}")
    try:
        ds = load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # datasets wraps parser errors in several exception types
        raise DataError(f"{path}: cannot be read as {kind} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return ds.to_pandas()


def detect_format(path: Path, df: pd.DataFrame) -> str:
    for fmt, cols in FORMATS.items():
        if all(c in df.columns for c in cols):
            return fmt
    shapes = "; ".join(f"{k}: {', '.join(v)}" for k, v in FORMATS.items())
    raise DataError(f"{path}: unrecognised columns {sorted(df.columns)}; expected one of ({shapes})")


def load_source(path: str | Path, weight: float = 1.0) -> Source:
    path = Path(path)
    df = read_table(path)
    if df.empty:
        raise DataError(f"{path}: no rows")
    fmt = detect_format(path, df)
    name = str(df["source"].iloc[0]) if "source" in df.columns and df["source"].nunique() == 1 else path.stem
    check_prompts(path, df)
    if not (weight > 0 and math.isfinite(weight)):
        raise DataError(f"{path}: weight must be a positive number, got {weight}")
    return Source(path=path, weight=weight, name=name, table=df, fmt=fmt)


def plain(value: object) -> object:
    """A numpy scalar as the Python value it holds, so error messages read 7.0, not np.float64(7.0)."""
    return value.item() if isinstance(value, np.generic) else value


def check_prompts(path: Path, df: pd.DataFrame) -> None:
    bad = df["prompt"].map(lambda p: not isinstance(p, str) or not p.strip())
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{path}: row {i}: field 'prompt' is empty or not text ({df['prompt'].iloc[i]!r})")


DEFAULT_PAIR_MAP = Path(__file__).with_name("pair_map.yaml")


def read_pair_map(path: Path) -> dict[str, dict[str, list[str]]]:
    """YAML: {source: {requested model name: source model name or list of names}}."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise DataError(f"{path}: expected a mapping of source -> {{model: stand-in model(s)}}")
    return {s: {k: [v] if isinstance(v, str) else list(v) for k, v in m.items()} for s, m in raw.items()}


def load_pair_map(path: str | Path | None = None) -> dict[str, dict[str, list[str]]]:
    """The shipped stand-ins, with the user's file (if any) overriding them per source and model."""
    merged = read_pair_map(DEFAULT_PAIR_MAP)
    for source, names in (read_pair_map(Path(path)) if path else {}).items():
        merged.setdefault(source, {}).update(names)
    return merged


def resolve(source: Source, model: str, available: set[str], pair_map: dict) -> list[str]:
    """The source's name(s) for `model`: itself if present, else the pair map's stand-ins."""
    if model in available:
        return [model]
    stand_ins = pair_map.get(source.name, {}).get(model)
    if isinstance(stand_ins, str):
        stand_ins = [stand_ins]
    if stand_ins is None:
        raise DataError(
            f"{source.path}: model '{model}' is not in source '{source.name}' and the pair map names no stand-in; "
            f"models there: {', '.join(sorted(available))}"
        )
    missing = [m for m in stand_ins if m not in available]
    if missing:
        raise DataError(f"pair map for '{source.name}': {', '.join(missing)} not in {source.path}; "
                        f"models there: {', '.join(sorted(available))}")
    return stand_ins


def checked_scores(source: Source) -> pd.Series:
    """A long table's 'score' column as numbers in [0, 1]; DataError naming the first bad row."""
    df = source.table
    if df["score"].isna().any():
        i = int(np.flatnonzero(df["score"].isna().to_numpy())[0])
        raise DataError(f"{source.path}: row {i}: field 'score' is NaN (model {df['model'].iloc[i]!r})")
    scores = pd.to_numeric(df["score"], errors="coerce")
    if scores.isna().any() or not scores.between(0, 1).all():
        i = int(np.flatnonzero((scores.isna() | ~scores.between(0, 1)).to_numpy())[0])
        raise DataError(f"{source.path}: row {i}: field 'score' must be a number in [0, 1], got {plain(df['score'].iloc[i])!r}")
    return scores


def label_long(source: Source, strong: str, weak: str, policy: LabelPolicy, pair_map: dict) -> pd.DataFrame:
    df = source.table
    scores = checked_scores(source)
    available = set(df["model"].astype(str))
    s_names, w_names = resolve(source, strong, available, pair_map), resolve(source, weak, available, pair_map)
    df = df.assign(score=scores)
    if "prompt_id" not in df.columns:
        df = df.assign(prompt_id=df["prompt"])
    meta = df.drop_duplicates("prompt_id").set_index("prompt_id")

    def mean_score(names):
        return df[df["model"].isin(names)].groupby("prompt_id")["score"].mean()

    both = pd.concat({"strong_score": mean_score(s_names), "weak_score": mean_score(w_names)}, axis=1).dropna()
    if both.empty:
        raise DataError(f"{source.path}: no prompt has scores for both '{strong}' and '{weak}'")
    out = both.join(meta[[c for c in ("prompt", "contaminated", "category") if c in meta.columns]])
    weak, strong = out["weak_score"].to_numpy(), out["strong_score"].to_numpy()
    out["label"] = passes(weak, strong, policy)
    out["target"] = training_target(out["label"].to_numpy(), np.abs(weak - strong) < 1e-9, policy)
    return out.reset_index()


def passes(weak: np.ndarray, strong: np.ndarray, policy: LabelPolicy) -> np.ndarray:
    """The label policy: does the weak answer pass the bar? (1e-9 absorbs float noise in normalised grades)"""
    if policy.kind == "relative":
        return (weak >= strong - policy.margin - 1e-9).astype(np.int8)
    return (weak >= policy.min_score - 1e-9).astype(np.int8)


def training_target(label: np.ndarray, tie: np.ndarray, policy: LabelPolicy) -> np.ndarray:
    """What the head trains toward: the label, or under a relative policy `policy.tie_target` where the grades tie."""
    tied = tie if policy.kind == "relative" else np.zeros(len(label), dtype=bool)
    return np.where(tied, policy.tie_target, label).astype(np.float32)


def label_battles(source: Source, strong: str, weak: str, policy: LabelPolicy, pair_map: dict) -> pd.DataFrame:
    """A battle between a strong-side and a weak-side model: the weak answer passes unless the strong side won."""
    df = source.table
    bad = ~df["winner"].isin(WINNERS)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{source.path}: row {i}: field 'winner' is {df['winner'].iloc[i]!r}; expected one of {sorted(WINNERS)}")
    available = set(df["model_a"].astype(str)) | set(df["model_b"].astype(str))
    s_names, w_names = set(resolve(source, strong, available, pair_map)), set(resolve(source, weak, available, pair_map))
    a_strong = df["model_a"].isin(s_names) & df["model_b"].isin(w_names)
    b_strong = df["model_b"].isin(s_names) & df["model_a"].isin(w_names)
    df = df[a_strong | b_strong]
    if df.empty:
        raise DataError(f"{source.path}: no battle between '{strong}' and '{weak}'")
    strong_won = np.where(a_strong[df.index], df["winner"] == "model_a", df["winner"] == "model_b")
    label = (~strong_won).astype(np.int8)
    out = df[["prompt"]].assign(label=label, target=training_target(label, df["winner"].str.startswith("tie").to_numpy(), policy))
    # several battles on one prompt: the weak side passes if it passed in most of them; the target is their mean
    out = out.groupby("prompt", as_index=False)[["label", "target"]].mean()
    out["label"] = (out["label"] >= 0.5).astype(np.int8)
    return out


def label_plain(source: Source) -> pd.DataFrame:
    df = source.table
    labels = pd.to_numeric(df["label"], errors="coerce")
    bad = ~labels.isin([0, 1])
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{source.path}: row {i}: field 'label' must be 0 or 1, got {plain(df['label'].iloc[i])!r}")
    labels = labels.astype(np.int8).to_numpy()
    return df[["prompt"]].assign(label=labels, target=labels.astype(np.float32))


def group_of(prompt: str) -> str:
    """Split key: the whitespace-normalised, lower-cased prompt text, so duplicates never straddle splits."""
    return hashlib.sha1(" ".join(prompt.lower().split()).encode()).hexdigest()


def assign_splits(groups: pd.Series, val: float, test: float, seed: int) -> np.ndarray:
    u = groups.map(lambda g: int(hashlib.sha1(f"{seed}:{g}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF)
    return np.where(u < test, "test", np.where(u < test + val, "val", "train"))


def source_ids(df: pd.DataFrame) -> np.ndarray:
    """Each row's source as an int id, by sorted source name (for the head's per-source training offsets)."""
    return pd.factorize(df["source"], sort=True)[0]


def build_dataset(
    sources: list[Source],
    strong: str,
    weak: str,
    policy: LabelPolicy,
    pair_map: dict | None = None,
    val: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
) -> pd.DataFrame:
    """All sources as one labeled table with a by-prompt split; contaminated prompts never enter val or test."""
    if not sources:
        raise DataError("no data: pass at least one --data file")
    pair_map = pair_map or {}
    frames = []
    for s in sources:
        if s.fmt == "long":
            t = label_long(s, strong, weak, policy, pair_map)
        elif s.fmt == "battles":
            t = label_battles(s, strong, weak, policy, pair_map)
        else:
            t = label_plain(s)
        for col, default in (("weak_score", np.nan), ("strong_score", np.nan), ("contaminated", False), ("category", None)):
            if col not in t.columns:
                t[col] = default
        frames.append(t.assign(source=s.name, weight=s.weight))
    df = pd.concat(frames, ignore_index=True)
    df["contaminated"] = df["contaminated"].fillna(False).astype(bool)
    df["group"] = df["prompt"].map(group_of)
    df["split"] = assign_splits(df["group"], val, test, seed)
    df = df[~(df["contaminated"] & (df["split"] != "train"))].reset_index(drop=True)
    for part in ("train", "val"):
        if (df["split"] == part).sum() == 0 or df.loc[df["split"] == part, "label"].nunique() < 2:
            raise DataError(f"the {part} split needs both labels; got {df.loc[df['split'] == part, 'label'].value_counts().to_dict()} "
                            f"from {len(df)} rows: add data or change the label policy")
    return df
