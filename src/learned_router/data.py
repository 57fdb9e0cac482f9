"""Graded answers from every source as one table of observations, each under its source's grading scheme.

Two input shapes, told apart by their columns:
- long (the shared datasets): prompt, model, score in [0, 1] (+ prompt_id, source, baseline, contaminated, category)
- battles (Chatbot Arena style): prompt, model_a, model_b, winner in {model_a, model_b, tie, tie (bothbad)}
  (+ score_model_b: model_b's graded preference over model_a, used instead of the winner where present: model_b is
  then the observation's model, against model_a)

Two grading schemes (`SCHEMES`), the link the quality model fits per source:
- absolute: the grade says how good one answer is (pass/fail, 1-10 against a reference);
- versus: the grade says whether one answer beat another (a judge's preference against a fixed baseline, a human
  vote between two answers). Only the two models' difference shows in it, never the prompt's difficulty.
A long table with a `baseline` column is versus that baseline, unless `SOURCES` (sources.yaml) says otherwise.
A long table whose `source` column names several sources (`learned-router label`'s: the judge's grades and user
feedback) is read as that many sources, each with its own scheme.

The output is one row per (source, prompt, model, opponent): prompt, group, source, scheme, model, opponent (None
for absolute), grade, split.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DataError, first_bad, not_a_file
from .manifest import sha256_file
from .yamlfile import load_yaml

FORMATS = {
    "long": ("prompt", "model", "score"),
    "battles": ("prompt", "model_a", "model_b", "winner"),
}
SCHEMES = ("absolute", "versus")
WINNERS = {"model_a": 1.0, "model_b": 0.0, "tie": 0.5, "tie (bothbad)": 0.5}  # model_a's grade
READERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
SOURCES_FILE = Path(__file__).with_name("sources.yaml")


@lru_cache(maxsize=1)
def known_sources() -> dict:
    """sources.yaml: model aliases (one name per model across sources) and per-source scheme overrides."""
    return load_yaml(SOURCES_FILE)


def canonical(model: str) -> str:
    """The name a model goes by across sources (sources.yaml `aliases`), else its own."""
    return known_sources()["aliases"].get(model, model)


@dataclass
class Source:
    """One input file: its rows, its shape and its grading scheme."""

    path: Path
    name: str = ""
    table: pd.DataFrame = field(default=None, repr=False)
    fmt: str = ""
    scheme: str = ""
    weight: float = 1.0

    def fingerprint(self) -> dict:
        return {
            "name": self.name,
            "path": str(self.path),
            "sha256": sha256_file(self.path),
            "format": self.fmt,
            "scheme": self.scheme,
            "rows": len(self.table),
            "weight": self.weight,
        }


def read_table(path: Path) -> pd.DataFrame:
    """Read a parquet, JSONL or CSV file with the `datasets` library."""
    from datasets import disable_progress_bars, load_dataset

    disable_progress_bars()
    path = Path(path)
    if not path.is_file():
        raise DataError(not_a_file(path))
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(READERS)}")
    check_text_table(path)
    try:
        ds = load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # datasets wraps parser errors in several exception types
        first = (str(e).splitlines() or [""])[0][:200]
        raise DataError(f"{path}: cannot be read as {kind} ({type(e).__name__}: {first})") from None
    return ds.to_pandas()


def detect_format(path: Path, df: pd.DataFrame) -> str:
    for fmt, cols in FORMATS.items():
        if all(c in df.columns for c in cols):
            return fmt
    shapes = "; ".join(f"{k}: {', '.join(v)}" for k, v in FORMATS.items())
    raise DataError(f"{path}: unrecognised columns {sorted(df.columns)}; expected one of ({shapes})")


def scheme_of(name: str, fmt: str, df: pd.DataFrame) -> str:
    override = known_sources()["schemes"].get(name)
    if override:
        return override
    if fmt == "battles":
        return "versus"
    return "versus" if "baseline" in df.columns and df["baseline"].notna().any() else "absolute"


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
    return Source(path=path, name=name, table=df, fmt=fmt, scheme=scheme_of(name, fmt, df), weight=weight)


def load_sources(path: str | Path, weight: float = 1.0) -> list[Source]:
    """A file's sources: itself, or one per name of its `source` column when a long table names several."""
    src = load_source(path, weight)
    df = src.table
    if src.fmt != "long" or "source" not in df.columns or df["source"].nunique() < 2:
        return [src]
    first_bad(src.path, df["source"].isna(), "field 'source' is empty (this file names several sources)", df["source"])
    return [
        Source(
            path=src.path,
            name=str(name),
            table=part.reset_index(drop=True),
            fmt=src.fmt,
            scheme=scheme_of(str(name), src.fmt, part),
            weight=weight,
        )
        for name, part in df.groupby("source", sort=False)
    ]


