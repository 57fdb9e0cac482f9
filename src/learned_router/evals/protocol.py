"""The evaluation protocol: a graded benchmark, the router and baselines on the same unseen prompts, and the outputs.

Evaluations never score a prompt the router was trained on. `by`:
- "source": leave the benchmark's source out: the router's recipe is refit on every other source, without any
  prompt whose text is in the benchmark (AlpacaEval 1 and 2 share prompts, so leaving one out leaves both out);
- "prompt" or "category": k-fold cross-validation, each fold scored by a model refit without the fold's prompts;
- and a benchmark sharing no prompt with the router's training data is scored by the shipped ONNX router.
The kNN and logistic baselines learn the pair's own labels ("the weak answer is as good") from the same training
prompts, on the same embeddings: the pair-only recipe.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..data import Grades, canonical, group_of, load_grades, load_source, observations
from ..errors import DataError, RouterError
from ..outputs import Outputs, pass_chances
from ..prices import OUTPUT_TOKENS, Price, load_prices, message_tokens
from ..progress import step
from .baselines import knn_scores, logistic_scores, prompt_length_scores
from .plots import plot_frontier
from .report import LEVEL, RESAMPLES, evaluate, markdown_table

BASELINES = ("prompt length", "kNN", "logistic")
ANY = "*"  # as the weak model of a battles benchmark: whichever model the strong one met


@dataclass
class Prices:
    """A price file's prices (prices.py) by each model's canonical name; a call is its prompt as one message and an
    answer of the file's `output_tokens`, tokens estimated as the service does."""

    per_model: dict[str, Price] = field(default_factory=dict)
    output_tokens: int = OUTPUT_TOKENS

    @classmethod
    def load(cls, path: Path | None) -> "Prices | None":
        if path is None:
            return None
        table = load_prices(path)
        return cls({canonical(name): p for name, p in table.models.items()}, table.output_tokens)

    def cost(self, model: str, prompts: pd.Series) -> np.ndarray:
        if model not in self.per_model:
            raise DataError(f"no price for model '{model}'; priced models: {', '.join(sorted(self.per_model))}")
        return self.per_model[model].cost(message_tokens(prompts.str.len().to_numpy()), self.output_tokens)


def load_benchmark(path: Path, strong: str, weak: str) -> pd.DataFrame:
    """One row per prompt: prompt, group, category, source, the pair (weak may differ per prompt with `ANY`), and
    each side's quality: its grade (absolute), its grade against the source's baseline (the baseline itself 0.5), or
    a battle's outcome (1 won, 0.5 tie, 0 lost), and `others_q`: the mean grade of the source's other models on the
    prompt (NaN for battles between varying models). Contaminated prompts are dropped."""
    src = load_source(path)
    strong, weak = canonical(strong), weak if weak == ANY else canonical(weak)
    obs = observations(src)
    obs = obs[~obs["contaminated"]]
    if obs.empty:
        raise DataError(f"{path}: no prompt left to evaluate after dropping contaminated prompts")
    category = (
        src.table.drop_duplicates("prompt").set_index("prompt")["category"]
        if "category" in src.table.columns
        else pd.Series(dtype=object)
    )
    fixed = obs["opponent"].nunique() == 1 and src.scheme == "versus"  # every grade is against one baseline
    if src.scheme == "absolute" or fixed:
        graded = obs.groupby(["prompt", "model"])["grade"].mean().unstack()
        if fixed:
            graded[obs["opponent"].iloc[0]] = 0.5
        if weak == ANY:
            raise DataError(f"{path}: --weak '{ANY}' is for battles between varying models; name the weak model")
        missing = [m for m in (strong, weak) if m not in graded.columns]
        if missing:
            raise DataError(
                f"{path}: model(s) {', '.join(missing)} not graded there; models: {', '.join(sorted(graded.columns))}"
            )
        both = graded[[strong, weak]].dropna()
        rest = graded.loc[both.index].drop(
            columns=[strong, weak, *([obs["opponent"].iloc[0]] if fixed else [])], errors="ignore"
        )
        table = pd.DataFrame(
            {
                "prompt": both.index,
                "strong_model": strong,
                "weak_model": weak,
                "strong_q": both[strong].to_numpy(),
                "weak_q": both[weak].to_numpy(),
                "others_q": rest.mean(axis=1).to_numpy() if rest.shape[1] >= 2 else np.nan,
            }
        )
    else:  # battles between varying models: the ones between the pair (or the strong model and anyone)
        a_strong = (obs["model"] == strong) & ((obs["opponent"] == weak) | (weak == ANY))
        b_strong = (obs["opponent"] == strong) & ((obs["model"] == weak) | (weak == ANY))
        rows = obs[a_strong | b_strong]
        if rows.empty:
            raise DataError(f"{path}: no battle between '{strong}' and '{weak}'")
        q = np.where(a_strong[rows.index], rows["grade"], 1 - rows["grade"])
        table = (
            pd.DataFrame(
                {
                    "prompt": rows["prompt"].to_numpy(),
                    "strong_model": strong,
                    "weak_model": np.where(a_strong[rows.index], rows["opponent"], rows["model"]),
                    "strong_q": q,
                    "weak_q": 1 - q,
                }
            )
            .groupby("prompt", as_index=False, sort=True)
            .agg(
                strong_model=("strong_model", "first"),
                weak_model=("weak_model", "first"),
                strong_q=("strong_q", "mean"),
                weak_q=("weak_q", "mean"),
            )
            .assign(others_q=np.nan)
        )
    if table.empty:
        raise DataError(f"{path}: no prompt graded for both '{strong}' and '{weak}'")
    table["category"] = table["prompt"].map(category) if len(category) else None
    table["label"] = (table["weak_q"] >= table["strong_q"] - 1e-9).astype(np.int8)
    return table.assign(group=table["prompt"].map(group_of), source=src.name).reset_index(drop=True)


