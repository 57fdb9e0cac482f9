"""`learned-router label`: grade the answers of the configured models with a judge model, into a table `train` reads.

For each prompt, each model compared (tiers or providers of the service config; default: every tier, cheapest first)
answers it through the serving provider layer (serving/providers.py: a tier down its fallback chain, retries, circuit
breakers), and the judge of the config's `judge:` block grades the answers by the rubric of `judge.py` (single: each
answer rated 1-10 with the strongest model's answer as the reference; pairwise: each answer against the strongest's,
in both orders). The breakers are this process' own (never the service's shared Redis state): a labelling run's
failures do not open circuits for live traffic.

The output (`--out`: .parquet, .jsonl or .csv) is the long table of data.py, one row per (prompt, model):

  prompt (string), prompt_id (string), model (string), score (double, in [0, 1]),
  source (string: judge_single | judge_pairwise | feedback), judge (string: the judge's model; null for feedback),
  baseline (string: the strongest model in pairwise rows, which makes them a 'versus' source; else null),
  raw (string: the judge's verdict as given: the rating, or "first/second" with the candidate as A then as B),
  client (string: who gave a feedback row, from the prompts file's `client` column; null for the judge's rows)

`model` names a tier's rows by its router output (`score:`), a tier without one by its first provider's `model`, a
provider by its `model`: the names the router's outputs and the config's tiers use. A prompts file with a `feedback`
column (a number in [0, 1] or null) and a `tier` column (the tier that answered) adds one row per non-null feedback,
source `feedback`, for that tier's model (every row of the file: `--sample` picks only the prompts sent to the models).
`--exclude-client` drops a client's feedback and `--max-feedback-share` caps any client's share of it, so one client
flooding feedback cannot outvote the others; the plan prints the feedback per client.

Resumable: every answer and every graded row goes to an append-only journal beside the output (`<out>.journal.jsonl`),
flushed line by line, and the parquet is rewritten from it atomically (a temporary file, then a rename) at the end of
every run, a stop at the budget or Ctrl-C included. A rerun skips the rows already graded (by source, prompt id, model,
judge and baseline) and reuses the answers already given; a crash loses at most the calls in flight. Identical prompt
texts are labelled once (under the first one's id).

Cost: before it starts, every call to make is priced at its provider's (a tier: its first provider's) configured
prices, with prompt tokens from characters / `routing.chars_per_token` (+4 per message: prices.py), each answer at
`judge.answer_max_tokens` and each verdict at `judge.max_tokens`. While it runs, each answer is billed from its
`usage` (else the estimate, serving/usage.py). `max_usd` stops the run cleanly: no call starts whose estimate would
take the spend past it. Failed calls (no provider answered) and judge answers without a verdict write no row: they
are counted, and a rerun tries them again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .data import PROMPT_TABLES, check_prompts, read_prompt_table, utf8_text, write_table
from .errors import DataError, RouterError, first_bad, first_index, not_a_file
from .judge import (
    judge_chat,
    pairwise_grade,
    pairwise_messages,
    parse_rating,
    parse_verdict,
    single_messages,
)
from .prices import chat_tokens, prompt_tokens
from .progress import mode as progress_mode
from .progress import step
from .serving.config import ProviderConfig, ServiceConfig, TierConfig, api_key
from .serving.errors import ConfigError

SOURCES = {"single": "judge_single", "pairwise": "judge_pairwise"}
FEEDBACK = "feedback"
COLUMNS = ("prompt", "prompt_id", "model", "score", "source", "judge", "baseline", "raw", "client")


# ---- what to compare ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Contender:
    """One model compared: a tier (its fallback chain) or a provider alone."""

    name: str  # as --models names it
    model: str  # the `model` column of its rows
    providers: tuple[ProviderConfig, ...]  # the chain, in order
    tiers: tuple[str, ...]  # each provider's tier


def contenders(cfg: ServiceConfig, names: list[str] | None) -> list[Contender]:
    """The models compared, as `--models` lists them (default: every tier, cheapest first); the last is the strongest."""
    tiers = {t.name: t for t in cfg.tiers}
    providers = {p.name: (p, t.name) for t in cfg.tiers for p in t.providers}
    out = []
    for name in names if names is not None else list(tiers):
        if name in tiers:
            t = tiers[name]
            out.append(Contender(name, t.graded_as, tuple(t.providers), (t.name,) * len(t.providers)))
        elif name in providers:
            p, t = providers[name]
            out.append(Contender(name, p.model, (p,), (t,)))
        else:
            raise RouterError(
                f"--models: unknown name {name!r}; tiers: {', '.join(tiers)}; providers: {', '.join(providers)}"
            )
    if not out:
        raise RouterError("--models: name at least one tier or provider")
    seen: dict[str, str] = {}
    for c in out:
        if c.model in seen:
            raise RouterError(
                f"--models: {seen[c.model]} and {c.name} both answer as model {c.model!r}; name one of them"
            )
        seen[c.model] = c.name
    return out


# ---- prompts --------------------------------------------------------------------------------------------------


def text_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def read_prompts(path: Path) -> pd.DataFrame:
    """A prompts table (parquet, JSONL or CSV with a `prompt` column); DataError naming the file, row and field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(not_a_file(path))
    suffix = path.suffix.lower()
    if suffix not in PROMPT_TABLES:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use {', '.join(PROMPT_TABLES)}")
    if suffix != ".parquet" and not utf8_text(path.read_bytes(), str(path)).strip():
        raise DataError(f"{path}: no prompts (the file is empty)")
    df = read_prompt_table(path, text_columns=("prompt_id", "tier", "data_class"))
    df = df.reset_index(drop=True)
    check_prompts(path, df)
    ids = df["prompt_id"] if "prompt_id" in df.columns else pd.Series([None] * len(df))
    df["prompt_id"] = [text_id(p) if pd.isna(i) else str(i) for p, i in zip(df["prompt"], ids)]
    owner = df.groupby("prompt_id", sort=False)["prompt"].transform("first")  # the text of each id's first row
    if (i := first_index(df["prompt"] != owner)) is not None:
        pid = df["prompt_id"].iloc[i]
        j = first_index(df["prompt_id"] == pid)
        raise DataError(f"{path}: row {i}: field 'prompt_id' {pid!r} names another prompt than row {j}'s")
    if "feedback" in df.columns:
        given = df["feedback"]
        values = pd.to_numeric(given, errors="coerce")
        first_bad(
            path,
            given.notna() & (values.isna() | ~values.between(0, 1) | given.map(lambda g: isinstance(g, bool))),
            "field 'feedback' must be a number in [0, 1] or null",
            given,
        )
        df["feedback"] = values.astype(float)
        if df["feedback"].notna().any() and "tier" not in df.columns:
            raise DataError(f"{path}: a 'feedback' column needs a 'tier' column (the tier that answered each prompt)")
    return df


