"""Measure training recipes on held-out prompts: label policy, source mix and weights.

Head-only training on cached embeddings, so a whole grid takes minutes. For every recipe it prints the test-split
APGR per benchmark (prompts never trained on) and, with --loso, leave-one-source-out APGR (a source never trained on).

    python training/experiments.py --data-dir ../shared/datasets
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from learned_router.data import build_dataset, load_pair_map, load_source
from learned_router.embed import Encoder
from learned_router.evals import apgr, sweep
from learned_router.manifest import LabelPolicy
from learned_router.model import FitConfig, HeadConfig, fit_head

STRONG, WEAK = "gpt-4-1106-preview", "mistralai/Mixtral-8x7B-Instruct-v0.1"
FILES = ["routellm_mmlu", "routellm_gsm8k", "arena_bench_v1", "alpaca_eval", "alpaca_eval_v1"]
RECIPES = {
    "relative m=0, all sources": dict(policy=LabelPolicy(kind="relative", margin=0.0)),
    "relative m=0.1, all sources": dict(policy=LabelPolicy(kind="relative", margin=0.1)),
    "relative m=0.2, all sources": dict(policy=LabelPolicy(kind="relative", margin=0.2)),
    "absolute q=0.5, all sources": dict(policy=LabelPolicy(kind="absolute", min_score=0.5)),
    "absolute q=0.7, all sources": dict(policy=LabelPolicy(kind="absolute", min_score=0.7)),
    "relative m=0, no alpaca_v1": dict(policy=LabelPolicy(), drop=["alpaca_eval_v1"]),
    "relative m=0, open-ended x5": dict(policy=LabelPolicy(), weights={"arena_bench_v1": 5, "alpaca_eval": 5, "alpaca_eval_v1": 5}),
    "relative m=0, mmlu x0.3": dict(policy=LabelPolicy(), weights={"routellm_mmlu": 0.3}),
}


def held_out_apgr(df: pd.DataFrame, p: np.ndarray) -> float:
    """APGR of 1 - p_weak on rows with both scores (the routed quality uses the real grades)."""
    ok = df["weak_score"].notna().to_numpy()
    if ok.sum() < 20:
        return float("nan")
    w, s = df["weak_score"].to_numpy()[ok], df["strong_score"].to_numpy()[ok]
    return apgr(sweep(1 - p[ok], w, s, quantiles=None), w.mean(), s.mean())


def run(df, x, fit_rows, eval_sets, seed=0):
    tr, va = fit_rows
    head, _ = fit_head(HeadConfig(), x[tr], df["label"].to_numpy()[tr], df["weight"].to_numpy(float)[tr], x[va], df["label"].to_numpy()[va],
             FitConfig(seed=seed))
    return {name: held_out_apgr(df.iloc[rows], head.predict(x[rows])) for name, rows in eval_sets.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="../shared/datasets")
    ap.add_argument("--loso", action="store_true", help="also leave one source out of training")
    args = ap.parse_args()
    enc = Encoder()
    rows = []
    for name, r in RECIPES.items():
        srcs = [load_source(Path(args.data_dir) / f"{f}.parquet") for f in FILES if f not in r.get("drop", [])]
        for s in srcs:
            s.weight = r.get("weights", {}).get(s.name, 1.0)
        df = build_dataset(srcs, STRONG, WEAK, r["policy"], load_pair_map())
        x = enc.embed(df["prompt"].tolist(), progress=False)
        idx = {k: np.flatnonzero(df["split"].to_numpy() == k) for k in ("train", "val", "test")}
        test_sets = {s: np.intersect1d(idx["test"], np.flatnonzero(df["source"].to_numpy() == s)) for s in df["source"].unique()}
        res = run(df, x, (idx["train"], idx["val"]), test_sets)
        if args.loso:
            for s in ("arena_bench_v1", "alpaca_eval", "routellm_gsm8k"):
                src = df["source"].to_numpy() == s
                # held-out source: never trained on, and none of its prompt texts either
                other = ~np.isin(df["group"].to_numpy(), df.loc[src, "group"].to_numpy())
                res[f"loso:{s}"] = run(df, x, (np.flatnonzero(other & (df["split"].to_numpy() == "train")),
                                               np.flatnonzero(other & (df["split"].to_numpy() == "val"))),
                                      {s: np.flatnonzero(src & ~df["contaminated"].to_numpy())})[s]
        rows.append({"recipe": name, **{k: round(v, 3) for k, v in res.items()}})
        print(rows[-1], flush=True)
    print(pd.DataFrame(rows).set_index("recipe").to_markdown())


if __name__ == "__main__":
    main()