def folds_of(keys: pd.Series, k: int, seed: int = 0) -> np.ndarray:
    return keys.map(lambda g: int(hashlib.sha1(f"fold{seed}:{g}".encode()).hexdigest()[:8], 16) % k).to_numpy()


def pair_labels(grades: Grades, strong: str, weak: str) -> pd.DataFrame:
    """The training prompts on which both models were graded alike (absolute grades, or both against one baseline):
    prompt, label (1: the weak answer is at least as good), target (a tie 0.5)."""
    obs = grades.only("train")
    rows = []
    for (_, opponent), part in obs.fillna({"opponent": ""}).groupby(["source", "opponent"]):
        g = part.groupby(["prompt", "model"])["grade"].mean().unstack()
        if opponent and opponent in (strong, weak):
            g[opponent] = 0.5
        if strong in g.columns and weak in g.columns:
            both = g[[strong, weak]].dropna()
            rows.append(
                pd.DataFrame(
                    {"prompt": both.index, "weak_q": both[weak].to_numpy(), "strong_q": both[strong].to_numpy()}
                )
            )
    if not rows:
        return pd.DataFrame(columns=["prompt", "label", "target"])
    t = pd.concat(rows).groupby("prompt", as_index=False).mean()
    t["label"] = (t["weak_q"] >= t["strong_q"] - 1e-9).astype(np.int8)
    t["target"] = np.where(np.abs(t["weak_q"] - t["strong_q"]) < 1e-9, 0.5, t["label"])
    return t


def router_pass_chance(bench: pd.DataFrame, outputs: Outputs) -> np.ndarray:
    """Each benchmark prompt's weak pass chance for its own pair; a pair the router does not know gets `generic`."""
    col = {m: i for i, m in enumerate(outputs.models)}
    quality = outputs.quality
    out = 1.0 - outputs.difficulty.astype(float)
    rows = np.arange(len(bench))
    known = bench["weak_model"].isin(col).to_numpy() & bench["strong_model"].isin(col).to_numpy()
    if known.any():
        w = bench["weak_model"][known].map(col).to_numpy()
        s = bench["strong_model"][known].map(col).to_numpy()
        out[known] = pass_chances(quality[rows[known], w], quality[rows[known], s])
    return out


def baseline_scores(train: Grades, bench: pd.DataFrame, enc, strong: str, weak: str, fallback: tuple[str, str]) -> dict:
    """kNN and logistic regression on the pair's own labels in the training prompts (the recipe's default pair where
    the benchmark's pair is graded on fewer than 20 of them), as p_weak."""
    labels = pair_labels(train, strong, weak)
    if len(labels) < 20 or labels["label"].nunique() < 2:
        labels = pair_labels(train, *fallback)
    if len(labels) < 20 or labels["label"].nunique() < 2:
        return {}
    x_train = enc.embed(labels["prompt"].tolist(), progress=False)
    x_bench = enc.embed(bench["prompt"].tolist(), progress=False)
    y = labels["label"].to_numpy()
    return {"kNN": 1 - knn_scores(x_train, y, x_bench), "logistic": 1 - logistic_scores(x_train, y, x_bench)}