def check_data_classes(path: Path, df: pd.DataFrame, cfg: ServiceConfig, providers: list[str]) -> None:
    """A row with a `data_class` may only go where the service's data rules let it (`data_classes`): every provider a
    run calls (the compared models' chains and the judge) must be allowed for its class; DataError naming the row."""
    if "data_class" not in df.columns:
        return
    given = df["data_class"]
    classed = given.notna() & (given.astype(str) != "")
    first_bad(
        path,
        classed & ~given.isin(list(cfg.data_classes)),
        "field 'data_class' is not a class of the config's "
        f"data_classes ({', '.join(sorted(cfg.data_classes)) or 'none configured'})",
        given,
    )
    for cls in pd.unique(given[classed]):
        barred = [p for p in dict.fromkeys(providers) if p not in cfg.data_classes[cls]]
        if barred:
            first_bad(
                path,
                given == cls,
                f"data class {cls!r} may not reach {', '.join(barred)} (data_classes.{cls}: "
                f"{', '.join(cfg.data_classes[cls])}), which label would send it to; drop such rows or choose "
                "--models and a judge the class allows",
                given,
            )


def distinct_prompts(df: pd.DataFrame) -> list[tuple[str, str]]:
    """(prompt_id, text) of each distinct text, in file order (a repeated text goes by its first id)."""
    seen: dict[str, str] = {}
    for pid, text in zip(df["prompt_id"], df["prompt"]):
        seen.setdefault(text, pid)
    return [(pid, text) for text, pid in seen.items()]


