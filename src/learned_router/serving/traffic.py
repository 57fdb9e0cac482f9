"""The traffic record (`traffic:` block): each chat request the service routed, and the client's feedback on it.

One row per chat request, written when its answer is complete (or has failed): its id (the x-request-id header),
time, client, the scored text (or only its sha256, or neither: `traffic.text`), pass chances, threshold, tier, rule,
task type, the router version that decided, provider, upstream model, billed tokens, cost, latency, outcome and the
request's data class. Requests of a data class listed in `traffic.never_record` are not written at all; those of any
other class are, but `export_traffic` never writes them out (a prompts file goes to every provider `label` calls).

The rows go to a sqlite file (WAL, so every process of a host can share it) from one writer thread: the event loop
only puts a row on a bounded queue. A full queue (a store stuck behind another process' lock) drops the row and counts
it (router_traffic_dropped_total); a failed write is retried, then dropped and counted. Retention: rows older than
`retention_days`, and the oldest beyond `max_rows`, are deleted with their feedback (checked every `PRUNE_EVERY` rows
and at start).

Feedback (POST /v1/feedback) goes through the same thread, after every row queued before it, so a client can send it
as soon as its answer is complete; a second score for a request replaces the first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path

from .config import TrafficConfig
from .errors import ConfigError

log = logging.getLogger("learned_router.serving")
PRUNE_EVERY = 1000
FEEDBACK_RETRY_S = 0.25
COLUMNS = (
    "id",
    "time",
    "client",
    "text",
    "text_sha256",
    "pass_chances",
    "threshold",
    "tier",
    "rule",
    "task_type",
    "router",
    "provider",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "latency_ms",
    "status",
    "outcome",
    "data_class",
)
SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (id TEXT PRIMARY KEY, time REAL NOT NULL, client TEXT, text TEXT, text_sha256 TEXT,
    pass_chances TEXT, threshold REAL, tier TEXT, rule TEXT, task_type TEXT, router TEXT, provider TEXT, model TEXT,
    prompt_tokens INTEGER, completion_tokens INTEGER, cost_usd REAL, latency_ms REAL, status INTEGER, outcome TEXT,
    data_class TEXT);
CREATE INDEX IF NOT EXISTS requests_time ON requests (time);
CREATE TABLE IF NOT EXISTS feedback (request_id TEXT PRIMARY KEY, score REAL NOT NULL, time REAL NOT NULL);
"""