def refit_scores(bench: pd.DataFrame, grades: Grades, enc, recipe, folds: np.ndarray) -> dict[str, np.ndarray]:
    """p_weak of the recipe (its pair's pass chance, and 1 - difficulty) and the baselines for every benchmark prompt,
    each fold from models fit without its prompts."""
    from ..train import fit

    strong, weak = bench["strong_model"].iloc[0], bench["weak_model"].iloc[0]
    out = {name: np.full(len(bench), np.nan) for name in ("router", "difficulty", "kNN", "logistic")}
    parts = np.unique(folds)
    for k, f in enumerate(parts, 1):
        held = np.flatnonzero(folds == f)
        fold = f"fold {k}/{len(parts)}" if len(parts) > 1 else "leave one source out"
        train = grades.without(set(bench["group"].iloc[held]))
        with step(f"{fold}: fitting the recipe without {len(held):,} benchmark prompts", total=recipe.steps) as bar:
            model = fit(train, enc, recipe, lambda i, loss: bar.advance())
        outputs = model.predict(bench["prompt"].iloc[held].tolist())
        out["router"][held] = router_pass_chance(bench.iloc[held], outputs)
        out["difficulty"][held] = 1.0 - outputs.difficulty
        with step(f"{fold}: baselines (kNN, logistic)"):
            fitted = baseline_scores(train, bench.iloc[held], enc, strong, weak, (recipe.strong, recipe.weak))
        for name, p in fitted.items():
            out[name][held] = p
    return {k: v for k, v in out.items() if not np.isnan(v).any()}


def difficulty_ceiling(bench: pd.DataFrame) -> float | None:
    """APGR of routing by how the source's other models did on each prompt (`others_q`, the lowest first to the
    strong model): what a model-agnostic difficulty output would reach if it were exact. A prompt no other model
    answered counts as average; None where the source has no other models (battles)."""
    from .frontier import apgr, sweep

    others = bench["others_q"]
    if others.isna().all():
        return None
    weak, strong = bench["weak_q"].to_numpy(), bench["strong_q"].to_numpy()
    return apgr(sweep(-others.fillna(others.mean()).to_numpy(), weak, strong, None), weak.mean(), strong.mean())


@dataclass
class EvalResult:
    report: dict
    protocol: str
    n_prompts: int
    not_beaten: list[str]


@dataclass(frozen=True)
class BenchmarkEvaluator:
    """The frontier figures of a graded benchmark's pair (APGR, CPT, cost, calibration, the bootstrap intervals and
    the reference curves), for the weak pass chances of any set of scorers on its prompts. `run_eval` is handed one
    and gives it the router's and the baselines' pass chances from models that never saw the prompts."""

    bench: pd.DataFrame  # load_benchmark's rows
    strong: str
    weak: str
    name: str
    data: str
    costs: dict[str, np.ndarray] | None = None  # per-prompt dollars of each side, where the pair is priced

    @classmethod
    def from_file(
        cls, data: Path, strong: str, weak: str, prices: Path | None = None, name: str | None = None
    ) -> "BenchmarkEvaluator":
        with step(f"reading {Path(data).name}"):
            bench = load_benchmark(data, strong, weak)
        pair = (canonical(strong), weak if weak == ANY else canonical(weak))
        priced = Prices.load(prices)
        costs = None
        if priced and all(m in priced.per_model for m in pair):  # unpriced pairs get no cost columns
            costs = {"strong": priced.cost(pair[0], bench["prompt"]), "weak": priced.cost(pair[1], bench["prompt"])}
        return cls(bench, pair[0], pair[1], name or Path(data).stem, str(data), costs)

    @property
    def prompts(self) -> list[str]:
        return self.bench["prompt"].tolist()

    def __call__(self, p_weak: dict[str, np.ndarray], lead: str = "router") -> dict:
        """The report of every scorer (p_weak per prompt, `lead`'s first), prompt length added, with the scorers
        that `lead` does not beat on APGR."""
        scores = {
            lead: 1 - p_weak[lead],
            "prompt length": prompt_length_scores(self.prompts),
            **{k: 1 - v for k, v in p_weak.items() if k != lead},
        }
        with step(f"metrics of {len(scores)} scorers, {RESAMPLES:,} bootstrap resamples"):
            report = evaluate(
                scores,
                self.bench["weak_q"].to_numpy(),
                self.bench["strong_q"].to_numpy(),
                cost_per_call=self.costs,
                labels=self.bench["label"].to_numpy(),
                p_weak=p_weak,
                routellm_random=True,
                lead_of=lead,
            )
        mine = report["scorers"][lead]["apgr"]
        return report | {
            "benchmark": self.name,
            "data": self.data,
            "strong": self.strong,
            "weak": self.weak,
            "difficulty_ceiling": difficulty_ceiling(self.bench),
            "not_beaten": [b for b in scores if b != lead and (report["scorers"][b]["apgr"] or 0) >= (mine or 0)],
            "pairs": int(len(self.bench.groupby(["strong_model", "weak_model"]).size())),
        }