def sample_prompts(items: list, n: int | None, seed: int) -> list:
    """A seeded random sample of `n` items, kept in their order (all of them when n is None or too big)."""
    if n is None or n >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def feedback_rows(
    df: pd.DataFrame, cfg: ServiceConfig, exclude: frozenset[str] = frozenset(), max_share: float | None = None
) -> tuple[list[dict], dict[str, int], dict[str, tuple[int, int]]]:
    """One row per non-null feedback, for its tier's model, with the client that gave it (a `client` column, as
    `traffic export` writes); the feedback of tiers not in the config, counted; and per client (kept, given).
    `exclude`: clients whose feedback is dropped. `max_share`: no client keeps more than this share of the kept
    feedback (its first rows in file order), so one client cannot outvote the others."""
    if "feedback" not in df.columns:
        return [], {}, {}
    tiers = {t.name: t.graded_as for t in cfg.tiers}
    clients = df["client"] if "client" in df.columns else pd.Series([None] * len(df), index=df.index)
    rows, unknown, seen = [], {}, {}
    for pid, text, score, tier, client in zip(df["prompt_id"], df["prompt"], df["feedback"], df["tier"], clients):
        if pd.isna(score):
            continue
        if pd.isna(tier) or str(tier) not in tiers:
            name = "(none)" if pd.isna(tier) else str(tier)
            unknown[name] = unknown.get(name, 0) + 1
            continue
        model = tiers[str(tier)]
        n = seen[(pid, model)] = seen.get((pid, model), -1) + 1  # the n-th feedback on this prompt and model
        rows.append(
            {
                "prompt": text,
                "prompt_id": pid,
                "model": model,
                "score": float(score),
                "source": FEEDBACK,
                "judge": None,
                "baseline": None,
                "raw": None,
                "n": n,
                "client": None if pd.isna(client) else str(client),
            }
        )
    given = pd.Series([r["client"] or "(none)" for r in rows], dtype=object).value_counts().to_dict()
    rows = [r for r in rows if (r["client"] or "(none)") not in exclude]
    if max_share is not None:
        rows = capped(rows, max_share)
    kept = pd.Series([r["client"] or "(none)" for r in rows], dtype=object).value_counts().to_dict()
    return rows, unknown, {c: (int(kept.get(c, 0)), int(n)) for c, n in given.items()}


def capped(rows: list[dict], share: float) -> list[dict]:
    """The rows with each client's count cut until none has more than `share` of them (the largest first, keeping
    a client's first rows)."""
    counts = pd.Series([r["client"] or "(none)" for r in rows], dtype=object).value_counts().to_dict()
    limit = dict(counts)
    while limit:
        top = max(limit, key=limit.get)
        total = sum(limit.values())
        if limit[top] <= share * total + 1e-9:
            break
        others = total - limit[top]
        limit[top] = min(limit[top], int(share * others / (1.0 - share))) if share < 1 else limit[top]
        if limit[top] == 0:
            limit.pop(top)
    taken: dict[str, int] = {}
    out = []
    for r in rows:
        c = r["client"] or "(none)"
        if taken.get(c, 0) < limit.get(c, 0):
            taken[c] = taken.get(c, 0) + 1
            out.append(r)
    return out


# ---- the journal and the table --------------------------------------------------------------------------------


def row_key(row: dict) -> tuple:
    return (
        row["source"],
        row["prompt_id"],
        row["model"],
        row.get("judge") or "",
        row.get("baseline") or "",
        row.get("n") or 0,
    )