def open_store(path: str | Path, timeout_s: float = 5.0, create: bool = True) -> sqlite3.Connection:
    """The traffic store's connection (its tables made when `create`); ConfigError naming the file when it cannot be used."""
    path = Path(path)
    try:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        elif not path.is_file():
            raise ConfigError(f"{path}: no traffic store there")
        db = sqlite3.connect(path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        if create:
            db.executescript(SCHEMA)
            if "data_class" not in {
                row[1] for row in db.execute("PRAGMA table_info(requests)")
            }:  # a store from before it
                db.execute("ALTER TABLE requests ADD COLUMN data_class TEXT")
        elif db.execute("SELECT 1 FROM sqlite_master WHERE name = 'requests'").fetchone() is None:
            raise ConfigError(f"{path}: not a traffic store (no requests table)")
        return db
    except (OSError, sqlite3.Error) as e:
        raise ConfigError(f"{path}: cannot be used as the traffic store ({e})") from None


class TrafficLog:
    """Writes request rows and feedback to the store from its own thread."""

    def __init__(self, cfg: TrafficConfig, on_drop=None):
        self.cfg = cfg
        self.never = frozenset(cfg.never_record)
        self.on_drop = on_drop or (lambda reason: None)
        self._db = open_store(cfg.store)
        self._queue: queue.Queue = queue.Queue(maxsize=cfg.queue_size)
        self._written = 0
        self._prune()
        self._thread = threading.Thread(target=self._run, name="router-traffic", daemon=True)
        self._thread.start()

    def text_fields(self, text: str) -> tuple[str | None, str | None]:
        """(text, sha256) as `traffic.text` keeps them."""
        if self.cfg.text == "none":
            return None, None
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        return (text if self.cfg.text == "full" else None), digest

    def record(self, row: dict, data_class: str | None) -> None:
        """Queue one request's row (never blocks; a full queue drops it and counts the drop)."""
        if data_class in self.never:
            return
        try:
            self._queue.put_nowait(("row", row, None))
        except queue.Full:
            self.on_drop("queue_full")

    async def feedback(self, request_id: str, client: str | None, score: float) -> bool:
        """Store a score for a recorded request of this client; False when there is none (unknown, another client's,
        expired or never recorded). A request answered by another process of the host may not be written yet: one
        more try after `FEEDBACK_RETRY_S`."""
        for wait in (0.0, FEEDBACK_RETRY_S):
            await asyncio.sleep(wait)
            fut: concurrent.futures.Future = concurrent.futures.Future()
            await asyncio.to_thread(self._queue.put, ("feedback", (request_id, client, score), fut))
            if await asyncio.wrap_future(fut):
                return True
        return False

    def close(self, flush_s: float = 5.0) -> None:
        try:
            self._queue.put(("stop", None, None), timeout=flush_s)
        except queue.Full:
            log.error("traffic: %d rows not written at shutdown", self._queue.qsize())
        self._thread.join(flush_s)
        if not self._thread.is_alive():
            self._db.close()

    def _run(self) -> None:
        while True:
            kind, item, fut = self._queue.get()
            if kind == "stop":
                return
            try:
                if kind == "row":
                    self._insert(item)
                else:
                    fut.set_result(self._feedback(*item))
            except Exception as e:  # a broken store must not stop the thread: drop, count, go on
                log.error("traffic store write failed: %s", e)
                if fut is not None:
                    fut.set_exception(e)
                else:
                    self.on_drop("write_failed")

    def _insert(self, row: dict) -> None:
        values = [row.get(c) for c in COLUMNS]
        values[COLUMNS.index("pass_chances")] = json.dumps(row.get("pass_chances"))
        for attempt in range(3):
            try:
                self._db.execute(f"INSERT OR REPLACE INTO requests VALUES ({', '.join('?' * len(COLUMNS))})", values)
                break
            except sqlite3.OperationalError:  # locked past the timeout by another process
                if attempt == 2:
                    raise
                time.sleep(0.1 * (attempt + 1))
        self._written += 1
        if self._written % PRUNE_EVERY == 0:
            self._prune()

    def _feedback(self, request_id: str, client: str | None, score: float) -> bool:
        found = self._db.execute("SELECT 1 FROM requests WHERE id = ? AND client IS ?", (request_id, client)).fetchone()
        if found is None:
            return False
        self._db.execute("INSERT OR REPLACE INTO feedback VALUES (?, ?, ?)", (request_id, score, time.time()))
        return True

    def _prune(self) -> None:
        db, cfg = self._db, self.cfg
        if cfg.retention_days is not None:
            db.execute("DELETE FROM requests WHERE time < ?", (time.time() - cfg.retention_days * 86400,))
        if cfg.max_rows is not None:
            db.execute(
                "DELETE FROM requests WHERE id IN (SELECT id FROM requests ORDER BY time DESC LIMIT -1 OFFSET ?)",
                (cfg.max_rows,),
            )
        db.execute("DELETE FROM feedback WHERE request_id NOT IN (SELECT id FROM requests)")


def export_traffic(
    store: Path, since: float | None = None, until: float | None = None, sample: int | None = None, seed: int = 0
):
    """The recorded requests with text and no data class (and their feedback) as a prompts table: prompt_id, prompt,
    time (UTC), client, tier, provider, model, router, outcome, feedback; and how many recorded requests were left out
    (hash-only, or of a data class)."""
    import pandas as pd

    db = open_store(store, create=False)
    try:
        where, args = ["1"], []
        if since is not None:
            where.append("r.time >= ?")
            args.append(since)
        if until is not None:
            where.append("r.time < ?")
            args.append(until)
        has_class = "data_class" in {row[1] for row in db.execute("PRAGMA table_info(requests)")}
        query = (
            "SELECT r.id AS prompt_id, r.text AS prompt, r.time, r.client, r.tier, r.provider, r.model, r.router, "
            f"r.outcome, {'r.data_class' if has_class else 'NULL'} AS data_class, f.score AS feedback "
            f"FROM requests r LEFT JOIN feedback f ON f.request_id = r.id "
            f"WHERE {' AND '.join(where)} ORDER BY r.time"
        )
        df = pd.read_sql_query(query, db, params=args)
    finally:
        db.close()
    left_out = df["prompt"].isna() | df["data_class"].notna()
    n_left_out = int(left_out.sum())
    df = df[~left_out].drop(columns="data_class")
    if sample is not None and sample < len(df):
        df = df.sample(n=sample, random_state=seed).sort_values("time")
    df["time"] = pd.to_datetime(df["time"], unit="s", utc=True)
    return df.reset_index(drop=True), n_left_out