def recipe_scores(
    router_dir: Path, bench: pd.DataFrame, folds: int, by: str, data_dir: Path | None
) -> tuple[str, dict[str, np.ndarray]]:
    """The protocol's words and the p_weak of a router trained by the recipe (its checkpoint's record) and of the
    baselines on the benchmark's prompts, never on a prompt the scorer trained on."""
    from ..embed import Encoder
    from ..manifest import RouterFolder
    from ..recipe import Recipe
    from ..scorer import Router

    folder = RouterFolder(router_dir)
    manifest, record = folder.manifest(), folder.record()
    recipe = Recipe.from_dict(record.recipe)
    enc = Encoder(record.encoder_path, record.encoder.max_seq_length, record.encoder.layers)
    with step("checking the encoder's weights"):
        fingerprint = enc.fingerprint
    if fingerprint != record.encoder.fingerprint:
        raise RouterError(
            f"{router_dir} was trained on another encoder (weights sha256 {record.encoder.fingerprint[:12]}…) "
            f"than {enc.path} ({enc.fingerprint[:12]}…)"
        )
    paths = list(
        dict.fromkeys(Path(d["path"]) for d in record.data)
    )  # a file of several sources is listed once per source
    if data_dir:  # the training files, found by name in another folder
        paths = [Path(data_dir) / p.name for p in paths]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise RouterError(
            f"the router's training data is needed to keep evaluation prompts unseen and to fit the "
            f"baselines, but {', '.join(missing)} is missing; pass --data-dir with those files"
        )
    with step(f"reading the router's {len(paths)} training file{'s' * (len(paths) > 1)}"):
        grades = load_grades(
            paths,
            {d["name"]: d["weight"] for d in record.data},
            recipe.val,
            recipe.test,
            recipe.seed,
            recipe.max_prompts,
        )
    if by == "source":
        grades = Grades(grades.obs[grades.obs["source"] != bench["source"].iloc[0]], grades.sources)
        shared = int(bench["group"].isin(set(grades.obs["group"])).sum())
        protocol = (
            f"leave one source out: the router's recipe and the baselines are refit on every other source, "
            f"without the {shared} of these {len(bench)} prompts that another training source shares"
        )
        p = refit_scores(bench, grades, enc, recipe, np.zeros(len(bench), dtype=int))
    elif (seen := bench["group"].isin(set(grades.obs["group"]))).any():
        keys = bench["category"].fillna("") if by == "category" else bench["group"]
        fold = folds_of(keys, folds)
        if len(np.unique(fold)) < 2:
            raise DataError(f"cross-validation needs at least 2 non-empty folds; '{by}' gave {len(np.unique(fold))}")
        protocol = (
            f"{folds}-fold cross-validation by {by} ({int(seen.sum())} of {len(bench)} prompts are in the "
            f"router's training data): the router's recipe and the baselines are refit per fold without the fold's prompts"
        )
        p = refit_scores(bench, grades, enc, recipe, fold)
    else:
        protocol = "the shipped router on prompts it never saw; baselines fit on its training prompts"
        with step(f"scoring {len(bench):,} prompts with the shipped router"):
            outputs = Router(router_dir).predict(bench["prompt"].tolist())
        p = {"router": router_pass_chance(bench, outputs), "difficulty": 1.0 - outputs.difficulty}
        with step("baselines (kNN, logistic)"):
            p |= baseline_scores(
                grades,
                bench,
                enc,
                bench["strong_model"].iloc[0],
                bench["weak_model"].iloc[0],
                (manifest.strong, manifest.weak),
            )
    return protocol, p