class Journal:
    """The append-only JSONL beside the output: a line per answer ({"kind": "answer", ...}) and per graded row
    ({"kind": "row", ...}), each flushed when written. A line cut short by a crash is skipped when read."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[tuple, dict] = {}
        self.answers: dict[tuple[str, str], str] = {}
        self.unreadable = 0
        self._file = None

    def load(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    kind = rec.pop("kind")
                    if kind == "row":
                        row = {k: rec.get(k) for k in (*COLUMNS, "n")}
                        if not isinstance(row["score"], (int, float)) or not 0 <= row["score"] <= 1:
                            raise ValueError("score")
                        self.rows.setdefault(row_key(row), row)
                    elif kind == "answer":
                        self.answers[(rec["prompt_id"], rec["model"])] = str(rec["text"])
                except (ValueError, KeyError, TypeError, AttributeError):
                    self.unreadable += 1

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cut = self.path.is_file() and self.path.stat().st_size and not self.path.read_bytes()[-1:] == b"\n"
        self._file = open(self.path, "a", encoding="utf-8")
        if cut:
            self._file.write("\n")  # a line cut short by a crash stays on its own line

    def _write(self, rec: dict) -> None:
        self._file.write(json.dumps(rec) + "\n")  # ASCII: an answer's lone surrogate cannot break the file
        self._file.flush()

    def add_row(self, row: dict) -> bool:
        key = row_key(row)
        if key in self.rows:
            return False
        self.rows[key] = row
        self._write({"kind": "row", **row})
        return True

    def add_answer(self, prompt_id: str, model: str, text: str) -> None:
        self.answers[(prompt_id, model)] = text
        self._write({"kind": "answer", "prompt_id": prompt_id, "model": model, "text": text})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_graded(path: Path) -> list[dict]:
    """The rows of an earlier output (they join the journal); RouterError when the file is not such a table."""
    try:
        if path.suffix.lower() == ".parquet":
            df = pd.read_parquet(path)
        elif len(path.read_text(encoding="utf-8", errors="replace").strip().splitlines()) <= 1:
            return []  # a table of no rows (at most a CSV header)
        else:
            df = read_prompt_table(path, text_columns=("prompt_id",))
    except (DataError, OSError, ValueError) as e:
        raise RouterError(
            f"--out {path}: exists and cannot be read as a graded table ({e}); choose another file"
        ) from None
    missing = [c for c in ("prompt", "prompt_id", "model", "score", "source") if c not in df.columns]
    if missing:
        raise RouterError(
            f"--out {path}: exists and is not a graded table (no {', '.join(missing)} column); choose another file"
        )
    rows, seen = [], {}
    for rec in df.to_dict("records"):
        row = {
            k: (None if k not in rec or (not isinstance(rec[k], str) and pd.isna(rec[k])) else rec[k]) for k in COLUMNS
        }
        row["prompt_id"], row["score"] = str(row["prompt_id"]), float(row["score"])
        key = row_key({**row, "n": 0})
        row["n"] = seen[key] = seen.get(key, -1) + 1
        rows.append(row)
    return rows


def write_graded(rows, out: Path) -> int:
    """The graded rows as the output table (parquet, JSONL or CSV by its name), in a stable order, written to a
    temporary file and renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("prompt", pa.string()),
            ("prompt_id", pa.string()),
            ("model", pa.string()),
            ("score", pa.float64()),
            ("source", pa.string()),
            ("judge", pa.string()),
            ("baseline", pa.string()),
            ("raw", pa.string()),
            ("client", pa.string()),
        ]
    )
    ordered = [{k: r.get(k) for k in COLUMNS} for r in sorted(rows, key=row_key)]
    table = pa.Table.from_pylist(ordered, schema=schema)
    if out.suffix.lower() != ".parquet":
        write_table(table.to_pandas(), out)
        return len(ordered)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, out)
    return len(ordered)


