"""Scorer benchmark: latency and throughput of the ONNX router (fp32, int8; int8 with the prompt's task type when the
graph outputs its embedding) against sentence-transformers + torch.

All figures come from one run on one machine, so the ratios are comparable.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .scorer import Router

TEXT = (
    "The committee reviewed the proposal for the new regional transit line and asked the engineers to compare "
    "the projected ridership with the cost of tunnelling under the river, noting that earlier estimates had "
    "ignored maintenance, staffing and the price of electricity over the next thirty years of operation. "
)


def prompt_of(router: Router, n_tokens: int) -> str:
    """A prompt of about `n_tokens` encoder tokens (special tokens included)."""
    words = (TEXT * 20).split()
    lo, hi = 1, len(words)
    while lo < hi:
        mid = (lo + hi) // 2
        if router.n_tokens(" ".join(words[:mid])) < n_tokens:
            lo = mid + 1
        else:
            hi = mid
    return " ".join(words[:lo])


def timed(fn, repeats: int, warmup: int = 5) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = np.empty(repeats)
    for i in range(repeats):
        t = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t
    return out * 1000


def real_prompts(data_dir: Path, n: int) -> list[str]:
    """Up to n distinct prompts across the shared benchmarks, for the int8/fp32 agreement check."""
    frames = [pd.read_parquet(p, columns=["prompt"]).drop_duplicates() for p in sorted(Path(data_dir).glob("*.parquet"))]
    if not frames:
        return []
    per = max(1, n // len(frames))
    return pd.concat([f.sample(n=min(per, len(f)), random_state=0) for f in frames])["prompt"].tolist()


# The scorer's targets: p50 of one prompt on the bench's threads (1 by default), and int8/fp32 decision agreement.
TARGETS = {"p50 ms (~30 tok)": 2.0, "p50 ms (~250 tok)": 6.0, "int8 vs fp32 decision agreement": 0.99}
TOP_LEVEL, TOP_LEVEL_MS = "onnx int8 + top level (4,096 keys)", 1.0  # what a two-level router may add at ~30 tokens


def verdicts(table: pd.DataFrame, facts: dict) -> list[str]:
    """One line per target of the int8 scorer (the one the service runs): met or missed, with the figure."""
    lines = []
    for name, target in TARGETS.items():
        latency = name in table.columns  # a latency is at most its target; the agreement at least
        v = table.loc["onnx int8", name] if latency else facts.get(name)
        if v is None:
            continue
        ok = v <= target if latency else v >= target
        lines.append(f"target: onnx int8 {name.removeprefix('int8 ')} {'<=' if latency else '>='} {target:g}: "
                     f"{'met' if ok else 'MISSED'} ({v:.4g})")
    if TOP_LEVEL in table.index:
        added = table.loc[TOP_LEVEL, "p50 ms (~30 tok)"] - table.loc["onnx int8", "p50 ms (~30 tok)"]
        lines.append(f"target: the top level adds <= {TOP_LEVEL_MS:g} ms p50 at ~30 tok: "
                     f"{'met' if added <= TOP_LEVEL_MS else 'MISSED'} ({added:.3g})")
    return lines


def with_top_level(router: Router) -> Router:
    """`router` with a two-level router's top level at its largest: two models with the embedding ridge and a kernel
    over 4,096 keys (what `residual.fit` keeps for 4,096 or more labelled prompts, 100,000 included). Random keys:
    the cost does not depend on their values."""
    import copy

    from .residual import CENTROIDS, Choice, Residual

    rng = np.random.default_rng(0)
    dim = router.manifest.encoder.dim
    keys = rng.normal(size=(CENTROIDS, dim)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    out = copy.copy(router)  # the same onnxruntime session
    out.residual = Residual(models=[router.manifest.weak, router.manifest.strong], base=[router.manifest.weak, router.manifest.strong],
                            coef=rng.normal(size=(2, 3 + dim)).astype(np.float32) * 0.01, length_mean=4.0, length_std=1.0,
                            choice=Choice(True, 10.0, 0.05, 2.0, "pair APGR"), keys=keys,
                            sums=rng.normal(size=(CENTROIDS, 2)).astype(np.float32), counts=np.ones((CENTROIDS, 2), np.float32))
    return out


def run(router_dir: Path, threads: int = 1, repeats: int = 200, data_dir: Path | None = None) -> tuple[pd.DataFrame, dict]:
    import torch

    from .export import export
    from .model import QualityModel

    torch.set_num_threads(threads)  # onnxruntime's threads are each Router's; no environment variable is touched
    tmp = None
    if "fp32" not in Router(router_dir).manifest.files:  # the shipped router is int8 only: export fp32 beside it
        tmp = tempfile.TemporaryDirectory()
        export(router_dir, Path(tmp.name) / "fp32", variants=["fp32"])
    fp32_dir = Path(tmp.name) / "fp32" if tmp else router_dir
    routers = {"onnx int8": Router(router_dir, variant="int8", threads=threads),
               "onnx fp32": Router(fp32_dir, variant="fp32", threads=threads)}
    model = QualityModel.load(router_dir)

    def torch_score(prompts):
        with torch.inference_mode():
            return model.predict(prompts, batch_size=32, cache=False)

    scorers = {**{k: r.predict for k, r in routers.items()}, "sentence-transformers + torch": torch_score}
    r8 = routers["onnx int8"]
    if r8.has_embedding:  # the same onnxruntime call also yields the embedding: the type costs a (types x dim) product
        from .tasktypes import TaskClassifier, load_types, types_path

        classifier = TaskClassifier.build(load_types(types_path(router_dir)), r8.embed)
        scorers = {"onnx int8": r8.predict, "onnx int8 + task type": lambda p: classifier.classify(r8.predict(p).embedding), **scorers}
    top = with_top_level(r8)
    scorers[TOP_LEVEL] = top.predict
    short, long_ = prompt_of(routers["onnx int8"], 30), prompt_of(routers["onnx int8"], 250)
    batch = [f"{i}. {short}" for i in range(256)]
    rows = []
    for name, score in scorers.items():
        s = timed(lambda: score([short]), repeats)
        lg = timed(lambda: score([long_]), max(20, repeats // 4))
        tp = timed(lambda: score(batch), 3, warmup=1)
        rows.append({"scorer": name, "p50 ms (~30 tok)": np.median(s), "p99 ms (~30 tok)": np.percentile(s, 99),
                     "p50 ms (~250 tok)": np.median(lg), "p99 ms (~250 tok)": np.percentile(lg, 99),
                     "batch prompts/s (256 x ~30 tok)": len(batch) / (np.median(tp) / 1000)})
    table = pd.DataFrame(rows).set_index("scorer")
    base = table.loc["sentence-transformers + torch"]
    for col in ("p50 ms (~30 tok)", "p50 ms (~250 tok)"):
        table[f"speed-up vs torch, {col.split('(')[1][:-1]}"] = base[col] / table[col]
    facts = {"threads": threads, "short prompt tokens": routers["onnx int8"].n_tokens(short),
             "long prompt tokens": routers["onnx int8"].n_tokens(long_)}
    prompts = real_prompts(data_dir, 1000) if data_dir and Path(data_dir).is_dir() else []
    if prompts:
        t = routers["onnx int8"].default_threshold
        p8, p32 = routers["onnx int8"].pass_chance(prompts), routers["onnx fp32"].pass_chance(prompts)
        facts |= {"agreement prompts": len(prompts), "default threshold": t,
                  "int8 vs fp32 decision agreement": float(np.mean((p8 >= t) == (p32 >= t))),
                  "int8 vs fp32 max |dp|": float(np.max(np.abs(p8 - p32)))}
    if tmp:
        tmp.cleanup()
    return table, facts