def run_eval(
    router_dir: Path,
    evaluator: BenchmarkEvaluator,
    out: Path,
    folds: int = 5,
    by: str = "prompt",
    data_dir: Path | None = None,
    extra: dict[str, np.ndarray] | None = None,
    against: Path | None = None,
) -> EvalResult:
    """Evaluate a router folder on the evaluator's benchmark; writes metrics.json, frontier.png and table.md into
    `out`. `extra`: more scorers (p_weak per benchmark prompt, in the benchmark's order). `against`: another router
    folder (e.g. the one in service), scored as it is on the same prompts."""
    from ..manifest import RouterFolder
    from ..scorer import Router

    if by not in ("prompt", "category", "source"):
        raise RouterError(f"--by must be 'prompt', 'category' or 'source', got {by!r}")
    if folds < 2:
        raise RouterError(f"--folds must be at least 2, got {folds}")
    bench = evaluator.bench
    manifest = RouterFolder(router_dir).manifest()
    if manifest.residual is not None:
        from .learning import two_level_folds

        protocol = (
            f"{folds}-fold cross-validation by prompt: the top level is refit over its prior "
            f"({manifest.residual.prior}) per fold without the fold's prompts, the baselines on the same folds"
        )
        p = two_level_folds(Path(manifest.residual.prior_path), bench, folds_of(bench["group"], folds))
    else:
        protocol, p = recipe_scores(router_dir, bench, folds, by, data_dir)
    p |= extra or {}
    if against is not None:
        with step(f"scoring {len(bench):,} prompts with {against}"):
            p[f"router {Path(against).name}"] = router_pass_chance(bench, Router(against).predict(evaluator.prompts))
    report = evaluator(p) | {
        "router": str(router_dir),
        "protocol": protocol,
        "by": by,
        "generic_share": float(1 - bench["weak_model"].isin(manifest.models).mean()) if by != "source" else None,
    }
    with step(f"writing {out}"):
        write_outputs(report, Path(out))
    return EvalResult(report, protocol, len(bench), report["not_beaten"])


def thinned(curve: dict, most: int = 500) -> dict:
    """At most `most` of the curve's own points (ends kept), values rounded: metrics.json stays small on big benchmarks."""
    n = len(curve["strong_fraction"])
    keep = sorted(set(np.linspace(0, n - 1, min(n, most)).round().astype(int)))
    return {
        k: None if v is None else [None if v[i] is None else round(v[i], 6) for i in keep] for k, v in curve.items()
    }


def write_outputs(report: dict, out: Path) -> None:
    """metrics.json (curves thinned), frontier.png (full curves) and table.md."""
    out.mkdir(parents=True, exist_ok=True)
    plot_frontier(
        report,
        out / "frontier.png",
        benchmark=report["benchmark"],
        strong_model=report["strong"],
        weak_model=report["weak"],
    )
    light = {**report, "curves": {k: {kind: thinned(c) for kind, c in v.items()} for k, v in report["curves"].items()}}
    (out / "metrics.json").write_text(json.dumps(light, indent=1, allow_nan=False) + "\n")
    (out / "table.md").write_text(
        f"### {report['benchmark']}: {report['strong']} vs {report['weak']}\n\n"
        f"{report['n_prompts']} prompts; {report['protocol']}.\n\n{markdown_table(report)}\n\n{verdict(report)}\n"
    )


def verdict(report: dict) -> str:
    """Whether the router beats each baseline on APGR, and which leads the bootstrap interval of the difference
    tells apart from resampling noise."""
    line = (
        "The router beats every non-oracle baseline on APGR."
        if not report["not_beaten"]
        else f"**The router does not beat {', '.join(report['not_beaten'])} on APGR here.**"
    )
    side = {"ahead of": [], "behind": [], "not distinguishable from": []}
    for b, m in report["scorers"].items():
        if m["reference"] or b == "router":
            continue
        lo, hi = m.get("lead_ci") or (None, None)
        side["ahead of" if (lo or 0) > 0 else "behind" if (hi or 0) < 0 else "not distinguishable from"].append(b)
    parts = [f"{k} {', '.join(v)}" for k, v in side.items() if v]
    return (
        f"{line} Beyond resampling noise (the {LEVEL:.0%} bootstrap interval of the APGR difference, paired over "
        f"{RESAMPLES} resamples of the prompts, excludes 0): {'; '.join(parts)}."
    )