def journal_path(out: Path) -> Path:
    return out.with_name(out.name + ".journal.jsonl")


# ---- the plan and its cost ------------------------------------------------------------------------------------


@dataclass
class Job:
    """One prompt's pending rows: the models whose row is not graded yet."""

    prompt_id: str
    text: str
    pending: list[int]  # indexes into the contenders


@dataclass
class Plan:
    cfg: ServiceConfig
    contenders: list[Contender]
    jobs: list[Job]
    out: Path
    journal: Journal
    earlier: list[dict]  # the rows of an existing output (they join the journal, if its journal was lost)
    feedback: list[dict]  # feedback rows not in the table yet
    feedback_unknown: dict[str, int]  # tier -> feedback rows skipped (the tier is not in the config)
    feedback_clients: dict[str, tuple[int, int]]  # client -> (feedback rows kept, given)
    prompts: int  # distinct prompts considered (after --sample)
    skipped: int  # rows already graded
    answer_calls: int
    judge_calls: int
    estimate_usd: float
    concurrency: int
    max_usd: float | None

    @property
    def mode(self) -> str:
        return self.cfg.judge.mode

    @property
    def rows(self) -> int:
        return sum(len(j.pending) for j in self.jobs)


def needs(c: int, ref: int) -> list[int]:
    """The answers the row of contender `c` is graded on: its own, and the strongest's unless it is that one (single
    mode grades the strongest's answer alone; pairwise mode gives it no row)."""
    return [c] if c == ref else [c, ref]


def plan(
    cfg: ServiceConfig,
    prompts: Path,
    out: Path,
    models: list[str] | None = None,
    sample: int | None = None,
    seed: int = 0,
    concurrency: int | None = None,
    max_usd: float | None = None,
    exclude_clients: frozenset[str] = frozenset(),
    max_feedback_share: float | None = None,
) -> Plan:
    """Everything checked and priced before a call is made."""
    if cfg.judge is None:
        raise ConfigError(
            "judge: the config has no judge block (provider, mode, max_tokens: serving/CONFIG.md#judge); "
            "label needs one"
        )
    judge = cfg.judge
    chosen = contenders(cfg, models)
    if judge.mode == "pairwise" and len(chosen) < 2:
        raise RouterError(
            "--models: pairwise mode compares each model with the strongest (the last): name at least two"
        )
    out = Path(out)
    if out.suffix.lower() not in PROMPT_TABLES:
        raise RouterError(f"--out {out}: expected a {', '.join(PROMPT_TABLES)} file")
    if out.resolve() == Path(prompts).resolve():
        raise RouterError(f"--out {out}: is the prompts file; choose another")
    if sample is not None and sample < 1:
        raise RouterError(f"--sample: expected a positive number of prompts, got {sample}")
    if max_usd is not None and not (max_usd >= 0 and math.isfinite(max_usd)):
        raise RouterError(f"--max-usd: expected a non-negative number of dollars, got {max_usd}")
    if concurrency is not None and concurrency < 1:
        raise RouterError(f"--concurrency: expected at least 1, got {concurrency}")
    used = providers_used(cfg, chosen)  # every key variable set, before anything is read or asked
    df = read_prompts(prompts)
    check_data_classes(Path(prompts), df, cfg, [prov.name for prov, _, _ in used])
    if max_feedback_share is not None and not 0 < max_feedback_share <= 1:
        raise RouterError(f"--max-feedback-share: expected a share in (0, 1], got {max_feedback_share}")
    fb, unknown, by_client = feedback_rows(df, cfg, exclude_clients, max_feedback_share)
    journal = Journal(journal_path(out))
    journal.load()
    earlier = read_graded(out) if out.is_file() else []
    source, ref = SOURCES[judge.mode], len(chosen) - 1
    baseline = chosen[ref].model if judge.mode == "pairwise" else None
    scored = [i for i in range(len(chosen)) if judge.mode == "single" or i != ref]
    items = sample_prompts(distinct_prompts(df), sample, seed)
    jobs, skipped = [], 0
    done = set(journal.rows) | {row_key(r) for r in earlier}
    for pid, text in items:
        pending = [
            i for i in scored if (source, pid, chosen[i].model, judge.provider.model, baseline or "", 0) not in done
        ]
        skipped += len(scored) - len(pending)
        if pending:
            jobs.append(Job(pid, text, pending))
    cpt = cfg.routing.chars_per_token
    answer_chars = round(judge.answer_max_tokens * cpt)
    answer_calls = judge_calls = 0
    usd = 0.0
    for job in jobs:
        wanted = sorted({a for c in job.pending for a in needs(c, ref)})
        for a in wanted:
            if (job.prompt_id, chosen[a].model) not in journal.answers:
                answer_calls += 1
                usd += chosen[a].providers[0].cost_usd(prompt_tokens([len(job.text)], cpt), judge.answer_max_tokens)
        for c in job.pending:
            answers = [journal.answers.get((job.prompt_id, chosen[a].model), "x" * answer_chars) for a in needs(c, ref)]
            calls = 1 if judge.mode == "single" else 2  # pairwise: both orders, of one length
            judge_calls += calls
            usd += calls * judge.provider.cost_usd(
                chat_tokens(judge_chat(judge.mode, job.text, answers), cpt), judge.max_tokens
            )
    return Plan(
        cfg,
        chosen,
        jobs,
        out,
        journal,
        earlier,
        [r for r in fb if row_key(r) not in done],
        unknown,
        by_client,
        len(items),
        skipped,
        answer_calls,
        judge_calls,
        usd,
        concurrency or judge.concurrency,
        max_usd,
    )


