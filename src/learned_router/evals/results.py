"""`evals/RESULTS.md`: leave-one-source-out on the chat sources first, then in-domain cross-validation on the exam
benchmarks, the router beside the baselines, the oracle, the targets and RouteLLM's numbers."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ValidationError

from ..errors import RouterError, first_error
from ..yamlfile import load_yaml
from .protocol import run_eval, verdict
from .report import LEVEL, RESAMPLES, markdown_table, span

# RouteLLM v4 (arXiv 2406.18665v4), Tables 2 and 3: best published router per benchmark (evals/routellm_published.md)
ROUTELLM_BEST = {
    "MMLU": {"router": "SW ranking, D_arena + D_gold (Table 2)", "apgr": 0.603, "cpt50": 0.3540, "cpt80": 0.7155},
    "GSM8K": {"router": "causal LLM, D_arena + D_judge (Table 3)", "apgr": 0.622, "cpt50": 0.3364, "cpt80": 0.6326},
}
ROWS = ("router", "difficulty", "prompt length", "kNN", "logistic", "random", "optimal")  # + the previous router's row
HIGH_ORACLE, FLOOR, MEAN_FLOOR, NOISE_MIN = 0.85, 0.60, 0.65, 300  # the leave-one-source-out targets


class Benchmark(BaseModel):
    name: str
    data: Path
    strong: str
    weak: str
    by: str = "prompt"
    routellm: str | None = None


class TierBenchmark(BaseModel):
    name: str
    data: Path
    tiers: list[str]  # cheapest first


class Previous(BaseModel):
    """A router shipped at an earlier commit, scored as it was shipped (its ONNX graph's one output, p_weak)."""

    commit: str
    path: str = "models/default"
    name: str = "previous router"


class LearningTable(BaseModel):
    name: str
    data: Path
    strong: str
    weak: str
    prior: str  # a key of LearningCurves.priors


class LearningCurves(BaseModel):
    """Two-level routers' learning curves: each table's prior is the recipe trained on the named shared sources,
    none of them the table's own."""

    sizes: list[int | str] = [100, 300, 1000, 3000, "all"]
    draws: int = 5
    priors: dict[str, list[str]]  # name -> source files (stems) in the data folder
    tables: list[LearningTable]


class Suite(BaseModel):
    router: Path = Path("models/default")
    prices: Path | None = None
    folds: int = 5
    previous: Previous | None = None
    benchmarks: list[Benchmark]
    tier_benchmarks: list[TierBenchmark] = []
    learning_curves: LearningCurves | None = None


def previous_scorer(previous: Previous, repo: Path):
    """p_weak of the previous router for a list of prompts, and the sources it was trained on. Its files come out of
    git history (`git show`) into the embedding cache folder; it is scored with onnxruntime and its tokenizer alone."""
    import json
    import subprocess

    import onnxruntime as ort
    from tokenizers import Tokenizer

    from ..embed import cache_dir

    folder = cache_dir() / f"previous-{previous.commit}"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("router.json", "tokenizer.json", "model.int8.onnx"):
        if not (folder / name).is_file():
            try:
                blob = subprocess.run(
                    ["git", "-C", str(repo), "show", f"{previous.commit}:{previous.path}/{name}"],
                    capture_output=True,
                    check=True,
                ).stdout
            except (OSError, subprocess.CalledProcessError) as e:
                raise RouterError(
                    f"previous router: cannot read {previous.path}/{name} at {previous.commit} from git ({e})"
                ) from None
            (folder / name).write_bytes(blob)
    manifest = json.loads((folder / "router.json").read_text())
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=manifest["encoder"]["max_seq_length"])
    session = ort.InferenceSession(str(folder / "model.int8.onnx"), providers=["CPUExecutionProvider"])

    def score(prompts: list[str]) -> np.ndarray:
        out = np.empty(len(prompts))
        for i, enc in enumerate(tok.encode_batch(prompts)):  # one prompt per call, as it was served
            ids = np.asarray([enc.ids], dtype=np.int64)
            out[i] = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0]
        return out

    return score, {d["name"] for d in manifest["data"]}


def load_suite(path: Path) -> Suite:
    data = load_yaml(path)
    try:
        return Suite.model_validate(data)
    except ValidationError as e:
        raise RouterError(f"{path}: {_first(e)}") from None