PROMPT_TABLES = (".parquet", ".jsonl", ".csv")


def utf8_text(raw: bytes, where: str) -> str:
    """The bytes as UTF-8 text; DataError naming the line of the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{where}: line {line}: not UTF-8 text (byte {raw[e.start]:#04x})") from None


def check_text_table(path: Path) -> None:
    """A JSONL or CSV file has rows, and each JSONL line is a JSON object: else DataError naming the file (and line).
    Parquet files are left to their reader."""
    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        return
    text = utf8_text(Path(path).read_bytes(), str(path))
    if not text.strip():
        raise DataError(f"{path}: empty file (no rows)")
    if suffix in (".jsonl", ".json"):
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")


def write_table(df: pd.DataFrame, out: Path) -> None:
    """Write a table as its file name asks (.parquet, .jsonl or .csv), to a temporary file renamed over `out`."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in PROMPT_TABLES:
        raise DataError(f"{out}: unsupported file type '{out.suffix}'; use {', '.join(PROMPT_TABLES)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if suffix == ".parquet":
        df.to_parquet(tmp, index=False)
    elif suffix == ".jsonl":
        df.to_json(tmp, orient="records", lines=True, force_ascii=False, date_format="iso")
    else:
        df.to_csv(tmp, index=False)
    os.replace(tmp, out)


def read_prompt_table(path: Path, text_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """A table with a 'prompt' column, from parquet, JSONL or CSV (`text_columns` read as text, not numbers); DataError
    naming the file when it cannot be read, has no 'prompt' column or no rows."""
    suffix = Path(path).suffix.lower()
    check_text_table(path)
    try:
        if suffix == ".parquet":
            df = pd.read_parquet(path)
        elif suffix == ".jsonl":
            df = pd.read_json(path, lines=True, dtype=not text_columns)
        else:
            df = pd.read_csv(path, dtype=dict.fromkeys(text_columns, str) or None)
    except Exception as e:  # pandas and pyarrow raise many parser error types
        first = (str(e).splitlines() or [""])[0][:200]
        raise DataError(f"{path}: cannot be read ({type(e).__name__}: {first})") from None
    if "prompt" not in df.columns:
        raise DataError(f"{path}: no 'prompt' column (columns: {', '.join(map(str, df.columns))})")
    if df.empty:
        raise DataError(f"{path}: no prompts")
    return df


def prompt_lines(raw: bytes, where: str) -> list[str]:
    """The non-blank lines of UTF-8 text as prompts; DataError for a byte that is not UTF-8 or no prompt at all."""
    lines = [line for line in utf8_text(raw, where).splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{where}: no prompts (one per line)")
    return lines


def prompts_of_file(path: Path) -> tuple[list[str], list]:
    """Prompts and their ids from a table with a 'prompt' column (ids: its 'prompt_id' or 'id' column, else row
    numbers) or a text file of one prompt per line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(not_a_file(path))
    if path.suffix.lower() not in PROMPT_TABLES:
        lines = prompt_lines(path.read_bytes(), str(path))
        return lines, list(range(len(lines)))
    df = read_prompt_table(path)
    ids = next((df[c] for c in ("prompt_id", "id") if c in df.columns), pd.Series(range(len(df))))
    return df["prompt"].tolist(), ids.tolist()


def check_prompts(path: Path, df: pd.DataFrame) -> None:
    first_bad(
        path,
        df["prompt"].map(lambda p: not isinstance(p, str) or not p.strip()),
        "field 'prompt' is empty or not text",
        df["prompt"],
    )


def unit_grades(path: Path, values: pd.Series, column: str) -> pd.Series:
    """A grade column as numbers in [0, 1]; DataError naming the first bad row."""
    grades = pd.to_numeric(values, errors="coerce")
    first_bad(path, grades.isna() | ~grades.between(0, 1), f"field '{column}' must be a number in [0, 1]", values)
    return grades.astype(float)


def names(values: pd.Series) -> pd.Series:
    return values.astype(str).map(canonical)


def observations(source: Source) -> pd.DataFrame:
    """The source's grades as rows of (prompt, model, opponent, grade): a versus grade is `model`'s against `opponent`."""
    df, path = source.table, source.path
    if source.fmt == "battles" and "score_model_b" in df.columns and df["score_model_b"].notna().all():
        out = pd.DataFrame(
            {
                "prompt": df["prompt"],
                "model": names(df["model_b"]),
                "opponent": names(df["model_a"]),
                "grade": unit_grades(path, df["score_model_b"], "score_model_b"),
            }
        )
    elif source.fmt == "battles":
        first_bad(
            path, ~df["winner"].isin(list(WINNERS)), f"field 'winner' must be one of {sorted(WINNERS)}", df["winner"]
        )
        out = pd.DataFrame(
            {
                "prompt": df["prompt"],
                "model": names(df["model_a"]),
                "opponent": names(df["model_b"]),
                "grade": df["winner"].map(WINNERS).astype(float),
            }
        )
    else:
        grade = unit_grades(path, df["score"], "score")
        versus = source.scheme == "versus"
        if versus and ("baseline" not in df.columns or df["baseline"].isna().any()):
            raise DataError(f"{path}: a versus source in the long shape needs a 'baseline' column on every row")
        out = pd.DataFrame(
            {
                "prompt": df["prompt"],
                "model": names(df["model"]),
                "opponent": names(df["baseline"]) if versus else None,
                "grade": grade,
            }
        )
        if versus:
            out = out[out["model"] != out["opponent"]]  # the baseline against itself says nothing
    if "contaminated" in df.columns:
        out["contaminated"] = df["contaminated"].fillna(False).astype(bool).to_numpy()[out.index]
    else:
        out["contaminated"] = False
    keys = ["prompt", "model", "opponent"]
    out = (
        out.assign(opponent=out["opponent"].fillna(""))  # one grade per key: repeated rows count as their mean
        .groupby(keys, as_index=False, sort=False)
        .agg(grade=("grade", "mean"), contaminated=("contaminated", "any"))
    )
    return out.assign(opponent=out["opponent"].replace("", None), source=source.name, scheme=source.scheme)


def group_of(prompt: str) -> str:
    """Split key: the whitespace-normalised, lower-cased prompt text, so duplicates never straddle splits."""
    return hashlib.sha1(" ".join(prompt.lower().split()).encode()).hexdigest()


def assign_splits(groups: pd.Series, val: float, test: float, seed: int) -> np.ndarray:
    u = groups.map(lambda g: int(hashlib.sha1(f"{seed}:{g}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF)
    return np.where(u < test, "test", np.where(u < test + val, "val", "train"))


@dataclass
class Grades:
    """Every source's observations, split by prompt text; `prompts` lists each distinct prompt once."""

    obs: pd.DataFrame
    sources: list[Source]

    @property
    def prompts(self) -> pd.DataFrame:
        return self.obs.drop_duplicates("prompt")[["prompt", "group", "split"]].reset_index(drop=True)

    @property
    def models(self) -> list[str]:
        return sorted(set(self.obs["model"]) | set(self.obs["opponent"].dropna()))

    def without(self, groups: set[str]) -> "Grades":
        """These prompt texts dropped (a held-out benchmark's), whichever source they come from."""
        return Grades(self.obs[~self.obs["group"].isin(groups)].reset_index(drop=True), self.sources)

    def only(self, split: str) -> pd.DataFrame:
        return self.obs[self.obs["split"] == split]


def load_grades(
    paths: list[str | Path],
    weights: dict[str, float] | None = None,
    val: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
    max_prompts: int | None = None,
) -> Grades:
    """All sources as one table of observations; contaminated prompts only ever train. A source named in several
    files is one source. `max_prompts` samples that many prompts per source (quick runs)."""
    if not paths:
        raise DataError("no data: pass at least one --data file")
    weights = weights or {}
    resolved = [Path(p).resolve() for p in paths]
    if twice := sorted({str(p) for p in resolved if resolved.count(p) > 1}):
        raise DataError(f"--data names {twice[0]} more than once: each file's grades count once")
    sources = [s for p in paths for s in load_sources(p)]
    taken = sorted({s.name for s in sources})
    unknown = set(weights) - set(taken) - {Path(p).stem for p in paths}
    if unknown:
        raise DataError(f"--weight names unknown source(s) {sorted(unknown)}; sources: {taken}")
    first: dict[str, Source] = {}
    frames = []
    for s in sources:
        s.weight = weights.get(s.name, weights.get(s.path.stem, 1.0))
        if not (s.weight > 0 and math.isfinite(s.weight)):
            raise DataError(f"--weight {s.name}: must be a positive number, got {s.weight}")
        seen = first.setdefault(s.name, s)  # a source in several files (two label runs' feedback): one source
        if (seen.fmt, seen.scheme, seen.weight) != (s.fmt, s.scheme, s.weight):
            raise DataError(
                f"source {s.name!r} is in {seen.path} ({seen.fmt}, {seen.scheme}, weight {seen.weight}) and in "
                f"{s.path} ({s.fmt}, {s.scheme}, weight {s.weight}): one source is graded and weighted one way"
            )
        obs = observations(s)
        if max_prompts:
            keep = pd.Series(obs["prompt"].unique()).sample(frac=1.0, random_state=seed)[:max_prompts]
            obs = obs[obs["prompt"].isin(set(keep))]
        frames.append(obs)
    obs = pd.concat(frames, ignore_index=True)
    obs["group"] = obs["prompt"].map(group_of)
    obs["split"] = assign_splits(obs["group"], val, test, seed)
    held = obs["contaminated"] & (obs["split"] != "train")
    obs.loc[held, "split"] = "train"
    if not (obs["split"] == "train").any():
        raise DataError(f"the train split is empty ({len(obs)} observations): add data or lower --val/--test")
    return Grades(obs.reset_index(drop=True), sources)


def grade_table(obs: pd.DataFrame) -> pd.DataFrame:
    """prompt x model mean grades in [0, 1]: absolute grades as they are; grades against one fixed baseline as the
    model's quality against it, the baseline itself 0.5 on those prompts. Battles between varying models are refused:
    their grades say nothing of one model alone (train without --prior fits them)."""
    frames = []
    for source, part in obs.groupby("source"):
        opponents = part["opponent"].dropna().unique()
        if len(opponents) > 1 or (len(opponents) == 1 and part["opponent"].isna().any()):
            raise DataError(
                f"source {source!r}: battles between varying models; --prior fits absolute grades or grades "
                f"against one baseline (train without --prior to fit battles)"
            )
        wide = part.groupby(["prompt", "model"])["grade"].mean().unstack()
        if len(opponents) == 1:
            wide[opponents[0]] = 0.5
        frames.append(wide)
    return pd.concat(frames).groupby(level=0).mean()
