"""Calibrate a router to a traffic mix: its table of threshold <-> share of strong calls, from the user's own prompts.

The router's pass chances on a prompt file are split in two parts (by a seeded hash of each prompt's text, so copies
of a prompt stay together): a table fitted on one is checked on the other, where the share of strong calls each asked
share gives is measured; the table written is then fitted on every prompt. A prompt sent n times counts n times, as
its calls do.
The table (every output's, so each tier of a multi-tier config) replaces the one in the folder's router.json, and so
does the default threshold when a share is asked for: `routing.strong_fraction` (or the default) then gives that share
on this traffic. Torch-free.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from .errors import RouterError
from .manifest import Calibration, RouterFolder
from .scorer import Router

CHECKED_SHARES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MIN_PROMPTS = 20  # per half
MIN_TOKENS, MAX_TOKENS = 16, 512  # a budget the encoder's position embeddings hold


@dataclass
class CalibrationReport:
    prompts: int  # prompts (copies counted) the table written was fitted on
    fit: int  # of them, the part the checked table was fitted on
    held_out: int  # the rest, which it was checked on
    default_threshold: float
    asked: float | None  # the share asked for (the default threshold's), if any
    achieved: dict[str, dict[float, float]]  # output -> asked share -> share of strong calls on the held-out part


def halves(prompts: list[str], holdout: float, seed: int) -> np.ndarray:
    """True for the held-out prompts: a seeded hash of each prompt's text, so copies of a prompt stay on one side."""
    keys = [
        int.from_bytes(hashlib.sha256(f"{seed}:{p}".encode("utf-8", "surrogatepass")).digest()[:8], "big")
        for p in prompts
    ]
    return np.asarray(keys, dtype=np.float64) / 2.0**64 < holdout


def calibrate(
    router_path: str | os.PathLike,
    prompts: list[str],
    source: str,
    strong_fraction: float | None = None,
    holdout: float = 0.5,
    seed: int = 0,
    threads: int | None = None,
    max_seq_length: int | None = None,
) -> CalibrationReport:
    """Measure each share on the held-out prompts with a table fitted on the others; then write the table of every prompt
    (and the default threshold for `strong_fraction`, else for the share the old default gave) into router.json.
    `max_seq_length`: the router reads that many tokens from now on (router.json `encoder`), and is calibrated so."""
    if strong_fraction is not None and not 0.0 <= strong_fraction <= 1.0:
        raise RouterError(f"--strong-fraction must be in [0, 1], got {strong_fraction}")
    if not 0.0 < holdout < 1.0:
        raise RouterError(f"--holdout must be between 0 and 1 (exclusive), got {holdout}")
    distinct = list(dict.fromkeys(prompts))
    held = halves(prompts, holdout, seed)
    if min(held.sum(), (~held).sum()) < MIN_PROMPTS:
        raise RouterError(
            f"{source}: {len(prompts)} prompts give {int((~held).sum())} to fit and {int(held.sum())} to "
            f"check; calibrating needs at least {MIN_PROMPTS} on each side"
        )
    if max_seq_length is not None and not MIN_TOKENS <= max_seq_length <= MAX_TOKENS:
        raise RouterError(
            f"--max-seq-length must be between {MIN_TOKENS} and {MAX_TOKENS} tokens, got {max_seq_length}"
        )
    router = Router(router_path, threads=threads, max_seq_length=max_seq_length)
    row = {text: i for i, text in enumerate(distinct)}
    p = router.score(distinct)[[row[text] for text in prompts]]  # a prompt sent n times counts n times, as its calls do
    outputs = router.models
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    fitted = Calibration.of(p[~held], outputs, "the fit part")
    weak = router.manifest.weak
    old = router.manifest
    share = strong_fraction if strong_fraction is not None else old.strong_fraction_at(old.default_threshold)
    checked = sorted({*CHECKED_SHARES, round(share, 4)})
    achieved = {
        o: {f: float(np.mean(p[held, j] < fitted.threshold_for(f, o))) for f in checked} for j, o in enumerate(outputs)
    }
    table = Calibration.of(
        p, outputs, f"{source}: {len(prompts)} prompts (calibrated {when})"
    )  # checked: now all of them
    default = round(table.threshold_for(share, weak), 5)
    encoder = old.encoder.model_copy(update={"max_seq_length": router.max_seq_length})
    RouterFolder(router_path).write_manifest(
        old.model_copy(update={"calibration": table, "default_threshold": default, "encoder": encoder})
    )
    return CalibrationReport(
        prompts=len(prompts),
        fit=int((~held).sum()),
        held_out=int(held.sum()),
        default_threshold=default,
        asked=round(share, 4),
        achieved=achieved,
    )