# ---- the run --------------------------------------------------------------------------------------------------


class Stop(Exception):
    """No more calls: the budget would be passed."""


class CallFailed(Exception):
    """No provider of the chain answered (the detail says why)."""


@dataclass
class Summary:
    written: int = 0  # rows written this run (feedback included)
    feedback: int = 0  # of which feedback rows
    skipped: int = 0  # rows already graded
    failed: int = 0  # rows not written: a provider (or the judge) failed
    unparseable: int = 0  # judge answers with no verdict
    unparseable_rows: int = 0  # rows not written because of them
    spent: float = 0.0
    seconds: float = 0.0
    budget_stop: bool = False
    interrupted: bool = False
    total: int = 0  # rows in the output
    failures: list[str] = field(default_factory=list)  # a few failure details, distinct
    unreadable: int = 0  # journal lines skipped

    @property
    def per_minute(self) -> float:
        graded = self.written - self.feedback
        return graded / self.seconds * 60 if self.seconds > 0 else 0.0


def providers_used(cfg: ServiceConfig, chosen: list[Contender]) -> list[tuple[ProviderConfig, str, str | None]]:
    """(config, tier, API key) of each provider a run may call: the chains of the models compared, and the judge's.
    ConfigError when a key's environment variable is not set."""
    names = {q.name for c in chosen for q in c.providers}
    wanted = [
        (prov, tier.name, f"tiers[{t}].providers[{i}]")
        for t, tier in enumerate(cfg.tiers)
        for i, prov in enumerate(tier.providers)
        if prov.name in names
    ]
    return [
        (prov, tier, api_key(prov, where))
        for prov, tier, where in [*wanted, (cfg.judge.provider, "judge", "judge.provider")]
    ]