def _first(e: ValidationError) -> str:
    loc, msg = first_error(e)
    return f"field '{'.'.join(map(str, loc))}': {msg}"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def fmt(v, pct=False):
    return "–" if v is None else f"{v:.1%}" if pct else f"{v:.3f}"


def target_of(oracle: float | None) -> float | None:
    """The APGR a left-out source asks for: 0.60 where its oracle reaches 0.85, else half the way from random to it."""
    if oracle is None:
        return None
    return FLOOR if oracle >= HIGH_ORACLE else 0.5 + (oracle - 0.5) / 2


def ahead(m: dict) -> bool:
    lo = (m.get("lead_ci") or [None])[0]
    return lo is not None and lo == lo and lo > 0


def loso_lines(reports: list) -> list[str]:
    """The leave-one-source-out table: router, its difficulty output and the baselines, with each target's verdict."""
    lines = [
        f"| left-out source | pair | prompts | oracle | difficulty ceiling | target | router | {LEVEL:.0%} CI | "
        "difficulty | random | prompt length | kNN | logistic | previous router | verdict |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    high = []
    for b, _, r in reports:
        s = r["scorers"]
        oracle, mine = s["optimal"]["apgr"], s["router"]["apgr"]
        goal = target_of(oracle)
        misses = []
        if goal is not None and (mine or 0) < goal:
            misses.append(f"APGR below {goal:.3f}")
        if r["n_prompts"] >= NOISE_MIN:
            misses += [f"not ahead of {k} beyond noise" for k in ("prompt length", "kNN") if k in s and not ahead(s[k])]
        if oracle is not None and oracle >= HIGH_ORACLE:
            high.append(mine or 0)
        cells = [fmt(s.get(k, {}).get("apgr")) for k in ("difficulty", "random", "prompt length", "kNN", "logistic")]
        prev = next((k for k in s if k.startswith("previous router")), None)
        cells.append(
            "–" if prev is None else fmt(s[prev]["apgr"]) + (" (trained on it)" if "trained on it" in prev else "")
        )
        lines.append(
            f"| {b.name} | {r['strong']} vs {r['weak']} | {r['n_prompts']} | {fmt(oracle)} | {fmt(r.get('difficulty_ceiling'))} | "
            f"{fmt(goal)} | "
            f"**{fmt(mine)}** | {span(s['router'].get('apgr_ci'))} | "
            + " | ".join(cells)
            + f" | {'met' if not misses else '**missed: ' + '; '.join(misses) + '**'} |"
        )
    if high:
        mean = float(np.mean(high))
        lines += [
            "",
            f"Mean router APGR over the left-out sources whose oracle reaches {HIGH_ORACLE}: {mean:.3f} "
            f"(target {MEAN_FLOOR}: {'met' if mean >= MEAN_FLOOR else '**missed**'}).",
        ]
    return lines


def summary_lines(reports: list) -> list[str]:
    lines = [
        f"| benchmark | scorer | APGR | APGR {LEVEL:.0%} CI | APGR (RouteLLM) | CPT50 | CPT80 | cost saving @95% |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for b, _, r in reports:
        for name in (*ROWS, *(k for k in r["scorers"] if k.startswith("previous router"))):
            m = r["scorers"].get(name)
            if m is None:
                continue
            lines.append(
                f"| {b.name} | {name} | {fmt(m['apgr'])} | {span(m.get('apgr_ci'))} | {fmt(m['apgr_routellm'])} | "
                f"{fmt(m['cpt50'], True)} | {fmt(m['cpt80'], True)} | {fmt(m.get('cost_saving'), True)} |"
            )
        if b.routellm in ROUTELLM_BEST:
            p = ROUTELLM_BEST[b.routellm]
            lines.append(
                f"| {b.name} | RouteLLM best published: {p['router']} | – | – | {p['apgr']:.3f} | "
                f"{p['cpt50']:.1%} | {p['cpt80']:.1%} | – |"
            )
    return lines


def saved(folder: Path, name: str) -> dict:
    """A benchmark's report as an earlier run left it in `folder` (metrics.json)."""
    path = folder / "metrics.json"
    if not path.is_file():
        raise RouterError(
            f"--only: {name} was never run into {folder}; run `learned-router report` once without --only"
        )
    return json.loads(path.read_text())


def names_of(suite: Suite) -> list[str]:
    """What `report --only` can run: each benchmark and tier benchmark by name, and the learning curves."""
    return [
        *(b.name for b in suite.benchmarks),
        *(b.name for b in suite.tier_benchmarks),
        *(["learning-curves"] if suite.learning_curves else []),
    ]


def write_results(suite: Suite, out: Path, progress=print, only: str | None = None) -> Path:
    """Run every benchmark into out/results/<name>/ and write out/RESULTS.md. `only`: run that benchmark (or tier
    benchmark) alone, the others' figures read from their last run's metrics.json and the learning curves' section
    kept as RESULTS.md has it; 'learning-curves': that section alone, written anew."""
    from .protocol import BenchmarkEvaluator

    if only is not None and only not in names_of(suite):
        raise RouterError(f"--only: no {only!r} in the suite; one of: {', '.join(names_of(suite))}")
    if only == "learning-curves":
        return rewrite_learning_section(suite, out, progress)
    if only is not None:  # every other figure is at hand before anything runs
        for b in [*suite.benchmarks, *suite.tier_benchmarks]:
            if b.name != only:
                saved(out / "results" / slug(b.name), b.name)
    previous = previous_scorer(suite.previous, Path(__file__).resolve().parents[3]) if suite.previous else None
    reports = []
    for i, b in enumerate(suite.benchmarks, 1):
        folder = out / "results" / slug(b.name)
        if only is not None and b.name != only:
            reports.append((b, folder, saved(folder, b.name)))
            continue
        progress(f"[{i}/{len(suite.benchmarks)}] {b.name} (by {b.by})")
        evaluator = BenchmarkEvaluator.from_file(b.data, b.strong, b.weak, suite.prices, b.name)
        extra = {}
        if previous:
            seen = " (trained on it)" if evaluator.bench["source"].iloc[0] in previous[1] else ""
            extra = {f"{suite.previous.name}{seen}": previous[0](evaluator.prompts)}
        result = run_eval(suite.router, evaluator, folder, folds=suite.folds, by=b.by, extra=extra)
        reports.append((b, folder, result.report))
    loso = [x for x in reports if x[0].by == "source"]
    domain = [x for x in reports if x[0].by != "source"]
    lines = [
        "# Evaluation results",
        "",
        f"Generated by `learned-router report --config evals/benchmarks.yaml` on {dt.date.today()} for `{suite.router}`.",
        "Contaminated prompts dropped. Quality = mean grade of the routed answers. APGR is the area under the routed-",
        "quality curve over the whole 0-100% range of strong calls (exact curve, a point per distinct score); random",
        "routing gives 0.5 and `oracle` (`optimal`) is the physical limit. `router` routes with the pair's pass chance,",
        "`difficulty` with the model-agnostic output (1 - difficulty), the path for models the router was not trained on.",
        "",
        "## Leave one source out: chat traffic the router never saw",
        "",
        "Each row retrains the router's recipe on every other source (any prompt whose text the left-out source shares",
        "dropped too) and evaluates the left-out source for a GPT-4-class model against a weaker one. The kNN and",
        "logistic baselines learn the pair's own labels from the same training prompts (the pair-only recipe); the",
        "previous router is the one shipped before this recipe, scored as shipped (it trained on arena-bench-v1 and",
        "AlpacaEval 2, so on those rows it is not left out). Targets:",
        f"APGR >= {FLOOR} where the oracle reaches {HIGH_ORACLE} (their mean >= {MEAN_FLOOR}), else half the way from",
        f"random to the oracle; ahead of prompt length and kNN beyond noise where a source has >= {NOISE_MIN} prompts.",
        "`difficulty ceiling` routes by how the source's other graded models did on each prompt (it reads their",
        "answers): what a model-agnostic difficulty would reach if it were exact.",
        "",
        *loso_lines(loso),
        "",
        "## In domain: cross-validation on the exam benchmarks",
        "",
        *summary_lines(domain),
        "",
        "Published RouteLLM numbers: arXiv 2406.18665v4, Tables 2 (MMLU) and 3 (GSM8K); all rows and their",
        "sources in [routellm_published.md](routellm_published.md). RouteLLM trained on Chatbot Arena battles plus",
        "~1,500 MMLU validation questions (D_gold) or ~120k GPT-4-judged prompts (D_judge); it evaluates on every",
        f'clean prompt. Ours are cross-validated on the benchmark itself (see each protocol below). "APGR {LEVEL:.0%} CI":',
        f"percentile bootstrap over the benchmark's prompts ({RESAMPLES:,} resamples, the scores held fixed: the spread of",
        "the prompt sample, not of retraining).",
        "",
    ]
    for b, folder, r in reports:
        rel = folder.relative_to(out)
        lines += [
            f"## {b.name}",
            "",
            f"{r['n_prompts']} prompts, strong `{r['strong']}`, weak `{r['weak']}` "
            f"(all-weak quality {r['weak_mean']:.3f}, all-strong {r['strong_mean']:.3f}). Protocol: {r['protocol']}.",
            "",
            verdict(r),
            "",
        ]
        if b.routellm in ROUTELLM_BEST:
            lines += [versus_routellm(r, ROUTELLM_BEST[b.routellm]), ""]
        lines += [f"![{b.name} frontier]({rel}/frontier.png)", "", markdown_table(r), ""]
    if suite.tier_benchmarks:
        lines += tier_section(suite, out, progress, only)
    path = out / "RESULTS.md"
    if suite.learning_curves and only is not None:
        kept = path.read_text().partition(LEARNING_HEAD)[2] if path.is_file() else ""
        lines += [LEARNING_HEAD + kept.rstrip("\n")] if kept else learning_section(suite.learning_curves, out, progress)
    elif suite.learning_curves:
        lines += learning_section(suite.learning_curves, out, progress)
    path.write_text("\n".join(lines) + "\n")
    return path


LEARNING_HEAD = "## Your own grades: learning curves of two-level routers"


def learning_section(lc: LearningCurves, out: Path, progress) -> list[str]:
    """Per table: the top level fitted over a prior that never saw the table's source, at each training size."""
    from .learning import run_learning_curve, verdict
    from .protocol import BenchmarkEvaluator

    sizes = [None if s == "all" else int(s) for s in lc.sizes]
    lines = [
        LEARNING_HEAD,
        "",
        "`learned-router train --prior` keeps a router as the prior and fits a top level on the user's own grades",
        '(training/README.md, "Two levels"). Each table below plays the user\'s data: at each size, '
        f"{lc.draws} random draws of that many training prompts, scored on the same held-out prompts (30% of the",
        "table, never drawn). The prior is the recipe trained on shared sources other than the table's (listed",
        "per table), its prompts that the table shares dropped from the table. `kNN`, `ridge` (on the embedding",
        "and log length) and `prompt length` learn from the drawn prompts alone. Target: the two-level router at",
        "least the best other method's APGR - 0.01 at every size from 300 up and at the full size (however",
        "small); at the full size MMLU >= 0.70,",
        "GSM8K >= 0.66, AlpacaEval 2 >= 0.57, MMLU-Pro >= 0.60.",
        "",
    ]
    targets = {"routellm_mmlu": 0.70, "routellm_gsm8k": 0.66, "alpaca_eval": 0.57, "mmlu_pro": 0.60}
    for i, t in enumerate(lc.tables, 1):
        progress(f"[learning curve {i}/{len(lc.tables)}] {t.name}")
        prior = prior_router(t.prior, lc.priors[t.prior], Path(t.data).parent, Path(t.data).stem)
        folder = out / "results" / f"learning-{slug(t.name)}"
        evaluator = BenchmarkEvaluator.from_file(t.data, t.strong, t.weak, name=t.name)
        rows, text = run_learning_curve(prior, evaluator, sizes, lc.draws, folder, drop_seen=True, reuse=True)
        misses = [
            f"{r['size']:,}{' (all)' if r['all'] else ''}: {r['two-level']['apgr']:.3f} < best "
            f"{verdict(r)[0]:.3f} - 0.01"
            for r in rows
            if (r["size"] >= 300 or r["all"]) and not verdict(r)[1]
        ]
        full = next((r for r in rows if r["all"]), None)
        goal = targets.get(Path(t.data).stem)
        if goal is not None and full is not None and full["two-level"]["apgr"] < goal:
            misses.append(f"full size {full['two-level']['apgr']:.3f} below the target {goal}")
        lines += [
            f"### {t.name}",
            "",
            f"Prior `{t.prior}`: {', '.join(lc.priors[t.prior])}.",
            "",
            text,
            "",
            "Targets: " + ("met." if not misses else "**missed: " + "; ".join(misses) + "**"),
            "",
        ]
    return lines


def prior_router(name: str, sources: list[str], data_dir: Path, left_out: str) -> Path:
    """The recipe trained on `sources` (never `left_out`), cached by its data's fingerprints in the cache folder."""
    import hashlib

    from ..embed import cache_dir
    from ..manifest import RouterFolder
    from ..recipe import Recipe
    from ..train import train

    if left_out in sources:
        raise RouterError(f"learning curves: prior '{name}' is trained on {left_out}, the table it is evaluated on")
    paths = [data_dir / f"{s}.parquet" for s in sources]
    key = hashlib.sha256("".join(hashlib.sha256(p.read_bytes()).hexdigest() for p in paths).encode()).hexdigest()[:12]
    folder = cache_dir() / "priors" / f"{name}-{key}"
    if not (folder / RouterFolder.MANIFEST).is_file():
        train([str(p) for p in paths], folder, Recipe(), variants=["int8"], name=f"prior-{name}", overwrite=True)
    return folder


def rewrite_learning_section(suite: Suite, out: Path, progress=print) -> Path:
    """`report --only learning-curves`: the learning-curve section of an existing RESULTS.md written anew."""
    path = out / "RESULTS.md"
    if suite.learning_curves is None:
        raise RouterError("the suite has no learning_curves")
    text = path.read_text() if path.is_file() else ""
    head, _, _ = text.partition(LEARNING_HEAD)
    path.write_text(
        head.rstrip("\n") + "\n\n" + "\n".join(learning_section(suite.learning_curves, out, progress)) + "\n"
    )
    return path


def tier_section(suite: Suite, out: Path, progress, only: str | None = None) -> list[str]:
    """Multi-tier routing: the tier policy against each single model, the best two-model router and the oracle."""
    from .tiers import TierEvaluator, run_tier_eval, tier_table

    if suite.prices is None:
        raise RouterError("the suite's tier_benchmarks need 'prices': the multi-tier frontier is in dollars")
    lines = [
        "## Multi-tier routing",
        "",
        f"Router `{suite.router}`: each tier's pass chance against the top tier; policy: the cheapest tier whose pass",
        "chance clears the threshold, else the tier most likely to pass. The frontier is in dollars (prices of",
        "`evals/prices.yaml`; each call costs its prompt and its graded answer's own length, at characters / 4 tokens",
        "+ 4 for the prompt's message, as the service estimates them).",
        "Target: at the best single model's quality, at least 40% lower cost. `two-model` routes one cheaper tier",
        "against the best single model on the same pass chances; `oracle` is the physical limit.",
        "",
    ]
    for b in suite.tier_benchmarks:
        folder = out / "results" / slug(b.name)
        if only is not None and b.name != only:
            r = saved(folder, b.name)
        else:
            progress(f"[tiers] {b.name}")
            r = run_tier_eval(
                suite.router, TierEvaluator.from_file(b.data, b.tiers, suite.prices, b.name), folder, suite.folds
            )
        saving = r["scorers"]["router"]["saving_at_best_quality"]
        verdict = (
            "**Target not met: the router does not reach the best single model's quality.**"
            if saving is None
            else f"Saving at {r['best_single']}'s quality: {saving:.1%} "
            + ("(target met)." if saving >= 0.4 else "**(target of 40% not met)**.")
        )
        if r["above_router"]:
            verdict += (
                f" **Single models above the router's frontier (better quality at their own cost): "
                f"{', '.join(r['above_router'])}.**"
            )
        lines += [
            f"### {b.name}",
            "",
            f"{r['n_prompts']} prompts; {r['protocol']}.",
            "",
            verdict,
            "",
            f"![{b.name} frontier]({folder.relative_to(out)}/frontier.png)",
            "",
            tier_table(r),
            "",
        ]
    return lines


def versus_routellm(report: dict, published: dict) -> str:
    """Where RouteLLM's best published APGR falls against our router's bootstrap interval."""
    m = report["scorers"]["router"]
    head = (
        f"RouteLLM's best published router, {published['router']}: APGR {published['apgr']:.3f} in its own "
        f"convention; ours {fmt(m['apgr_routellm'])} in that convention, {fmt(m['apgr'])} exact"
    )
    if span(m.get("apgr_ci")) == "–":
        return f"{head} (no bootstrap interval on this set)."
    lo, hi = m["apgr_ci"]
    where = "above" if published["apgr"] > hi else "below" if published["apgr"] < lo else "inside"
    return f"{head}, {LEVEL:.0%} CI {span(m['apgr_ci'])}: the published figure is {where} our interval."