class Labeller:
    def __init__(self, p: Plan, summary: Summary):
        from .serving.providers import Upstream

        self.p, self.s = p, summary
        cfg, judge = p.cfg, p.cfg.judge
        self.judge = judge
        self.cpt = cfg.routing.chars_per_token
        needed = providers_used(cfg, p.contenders)
        keys = {prov.name: key for prov, _, key in needed}
        tiers = [TierConfig(name=tier, providers=[prov]) for prov, tier, _ in needed]
        self.upstream = Upstream.apart(cfg, tiers, keys)
        by_name = {prov.name: prov for prov in self.upstream.providers()}
        self.chains = [[by_name[q.name] for q in c.providers] for c in p.contenders]
        self.judge_chain = [by_name[judge.provider.name]]
        self.sem = asyncio.Semaphore(p.concurrency)
        self.spend_changed = asyncio.Condition()
        self.reserved = 0.0  # the estimates of the calls in flight
        self.flying = 0  # calls in flight
        self.stopped = False
        self.bar = None
        self._shown = time.monotonic()  # when the progress line was last described (plain lines: every 10 s)

    # -- calls

    async def call(self, chain, messages: list[dict], max_tokens: int, estimate: float, **extra) -> str:
        """The text of the first answer down `chain`; CallFailed when none, Stop when the budget forbids the call."""
        from .serving.providers import NoAnswer

        async with self.sem:
            await self.afford(estimate)
            self.reserved += estimate
            self.flying += 1
            try:
                answer = await self.upstream.ask(
                    chain, {"messages": messages, "max_tokens": max_tokens, **extra}, self.cpt
                )
                self.s.spent += answer.billed.usd  # before its estimate is released
            except NoAnswer as e:
                raise CallFailed(str(e)) from None
            finally:
                self.reserved -= estimate
                self.flying -= 1
                async with self.spend_changed:
                    self.spend_changed.notify_all()
        if answer.text is None:
            raise CallFailed(f"{answer.provider.tier}/{answer.provider.name}: an answer with no text")
        return answer.text

    async def afford(self, estimate: float) -> None:
        """Return when a call of this estimate may start; Stop when it never may (it would pass --max-usd even with no
        call in flight) or the run is stopping. Calls in flight hold their estimates until they end."""
        while True:
            if self.stopped:
                raise Stop
            if self.p.max_usd is None or self.s.spent + self.reserved + estimate <= self.p.max_usd:
                return
            if not self.flying:
                self.stopped = self.s.budget_stop = True
                raise Stop
            async with self.spend_changed:
                await self.spend_changed.wait()

    async def answer(self, job: Job, c: int) -> str | Exception:
        """Contender `c`'s answer to the prompt (journaled); else the CallFailed or Stop that stopped it."""
        con = self.p.contenders[c]
        known = self.p.journal.answers.get((job.prompt_id, con.model))
        if known is not None:
            return known
        out_tokens = self.judge.answer_max_tokens
        estimate = con.providers[0].cost_usd(prompt_tokens([len(job.text)], self.cpt), out_tokens)
        try:
            text = await self.call(self.chains[c], [{"role": "user", "content": job.text}], out_tokens, estimate)
        except (CallFailed, Stop) as e:
            return e
        self.p.journal.add_answer(job.prompt_id, con.model, text)
        return text

    async def verdict(self, messages: list[dict]) -> str | Exception:
        estimate = self.judge.provider.cost_usd(chat_tokens(messages, self.cpt), self.judge.max_tokens)
        try:
            return await self.call(self.judge_chain, messages, self.judge.max_tokens, estimate, temperature=0)
        except (CallFailed, Stop) as e:
            return e

    # -- one prompt

    async def label(self, job: Job) -> None:
        p = self.p
        ref = len(p.contenders) - 1
        wanted = sorted({a for c in job.pending for a in needs(c, ref)})
        got = dict(zip(wanted, await asyncio.gather(*(self.answer(job, a) for a in wanted))))
        await asyncio.gather(*(self.grade(job, c, got) for c in job.pending))

    async def grade(self, job: Job, c: int, got: dict) -> None:
        p, mode, judge = self.p, self.p.mode, self.judge
        ref = len(p.contenders) - 1
        inputs = [got[a] for a in needs(c, ref)]
        if any(isinstance(x, Stop) for x in inputs):
            return  # not started: a rerun does it
        if failed := [x for x in inputs if isinstance(x, CallFailed)]:
            return self.failed(failed[0])
        if mode == "single":
            reference = None if c == ref else got[ref]
            results = [await self.verdict(single_messages(job.text, got[c], reference))]
        else:
            results = list(
                await asyncio.gather(
                    self.verdict(pairwise_messages(job.text, got[c], got[ref])),
                    self.verdict(pairwise_messages(job.text, got[ref], got[c])),
                )
            )
        if any(isinstance(x, Stop) for x in results):
            return
        if failed := [x for x in results if isinstance(x, CallFailed)]:
            return self.failed(failed[0])
        if mode == "single":
            score = parse_rating(results[0])
            parsed = [score]
            raw = None if score is None else f"{score * 9 + 1:g}"
        else:
            parsed = [parse_verdict(r) for r in results]
            score = None if None in parsed else pairwise_grade(*parsed)
            raw = "/".join(v or "?" for v in parsed)
        if score is None:
            self.s.unparseable += sum(x is None for x in parsed)
            self.s.unparseable_rows += 1
            return self.advance()
        row = {
            "prompt": job.text,
            "prompt_id": job.prompt_id,
            "model": p.contenders[c].model,
            "score": float(score),
            "source": SOURCES[mode],
            "judge": judge.provider.model,
            "baseline": p.contenders[ref].model if mode == "pairwise" else None,
            "raw": raw,
            "n": 0,
        }
        if p.journal.add_row(row):
            self.s.written += 1
        self.advance()

    def failed(self, e: CallFailed) -> None:
        self.s.failed += 1
        if len(self.s.failures) < 3 and str(e) not in self.s.failures:
            self.s.failures.append(str(e))
        self.advance()

    def advance(self) -> None:
        if self.bar is None:
            return
        self.bar.advance(1)
        now = time.monotonic()
        if progress_mode() == "live" or now - self._shown >= 10:
            self._shown = now
            self.bar.describe(self.describe())

    def describe(self) -> str:
        s = self.s
        return (
            f"labelling: {s.written - s.feedback} rows written, {s.failed} failed, {s.unparseable} unparseable, "
            f"${s.spent:.4f} spent"
        )

    # -- all of it

    async def run(self) -> None:
        jobs = iter(self.p.jobs)

        async def worker():
            for job in jobs:  # one iterator shared by the workers
                if self.stopped:
                    return
                await self.label(job)

        await self.upstream.start()
        try:
            with step(
                f"labelling {self.p.rows:,} rows of {len(self.p.jobs):,} prompts with {self.judge.provider.model} "
                f"({self.p.mode})",
                total=self.p.rows,
            ) as bar:
                self.bar = bar
                async with asyncio.TaskGroup() as tg:
                    for _ in range(min(self.p.concurrency, len(self.p.jobs))):
                        tg.create_task(worker())
                bar.describe(self.describe())
        finally:
            await self.upstream.stop()


def run(p: Plan) -> Summary:
    """Label what the plan holds; the output is written whatever happens (Ctrl-C included: `interrupted`)."""
    s = Summary(skipped=p.skipped, unreadable=p.journal.unreadable)
    labeller = Labeller(p, s)  # provider keys are read here: a missing one fails before anything is written
    p.journal.open()
    started = time.perf_counter()
    try:
        for row in p.earlier:
            p.journal.add_row(row)  # an earlier output's rows, if its journal was lost
        for row in p.feedback:
            if p.journal.add_row(row):
                s.written += 1
                s.feedback += 1
        if p.jobs:
            asyncio.run(labeller.run())
    except KeyboardInterrupt:
        s.interrupted = True
    finally:
        s.seconds = time.perf_counter() - started
        p.journal.close()
        try:
            s.total = write_graded(p.journal.rows.values(), p.out)
        except KeyboardInterrupt:  # a second Ctrl-C while writing: the journal still holds every row
            s.interrupted = True
            print(
                f"the output was not rewritten: the journal {p.journal.path} holds the rows; rerun to write it",
                file=sys.stderr,
            )
    return s
