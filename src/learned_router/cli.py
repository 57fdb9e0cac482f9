"""`learned-router`: train | export | score | bench (and the service commands)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
import re
import sys
import typing
from importlib import metadata
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .errors import RouterError, not_a_file, shown
from .progress import quiet as quieted
from .progress import no_library_bars, step
from .recipe import Recipe

app = typer.Typer(
    help="A learned LLM router: train it, export it to ONNX, score prompts, evaluate and serve it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # click's plain help: a flag gets no value label
)


class StderrLines(logging.Handler):
    """The package's warnings as 'warning: ...' lines on whatever stderr is when they are logged."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(f"{record.levelname.lower()}: {record.getMessage()}", err=True)


STDERR_LINES = StderrLines(logging.WARNING)


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"learned-router {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=show_version, help="Print the version and exit.")
    ] = False,
):
    package = logging.getLogger("learned_router")
    if STDERR_LINES not in package.handlers:
        package.addHandler(STDERR_LINES)


Quiet = Annotated[
    bool,
    typer.Option(
        "--quiet", "-q", help="No progress (there is none in CI either; plain lines when stderr is not a terminal)."
    ),
]


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(code)


def user_errors(fn):
    """Print RouterError, a missing optional dependency and what the OS refused (a name too long, no permission) as
    one line and exit 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RouterError as e:
            fail(str(e))
        except ModuleNotFoundError as e:
            fail(missing_module(e.name))
        except OSError as e:
            fail(os_error(e))

    return wrapper


def os_error(e: OSError) -> str:
    """'FILE: the OS's reason', the file name cut as `shown` cuts it."""
    if e.filename is None or not e.strerror:
        return str(e)
    return f"{shown(e.filename)}: {e.strerror}"


def missing_module(name: str | None) -> str:
    """One line for a module that is not installed, with the extra of this package that installs it, if one does."""
    name = name or "a module"
    top = name.partition(".")[0]
    for req in metadata.requires("learned-router") or []:
        dist, extra = re.match(r"[A-Za-z0-9._-]+", req)[0], re.search(r"extra == .(\w+)", req)
        if extra and dist.lower().replace("-", "_") == {"sklearn": "scikit_learn"}.get(top, top):
            first = " (torch==2.13.0 first: an unpinned torch pulls CUDA)" if extra[1] == "train" else ""
            return f"{name} is not installed: this command needs pip install 'learned-router[{extra[1]}]'{first}"
    return f"{name} is not installed"


# ---- commands (core) --------------------------------------------------------------------------


def parse_weights(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, value = pair_option(item, "--weight", "SOURCE=NUMBER")
        try:
            out[name] = float(value)
        except ValueError:
            raise RouterError(f"--weight expects SOURCE=NUMBER, got {item!r}") from None
    return out


def pair_option(item: str, option: str, shape: str) -> tuple[str, str]:
    """NAME=VALUE of a repeatable option; RouterError naming the option otherwise."""
    name, sep, value = item.partition("=")
    if not (sep and name.strip() and value.strip()):
        raise RouterError(f"{option} expects {shape}, got {item!r}")
    return name.strip(), value.strip()


def parse_sizes(text: str) -> list[int | None]:
    """'100,300,all' -> [100, 300, None]."""
    out = []
    for item in names_of(text):
        if item == "all":
            out.append(None)
        elif item.isdigit() and int(item) >= 20:
            out.append(int(item))
        else:
            raise RouterError(f"--learning-curve: expected sizes of at least 20 or 'all', got {item!r}")
    if not out:
        raise RouterError("--learning-curve: name at least one size")
    return out


def names_of(text: str) -> list[str]:
    """A comma-separated option as a list, blanks dropped."""
    return [s.strip() for s in text.split(",") if s.strip()]


def parity_line(manifest) -> str:
    """Each exported variant's verdict against the torch model, with the figures a user feels."""
    check, p = manifest.check, manifest.parity
    if check is None:
        return "not checked (router.json keeps no probe outputs; re-export it)"
    parts = []
    for v, ok in check.passed.items():
        apgr = f", APGR {p[f'{v}_apgr_shift']:+.4f}" if f"{v}_apgr_shift" in p else ""
        parts.append(
            f"{v} {'passed' if ok else 'left out'} (mean |dq| {p[f'{v}_mean_abs_diff']:.4f}, strong share "
            f"{p[f'{v}_strong_share_shift']:+.3f}{apgr})"
        )
    return f"{'; '.join(parts)} on {int(p['probes'])} prompts, {check.cpu}"


def recipe_options(fn):
    """Give a command one option per `Recipe` field (its default and help from the dataclass; lists as
    comma-separated text) and call it with the `recipe` they make."""
    hints = typing.get_type_hints(Recipe)
    extra = []
    for f in dataclasses.fields(Recipe):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = hints[f.name]
        if typing.get_origin(kind) is list:
            kind, default = str, ",".join(default)
        elif type(None) in typing.get_args(kind):
            kind = Optional[next(a for a in typing.get_args(kind) if a is not type(None))]
        extra.append(
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=default,
                annotation=Annotated[kind, typer.Option(help=f.metadata["help"])],
            )
        )
    lists = {f.name for f in dataclasses.fields(Recipe) if typing.get_origin(hints[f.name]) is list}

    @functools.wraps(fn)
    def wrapper(**kwargs):
        values = {f.name: kwargs.pop(f.name) for f in dataclasses.fields(Recipe)}
        values |= {k: names_of(values[k]) for k in lists}
        return fn(recipe=Recipe(**values), **kwargs)

    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "recipe"]
    wrapper.__signature__ = inspect.Signature(own + extra)
    wrapper.__annotations__ = {}  # the signature holds them all
    return wrapper


Variants = Annotated[str, typer.Option(help="ONNX variants to export: fp32, int8 or both.")]


@app.command()
@user_errors
@recipe_options
def train(
    data: Annotated[
        list[Path],
        typer.Option("--data", help="Graded answers (parquet/JSONL/CSV, long or battles); repeat to mix sources."),
    ],
    out: Annotated[Path, typer.Option(help="Router folder to write (checkpoint + ONNX export).")],
    recipe: Recipe,
    weight: Annotated[
        list[str], typer.Option("--weight", help="SOURCE=W: multiply that source's weight in the fit (default 1).")
    ] = [],
    variants: Variants = "fp32,int8",
    name: Annotated[Optional[str], typer.Option(help="Router and MLflow run name (default: the folder name).")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "learned-router",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing router folder.")] = False,
    prior: Annotated[
        Optional[Path],
        typer.Option(
            help="A router folder to keep as the prior: fit only a top level on "
            "--data over its graph (minutes, no torch); of the recipe, only "
            "--strong, --weak, --default-strong-fraction and --seed apply."
        ),
    ] = None,
    device: Annotated[
        str,
        typer.Option(
            help="Where the prompts are embedded: auto (CUDA when torch sees it), cpu or "
            "cuda; the embedding cache is shared."
        ),
    ] = "auto",
    eval_data: Annotated[
        list[Path],
        typer.Option(
            "--eval",
            help="A graded table to score the router on for --weak vs "
            "--strong, its --data prompts left out (APGR with a 95% interval, in "
            "MLflow and router.json metrics); repeat for several.",
        ),
    ] = [],
    quiet: Quiet = False,
):
    """Train a router on graded answers of many models, export it to ONNX and log the run to MLflow."""
    import mlflow

    from .evaluator import RoutingEvaluator
    from .tracking import run_link
    from .train import train as run_training

    chosen = names_of(variants)
    bad = [v for v in chosen if v not in ("fp32", "int8")]
    if bad or not chosen:
        raise RouterError(f"--variants: expected fp32, int8 or both, got {variants!r}")
    if device not in ("auto", "cpu", "cuda"):
        raise RouterError(f"--device: expected auto, cpu or cuda, got {device!r}")
    with quieted(quiet):
        evaluators = [RoutingEvaluator.from_file(path, recipe.weak, recipe.strong) for path in eval_data]
        if prior is not None:
            from .prior import train_on_prior

            manifest, run_id = train_on_prior(
                prior,
                [str(d) for d in data],
                out,
                recipe.strong,
                recipe.weak,
                recipe.default_strong_fraction,
                name,
                experiment,
                overwrite,
                recipe.seed,
                evaluators,
            )
        else:
            manifest, run_id = run_training(
                [str(d) for d in data],
                out,
                recipe,
                weights=parse_weights(weight),
                variants=chosen,
                name=name,
                experiment=experiment,
                overwrite=overwrite,
                device=device,
                evaluators=evaluators,
            )
    typer.echo(f"router for {len(manifest.models)} models written to {out}")
    if manifest.residual is not None:
        r = manifest.residual
        typer.echo(
            f"top level over {r.prior} for {', '.join(r.models)} on {r.prompts:,} prompts; cross-validation "
            f"({r.objective}) chose: prior term {'in' if r.use_base else 'out'}, embedding ridge {r.ridge}, kernel "
            f"width {r.width}, shrink {r.shrink}"
        )
    typer.echo(
        f"default threshold {manifest.default_threshold} ({manifest.weak} vs {manifest.strong}); against "
        f"the torch model: {parity_line(manifest)}"
    )
    for key in sorted(k for k in manifest.metrics if k.endswith("_apgr")):
        m, stem = manifest.metrics, key[: -len("_apgr")]
        typer.echo(
            f"{stem}: APGR {m[key]:.3f} (95% {m[stem + '_apgr_low']:.3f} to {m[stem + '_apgr_high']:.3f}) on "
            f"{int(m[stem + '_prompts'])} graded prompts it did not train on"
        )
    run = mlflow.get_run(run_id)
    if int(run.data.params.get("embedded_prompts", 0)):
        p = run.data.params
        typer.echo(
            f"embedded {p['embedded_prompts']} new prompts on {p['device']} at {float(p['embedding_prompts_per_s']):.1f} "
            "prompts/s (cached ones are not embedded again)"
        )
    typer.echo(f"MLflow run {run_id}: {run_link(run)}")


@app.command("export")
@user_errors
def export_cmd(
    router: Annotated[Path, typer.Option(help="A router folder written by 'train' (with its checkpoint/).")],
    out: Annotated[Optional[Path], typer.Option(help="Where to write (default: re-export in place).")] = None,
    variants: Annotated[str, typer.Option(help="fp32, int8 or both.")] = "fp32,int8",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out folder.")] = False,
    quiet: Quiet = False,
):
    """Export a trained router to ONNX (fused graph, int8), checking parity with the torch model."""
    from .export import export

    with quieted(quiet), step(f"exporting {router} to ONNX ({variants}) and checking parity"), no_library_bars():
        manifest = export(router, out, names_of(variants), overwrite=overwrite)
    typer.echo(f"exported to {out or router}; against the torch model: {parity_line(manifest)}")


def read_prompts(prompts: list[str], file: Optional[Path]) -> tuple[list[str], list]:
    """Prompts and their ids, from arguments, a file (JSONL/parquet/CSV with a 'prompt' column, or text lines) or stdin;
    RouterError for text that is not UTF-8, a table that cannot be read and for no prompts at all."""
    import pandas as pd

    from .data import PROMPT_TABLES, read_prompt_table

    if prompts and file:
        raise RouterError("give prompts as arguments or --file, not both")
    if prompts:
        return prompts, list(range(len(prompts)))
    if file is None:
        if sys.stdin.isatty():
            raise RouterError("no prompts: pass them as arguments, with --file, or on stdin (one per line)")
        lines = text_lines(sys.stdin.buffer.read(), "stdin")
        if not lines:
            raise RouterError("stdin: no prompts (one per line)")
        return lines, list(range(len(lines)))
    if not file.is_file():
        raise RouterError(not_a_file(file))
    if file.suffix.lower() not in PROMPT_TABLES:
        lines = text_lines(file.read_bytes(), str(file))
        if not lines:
            raise RouterError(f"{file}: no prompts (one per line)")
        return lines, list(range(len(lines)))
    df = read_prompt_table(file)
    ids = (
        df["prompt_id"] if "prompt_id" in df.columns else df["id"] if "id" in df.columns else pd.Series(range(len(df)))
    )
    return df["prompt"].tolist(), ids.tolist()


def text_lines(raw: bytes, where: str) -> list[str]:
    """Non-blank lines of UTF-8 text; DataError naming the line of the first byte that is not UTF-8."""
    from .data import utf8_text

    return [line for line in utf8_text(raw, where).splitlines() if line.strip()]


@app.command()
@user_errors
def score(
    prompts: Annotated[Optional[list[str]], typer.Argument(help="Prompts to score (or use --file, or stdin).")] = None,
    router: Annotated[Path, typer.Option(help="Router folder.")] = Path("models/default"),
    file: Annotated[
        Optional[Path], typer.Option(help="JSONL/parquet/CSV with a 'prompt' column, or a text file.")
    ] = None,
    weak: Annotated[
        Optional[str],
        typer.Option(
            help="The weak model, as the router names it, or 'generic' for one it "
            "was not trained on (default: the router's)."
        ),
    ] = None,
    strong: Annotated[Optional[str], typer.Option(help="The strong model (default: the router's).")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Route to weak when its pass chance >= threshold.")] = None,
    strong_fraction: Annotated[
        Optional[float],
        typer.Option(help="Instead of --threshold: the share of strong calls wanted (the router's calibration table)."),
    ] = None,
    variant: Annotated[str, typer.Option(help="int8, fp32 or auto.")] = "auto",
    threads: Annotated[Optional[int], typer.Option(help="onnxruntime threads (default: all cores).")] = None,
):
    """Score prompts: one JSON line each with the weak model's pass chance against the strong one, the decision and
    the prompt's difficulty."""
    import json

    from .manifest import GENERIC
    from .scorer import Router, check_threshold, decide

    if threshold is not None and strong_fraction is not None:
        raise RouterError("give --threshold or --strong-fraction, not both")
    texts, ids = read_prompts(prompts or [], file)
    r = Router(router, variant=variant, threads=threads)
    weak = weak or r.manifest.weak
    r.column(weak)
    if strong is not None:
        r.column(strong)
    named = strong or ("strong" if weak == GENERIC else r.manifest.strong)  # generic: your own strong model
    strong = strong or r.manifest.strong
    if strong_fraction is not None:
        if not 0 <= strong_fraction <= 1:
            raise RouterError(f"--strong-fraction must be in [0, 1], got {strong_fraction}")
        t = r.manifest.threshold_for(strong_fraction, weak)
    elif threshold is not None:
        t = check_threshold(threshold)
    elif (weak, strong) == (r.manifest.weak, r.manifest.strong):
        t = r.default_threshold
    else:
        t = r.manifest.threshold_for(r.manifest.strong_fraction_at(r.default_threshold), weak)  # the default share
    outputs = r.predict(texts)
    for i, d, diff in zip(ids, decide(outputs.pair(weak, strong, str(r.path)), t), outputs.difficulty):
        typer.echo(
            json.dumps(
                {
                    "id": i,
                    "p_weak": round(d.p_weak, 6),
                    "route": d.route,
                    "model": weak if d.route == "weak" else named,
                    "threshold": round(t, 6),
                    "difficulty": round(float(diff), 6),
                }
            )
        )


@app.command()
@user_errors
def calibrate(
    router: Annotated[Path, typer.Option(help="Router folder whose calibration table is replaced.")],
    prompts: Annotated[
        Path,
        typer.Option(
            help="Your traffic: a 'traffic export' file, or any parquet/JSONL/CSV with a "
            "'prompt' column, or a text file of one prompt per line."
        ),
    ],
    strong_fraction: Annotated[
        Optional[float],
        typer.Option(
            help="The share of strong calls the default threshold gives "
            "on this traffic (default: the share it gave before)."
        ),
    ] = None,
    holdout: Annotated[
        float, typer.Option(help="Share of the distinct prompts kept out of the fit to check it on.")
    ] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed of the fit/held-out split.")] = 0,
    outputs: Annotated[
        Optional[str],
        typer.Option(
            help="Comma-separated outputs whose held-out shares are printed, e.g. "
            "each scored tier's (default: the router's weak model and generic); all "
            "outputs are calibrated."
        ),
    ] = None,
    threads: Annotated[Optional[int], typer.Option(help="onnxruntime threads (default: all cores).")] = None,
    max_seq_length: Annotated[
        Optional[int],
        typer.Option(
            help="Tokens of each prompt the router reads from now on "
            "(router.json encoder.max_seq_length), calibrated at it: fewer "
            'cost less (training/README.md, "How much of a prompt").'
        ),
    ] = None,
    quality_target: Annotated[
        Optional[float],
        typer.Option(
            min=0,
            max=1,
            help="Instead of --strong-fraction: the quality to keep against the strongest tier; the strong share "
            "is the cheapest that keeps it on --graded.",
        ),
    ] = None,
    graded: Annotated[
        Optional[Path], typer.Option(help="With --quality-target: a 'quality export' file of your traffic.")
    ] = None,
):
    """Calibrate a router to your traffic: its threshold <-> share-of-strong-calls table (every output) and default
    threshold, fitted on part of the prompts and checked on the rest."""
    from .calibrate import calibrate as run
    from .manifest import GENERIC, read_manifest

    if quality_target is not None:
        from . import quality
        from .data import read_table

        if strong_fraction is not None or graded is None:
            raise RouterError("--quality-target takes --graded (a 'quality export' file) and no --strong-fraction")
        est = quality.estimate(quality.from_table(read_table(graded), str(graded)), quality_target)
        if est["for_target"] is None:
            raise RouterError(f"{graded}: no share of weak calls keeps {quality_target:g} of the quality there")
        strong_fraction = round(1 - est["for_target"]["weak_share"], 4)
        typer.echo(
            f"{graded}: {est['prompts']} graded requests keep {est['for_target']['retained_quality']:.3f} of the "
            f"quality at {est['for_target']['cost_ratio']:.3f} of the cost with a strong share of {strong_fraction:g}"
        )

    shown = names_of(outputs) if outputs else [read_manifest(router).weak, GENERIC]
    unknown = [o for o in shown if o not in read_manifest(router).outputs]
    if unknown:
        raise RouterError(f"--outputs: {router} has no output {unknown[0]!r} (see router.json 'models', or 'generic')")
    texts, _ = read_prompts([], prompts)
    r = run(
        router,
        texts,
        str(prompts),
        strong_fraction=strong_fraction,
        holdout=holdout,
        seed=seed,
        threads=threads,
        max_seq_length=max_seq_length,
    )
    typer.echo(
        f"calibrated {router} on the {r.prompts} prompts of {prompts}: default threshold {r.default_threshold} for a "
        f"strong share of {r.asked:g}"
    )
    typer.echo(f"check: a table fitted on {r.fit} of them gives these strong shares on the other {r.held_out}")
    shares = list(next(iter(r.achieved.values())))
    typer.echo(f"{'output (strong share asked ->)':40s} " + " ".join(f"{f:>6g}" for f in shares))
    for output, got in ((o, r.achieved[o]) for o in shown):
        typer.echo(f"{output[:40]:40s} " + " ".join(f"{got[f]:6.3f}" for f in shares))
    typer.echo(
        "in the service: routing.threshold, else routing.strong_fraction (read through this table), else this "
        "default threshold; a config that sets either wins over the default"
    )


@app.command()
@user_errors
def compare(
    first: Annotated[Path, typer.Argument(help="A router folder.")],
    second: Annotated[Path, typer.Argument(help="Another router folder (e.g. a retrained copy).")],
):
    """Say whether two router folders are the same router (models, pair, thresholds, calibration, test AUCs and outputs
    on probe prompts, within what retraining moves) or what differs; exit 1 when they differ."""
    from .compare import AUC_TOL, OUTPUT_TOL, THRESHOLD_TOL, differences
    from .export import PROBES
    from .scorer import Router

    diff = differences(Router(first), Router(second), PROBES)
    if not diff:
        typer.echo(
            f"same router: {first} and {second} agree within tolerance (thresholds and calibration "
            f"{THRESHOLD_TOL}, test AUCs {AUC_TOL}, outputs on {len(PROBES)} probe prompts {OUTPUT_TOL})"
        )
        return
    for line in diff:
        typer.echo(line)
    raise typer.Exit(1)


@app.command()
@user_errors
def bench(
    router: Annotated[Path, typer.Option(help="Router folder (with its checkpoint/ for the torch path).")] = Path(
        "models/default"
    ),
    threads: Annotated[int, typer.Option(help="Threads for onnxruntime and torch.")] = 1,
    repeats: Annotated[int, typer.Option(help="Timed calls per short-prompt measurement.")] = 200,
    data_dir: Annotated[
        Path,
        typer.Option(
            help="Folder of parquet files with a 'prompt' column, for the int8 vs fp32 routing check (strong share; APGR where the router's pair is graded)."
        ),
    ] = Path("../shared/datasets"),
):
    """Benchmark the scorer: p50/p99 latency and throughput, ONNX fp32/int8 vs sentence-transformers + torch."""
    from rich.console import Console
    from rich.table import Table

    from .tools.bench_score import run, verdicts

    table, facts = run(router, threads=threads, repeats=repeats, data_dir=data_dir)
    out = Table(title=f"learned-router scorer benchmark ({threads} thread(s))")
    out.add_column("scorer")
    for col in table.columns:
        out.add_column(col, justify="right")
    for name, row in table.iterrows():
        out.add_row(
            name, *[f"{v:.2f}" if "ms" in c else f"{v:.1f}" if "/s" in c else f"{v:.1f}x" for c, v in row.items()]
        )
    console = Console(width=200)
    console.print(out)
    for k, v in facts.items():
        console.print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    for line in verdicts(table, facts):
        console.print(line)


@app.command("task-types")
@user_errors
def task_types(
    prompts: Annotated[Optional[list[str]], typer.Argument(help="Prompts to type (one JSON line each).")] = None,
    router: Annotated[Path, typer.Option(help="Router folder (exported with its embedding output).")] = Path(
        "models/default"
    ),
    types: Annotated[
        Optional[Path],
        typer.Option(help="A task types YAML file (default: the router folder's task_types.yaml, else the package's)."),
    ] = None,
    table: Annotated[
        Optional[Path],
        typer.Option(help="A labelled CSV (columns type, prompt): print each type's precision and recall."),
    ] = None,
    threads: Annotated[Optional[int], typer.Option(help="onnxruntime threads (default: all cores).")] = None,
):
    """Task types: list them, type prompts, or evaluate the inferred types on a labelled table."""
    import json

    from .scorer import Router
    from .tasktypes import TaskClassifier, check_labels, evaluate, load_types, read_table, types_path

    if prompts and table:
        raise RouterError("give prompts or --table, not both")
    path = types_path(router, types)
    defined = load_types(path)
    if not prompts and table is None:
        for name, t in defined.items():
            typer.echo(f"{name:16s} {len(t.examples):3d} examples  {t.description}")
        typer.echo(f"({path})")
        return
    r = Router(router, threads=threads)
    clf = TaskClassifier.build(defined, r.embed)
    if prompts:
        for p, name in zip(prompts, clf.types_of(r.embed(prompts))):
            typer.echo(json.dumps({"prompt": p[:80], "task_type": name}))
        return
    texts, labels = read_table(table)
    check_labels(labels, clf.names, table)
    result = evaluate(clf.types_of(r.embed(texts)), labels, clf.names)
    typer.echo(f"{'type':16s} {'precision':>9s} {'recall':>7s} {'prompts':>7s}")
    for name, m in result.items():
        typer.echo(f"{name:16s} {m['precision']:9.3f} {m['recall']:7.3f} {int(m['support']):7d}")
    typer.echo(f"({len(texts)} prompts of {table}; types from {path})")


# ---- commands (evals) -------------------------------------------------------------------------


@app.command("eval")
@user_errors
def eval_cmd(
    data: Annotated[Path, typer.Option(help="A graded benchmark (long or battles).")],
    out: Annotated[Path, typer.Option(help="Folder for metrics.json, frontier.png and table.md.")],
    router: Annotated[Path, typer.Option(help="Router folder (with its checkpoint/).")] = Path("models/default"),
    strong: Annotated[str, typer.Option(help="The strong model, as the benchmark names it.")] = "gpt-4-1106-preview",
    weak: Annotated[
        str, typer.Option(help="The weak model ('*' on battles: whichever model the strong one met).")
    ] = "mistralai/Mixtral-8x7B-Instruct-v0.1",
    prices: Annotated[Optional[Path], typer.Option(help="YAML of $ per 1M input/output tokens per model.")] = Path(
        "evals/prices.yaml"
    ),
    folds: Annotated[int, typer.Option(help="Folds when the benchmark overlaps the router's training data.")] = 5,
    by: Annotated[
        str,
        typer.Option(
            help="source: leave the benchmark's source out of training; prompt or category: "
            "k-fold cross-validation by that (MMLU subject: out of domain)."
        ),
    ] = "prompt",
    data_dir: Annotated[
        Optional[Path], typer.Option(help="Where the router's training files are, if not where it was trained.")
    ] = None,
    tiers: Annotated[
        Optional[str],
        typer.Option(
            help="Comma-separated models, cheapest first: evaluate the tier policy "
            "in dollars (each single model, the best two-model router, the oracle) "
            "instead of a pair."
        ),
    ] = None,
    name: Annotated[Optional[str], typer.Option(help="Benchmark name in the outputs (default: the file name).")] = None,
    against: Annotated[
        Optional[Path],
        typer.Option(
            help="Another router folder (e.g. the one in service) to compare on the same prompts, as it is (no refit)."
        ),
    ] = None,
    learning_curve: Annotated[
        Optional[str],
        typer.Option(
            help="Comma-separated training sizes (and 'all'): the "
            "learning curve of a top level over --router as the prior, "
            "next to the prior, kNN, ridge and prompt length."
        ),
    ] = None,
    draws: Annotated[int, typer.Option(help="Random draws of training prompts per learning-curve size.")] = 5,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "learned-router-evals",
    quiet: Quiet = False,
):
    """Evaluate a router on a benchmark: the cost-quality frontier, APGR/CPT/cost, baselines; logged to MLflow."""
    from .evals.protocol import BenchmarkEvaluator, run_eval
    from .tracking import log_eval, log_learning_curve, log_tier_eval, run_link, start_run

    if learning_curve is not None:
        from .evals.learning import run_learning_curve

        sizes = parse_sizes(learning_curve)
        if draws < 1:
            raise RouterError(f"--draws must be at least 1, got {draws}")
        evaluator = BenchmarkEvaluator.from_file(data, strong, weak, name=name)  # a bad file: before any MLflow run
        params = {"prior": str(router), "data": str(data), "strong": strong, "weak": weak, "draws": draws}
        with (
            start_run(experiment, name or f"{data.stem} learning curve") as run,
            quieted(quiet),
            step(f"learning curve of a top level over {router} on {data.name}"),
        ):
            rows, text = run_learning_curve(router, evaluator, sizes, draws, out)
            log_learning_curve(params | {"sizes": learning_curve}, rows, out)
        typer.echo(text)
    elif tiers is not None:
        from .evals.tiers import TierEvaluator, run_tier_eval

        tier_evaluator = TierEvaluator.from_file(data, names_of(tiers), prices, name)
        params = {"router": str(router), "data": str(data), "tiers": ",".join(tier_evaluator.tiers), "folds": folds}
        with (
            start_run(experiment, name or f"{data.stem} tiers") as run,
            quieted(quiet),
            step(f"evaluating {router} on {data.name} as {len(tier_evaluator.tiers)} tiers ({folds}-fold refits)"),
        ):
            log_tier_eval(params, run_tier_eval(router, tier_evaluator, out, folds), out)
        typer.echo((out / "table.md").read_text())
    else:
        evaluator = BenchmarkEvaluator.from_file(data, strong, weak, prices, name)
        params = {"router": str(router), "data": str(data), "strong": strong, "weak": weak, "folds": folds, "by": by}
        with start_run(experiment, name or data.stem) as run:
            with quieted(quiet), step(f"evaluating {shown(router, 40)} on {shown(data.name, 40)} (by {by})"):
                result = run_eval(router, evaluator, out, folds=folds, by=by, data_dir=data_dir, against=against)
            log_eval(params, result.report, out)
        typer.echo((out / "table.md").read_text())
    typer.echo(f"written to {out}; MLflow: {run_link(run)}")


@app.command()
@user_errors
def report(
    config: Annotated[Path, typer.Option(help="Benchmark suite YAML.")] = Path("evals/benchmarks.yaml"),
    out: Annotated[Path, typer.Option(help="Folder for RESULTS.md and results/<benchmark>/.")] = Path("evals"),
    only: Annotated[
        Optional[str],
        typer.Option(
            help="Run one benchmark of the suite by name (the others' figures from "
            "their last run), or 'learning-curves' for that section alone."
        ),
    ] = None,
    quiet: Quiet = False,
):
    """Run every benchmark of a suite and regenerate RESULTS.md (leave-one-source-out and in-domain tables, frontier
    plots, RouteLLM's numbers, learning curves of two-level routers)."""
    from .evals.results import load_suite, write_results

    suite = load_suite(config)
    with quieted(quiet), step(f"report: {only or f'{len(suite.benchmarks)} benchmarks'}") as bar:
        path = write_results(suite, out, progress=bar.describe, only=only)
    typer.echo(f"written {path}")


# ---- commands (service) -----------------------------------------------------------------------


def _serve_imports(modules: tuple[str, ...] = ("fastapi", "httpx", "prometheus_client", "redis", "uvicorn")):
    """Import the serve extra's `modules` (all of them: what `serve` needs; redis for state.backend: redis), or fail
    with the install hint; returns uvicorn when it is among them."""
    import importlib

    try:
        loaded = {m: importlib.import_module(m) for m in modules}
    except ModuleNotFoundError as e:
        fail(missing_module(e.name))
    return loaded.get("uvicorn")


def _log_config(level: str) -> dict:
    """uvicorn's logging, plus the service's own logger at `level` (it never logs keys or prompt text)."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    cfg = copy.deepcopy(LOGGING_CONFIG)
    cfg["loggers"]["learned_router"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return cfg


@app.command()
@user_errors
def serve(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="Service config YAML (see serving/config.example.yaml).")
    ],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Worker processes; each holds its own router, and its own breakers and limits unless state.backend is redis (serving/DEPLOY.md).",
        ),
    ] = 1,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    access_log: Annotated[
        bool, typer.Option(help="Log one line per HTTP request (path and status, never bodies).")
    ] = True,
):
    """Run the OpenAI-compatible routing service."""
    uvicorn = _serve_imports()
    from .serving.app import CONFIG_ENV, SUPERVISOR_ENV, WORKERS_ENV, Service, create_app
    from .serving.config import load_config

    if log_level.lower() not in ("debug", "info", "warning", "error"):
        fail(f"--log-level: expected debug, info, warning or error, got {log_level!r}")
    from .serving.slowclients import HeaderTimeoutProtocol

    check_port(host, port)  # before the router loads
    service = Service(load_config(config))  # fail fast: config, router folder, key variables
    options = dict(
        host=host,
        port=port,
        log_config=_log_config(log_level),
        log_level=log_level.lower(),
        access_log=access_log,
        http=HeaderTimeoutProtocol,
    )  # a client that never finishes its headers is cut off (DEPLOY.md)
    if workers == 1:
        uvicorn.run(create_app(service), **options)
    else:
        del service
        # uvicorn's worker processes build the app from these (create_app_from_env): a factory takes no arguments
        os.environ[CONFIG_ENV], os.environ[WORKERS_ENV] = str(config.resolve()), str(workers)
        os.environ[SUPERVISOR_ENV] = str(os.getpid())
        uvicorn.run("learned_router.serving.app:create_app_from_env", factory=True, workers=workers, **options)


def check_port(host: str, port: int) -> None:
    """RouterError naming the address when it cannot be listened on (in use, not this host's, no permission)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise RouterError(f"--host {host}: not an address of this host ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(address)
        except OSError as e:
            raise RouterError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None


traffic_app = typer.Typer(help="The traffic record of a service (its traffic: block).", no_args_is_help=True)
app.add_typer(traffic_app, name="traffic")


def utc_time(value: Optional[str], option: str) -> Optional[float]:
    """An ISO 8601 date or time (UTC unless it names a zone) as epoch seconds."""
    from datetime import datetime, timezone

    if value is None:
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise RouterError(
            f"{option}: expected an ISO 8601 date or time such as 2026-12-01 or 2026-12-01T12:00, got {value!r}"
        ) from None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def check_table_out(out: Path, overwrite: bool) -> None:
    """An export's --out: a table file by its suffix, not one already there unless --overwrite."""
    from .data import PROMPT_TABLES

    if out.suffix.lower() not in PROMPT_TABLES:
        raise RouterError(f"--out {out}: expected a {', '.join(PROMPT_TABLES)} file")
    if out.exists() and not overwrite:
        raise RouterError(f"{out}: already exists (pass --overwrite to replace it)")


@traffic_app.command("export")
@user_errors
def traffic_export(
    store: Annotated[Path, typer.Option(help="The traffic store (traffic.store in the service config).")],
    out: Annotated[
        Path,
        typer.Option(
            help="File to write, .parquet, .jsonl or .csv: prompt_id, prompt, time, client, tier, "
            "provider, model, router, outcome, feedback."
        ),
    ],
    since: Annotated[
        Optional[str], typer.Option(help="Only requests at or after this UTC date/time (ISO 8601).")
    ] = None,
    until: Annotated[Optional[str], typer.Option(help="Only requests before this UTC date/time (ISO 8601).")] = None,
    sample: Annotated[Optional[int], typer.Option(min=1, help="At most this many requests, sampled at random.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of --sample.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
):
    """Export recorded requests (with their feedback) as a prompts file for 'label' and 'calibrate'."""
    from .data import write_table
    from .serving.traffic import export_traffic

    check_table_out(out, overwrite)
    df, left_out = export_traffic(store, utc_time(since, "--since"), utc_time(until, "--until"), sample, seed)
    if df.empty:
        raise RouterError(
            f"{store}: no recorded requests with text and no data class in that range"
            + (f" ({left_out} recorded as a hash only (traffic.text) or of a data class)" if left_out else "")
        )
    write_table(df, out)
    typer.echo(
        f"{len(df)} requests ({int(df['feedback'].notna().sum())} with feedback) written to {out}"
        + (f"; {left_out} recorded without text or with a data class were left out" if left_out else "")
    )


quality_app = typer.Typer(
    help="What routing costs in quality, from a service's shadow-graded requests (its quality: block).",
    no_args_is_help=True,
)
app.add_typer(quality_app, name="quality")


def shadow_rows(store: Path, since: Optional[str]) -> list[dict]:
    from .serving.shadow import ShadowStore

    if not store.is_file():
        raise RouterError(f"--store {store}: no such file (quality.store in the service config)")
    rows = ShadowStore(store).rows(utc_time(since, "--since"))
    if not rows:
        raise RouterError(f"{store}: no shadow-graded requests" + (f" since {since}" if since else ""))
    return rows


@quality_app.command("report")
@user_errors
def quality_report(
    out: Annotated[Path, typer.Option(help="Folder for quality.png, quality.md and quality.json.")],
    store: Annotated[Optional[Path], typer.Option(help="The service's quality.store.")] = None,
    data: Annotated[Optional[Path], typer.Option(help="A 'quality export' file, instead of --store.")] = None,
    target: Annotated[float, typer.Option(min=0, max=1, help="Quality retained to keep.")] = 0.97,
    since: Annotated[Optional[str], typer.Option(help="Only requests at or after this UTC date/time.")] = None,
):
    """The frontier on your traffic (PNG) and a summary: quality retained and cost at the thresholds in use, with
    95% intervals, per task type, and the threshold that keeps --target at the lowest cost."""
    import json

    from . import quality
    from .data import read_table
    from .evals.plots import plot_quality

    if (store is None) == (data is None):
        raise RouterError("give one of --store (a service's quality.store) or --data (a 'quality export' file)")
    graded = quality.Graded.of(shadow_rows(store, since)) if store else quality.from_table(read_table(data), str(data))
    est = quality.estimate(graded, target)
    out.mkdir(parents=True, exist_ok=True)
    title = f"Routing on {(store or data).name}"
    plot_quality(est, out / "quality.png", title)
    (out / "quality.md").write_text(quality.markdown(est, title))
    (out / "quality.json").write_text(json.dumps(est, indent=1) + "\n")
    typer.echo((out / "quality.md").read_text())
    typer.echo(f"written to {out}")


@quality_app.command("export")
@user_errors
def quality_export(
    store: Annotated[Path, typer.Option(help="The service's quality.store.")],
    out: Annotated[Path, typer.Option(help="File to write (.parquet, .jsonl or .csv): a graded table.")],
    since: Annotated[Optional[str], typer.Option(help="Only requests at or after this UTC date/time.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
):
    """The shadow-graded requests as a graded table: 'train --prior' learns from it, 'quality report --data' and
    'calibrate --quality-target' read it."""
    from . import quality
    from .data import write_table

    check_table_out(out, overwrite)
    rows = shadow_rows(store, since)
    write_table(quality.graded_table(rows), out)
    typer.echo(f"{len(rows)} shadow-graded requests written to {out}")


@app.command("fake-provider")
@user_errors
def fake_provider(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 9001,
    name: Annotated[str, typer.Option(help="Shown in its answers and stats.")] = "fake",
    model: Annotated[str, typer.Option(help="Model id it reports.")] = "fake-model",
    latency_ms: Annotated[float, typer.Option(min=0, help="Delay before each answer.")] = 0.0,
    chunk_delay_ms: Annotated[float, typer.Option(min=0, help="Delay between stream chunks.")] = 0.0,
    fail_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Share of requests answered with --error-status.")
    ] = 0.0,
    error_status: Annotated[int, typer.Option(help="HTTP status of simulated failures.")] = 503,
    mode: Annotated[
        str,
        typer.Option(
            help="ok, error, 429, hang, stall, raw (200 with a body set by POST /_control) or huge (a body with no end); "
            "switch at run time with POST /_control."
        ),
    ] = "ok",
    api_key_env: Annotated[
        Optional[str], typer.Option(help="Require the key in this environment variable as bearer token.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of --fail-rate.")] = 0,
    fail_words: Annotated[
        str,
        typer.Option(
            help="Comma-separated words: a prompt holding one is answered 'I cannot answer "
            "that.' (a wrong answer for 'label' to grade low)."
        ),
    ] = "",
    judge: Annotated[
        bool,
        typer.Option(
            "--judge", help="Act as the judge of 'label': grade the answers in its prompt by the rubric's format."
        ),
    ] = False,
    judge_garbage_rate: Annotated[
        float, typer.Option(min=0, max=1, help="With --judge: share of answers with no verdict.")
    ] = 0.0,
):
    """Run a fake OpenAI-compatible provider on 127.0.0.1, with deterministic canned answers (tests, demo)."""
    uvicorn = _serve_imports()
    from .tools.fake_provider import MODES, FakeState, create_fake_provider

    if mode not in MODES:
        fail(f"--mode: expected one of {sorted(MODES)}, got {mode!r}")
    key = None
    if api_key_env:
        key = os.environ.get(api_key_env)
        if key is None:
            fail(f"--api-key-env: environment variable {api_key_env} is not set")
    state = FakeState(
        name=name,
        model=model,
        mode=mode,
        latency_ms=latency_ms,
        chunk_delay_ms=chunk_delay_ms,
        fail_rate=fail_rate,
        error_status=error_status,
        api_key=key,
        seed=seed,
        fail_words=names_of(fail_words),
        judge=judge,
        judge_garbage_rate=judge_garbage_rate,
    )
    uvicorn.run(create_fake_provider(state), host="127.0.0.1", port=port, log_level="warning", access_log=False)


@app.command()
@user_errors
def label(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="Service config YAML with a judge: block (serving/CONFIG.md).")
    ],
    prompts: Annotated[
        Path,
        typer.Option(
            help="Parquet/JSONL/CSV with a 'prompt' column (+ 'prompt_id'; 'feedback' and "
            "'tier': user feedback, joined as source 'feedback')."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="The graded table (.parquet, .jsonl or .csv) to write; its journal <out>.journal.jsonl goes beside "
            "it. Rerun the same command to resume."
        ),
    ],
    models: Annotated[
        Optional[str],
        typer.Option(
            help="Comma-separated tiers or providers to compare, cheapest first; the "
            "last is the strongest (the reference). Default: every tier."
        ),
    ] = None,
    max_usd: Annotated[
        Optional[float],
        typer.Option(
            help="Start no call whose estimate would take this run's spend past "
            "this many dollars; stop there (exit 0) and rerun to go on."
        ),
    ] = None,
    sample: Annotated[
        Optional[int], typer.Option(help="Send only a seeded random sample of this many prompts to the models.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of --sample.")] = 0,
    concurrency: Annotated[
        Optional[int], typer.Option(help="Requests in flight at most (default: judge.concurrency).")
    ] = None,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Start without asking (the cost estimate is printed all the same).")
    ] = False,
    exclude_client: Annotated[
        list[str],
        typer.Option(
            "--exclude-client",
            help="Drop this client's feedback (repeat for several; the client column of 'traffic export').",
        ),
    ] = [],
    max_feedback_share: Annotated[
        Optional[float],
        typer.Option(
            help="No client keeps more than this share of the "
            "feedback rows (its first ones), so one cannot outvote "
            "the rest."
        ),
    ] = None,
    quiet: Quiet = False,
):
    """Grade the answers of the configured models with the config's judge model, into the long table 'train' reads
    (resumable; the cost estimated first)."""
    _serve_imports(("httpx", "prometheus_client"))  # the upstream calls and their metrics; no server, no Redis
    from .label import plan as make_plan
    from .label import run as run_label
    from .serving.config import load_config

    p = make_plan(
        load_config(config),
        prompts,
        out,
        names_of(models) if models is not None else None,
        sample=sample,
        seed=seed,
        concurrency=concurrency,
        max_usd=max_usd,
        exclude_clients=frozenset(exclude_client),
        max_feedback_share=max_feedback_share,
    )
    judge_cfg = p.cfg.judge
    typer.echo(
        f"label: {p.prompts:,} prompts x {', '.join(f'{c.name} ({c.model})' for c in p.contenders)}; judge "
        f"{judge_cfg.provider.model} ({p.mode}, reference: {p.contenders[-1].model})"
    )
    typer.echo(
        f"to do: {p.rows:,} rows ({p.skipped:,} already graded): {p.answer_calls:,} answer calls and {p.judge_calls:,} "
        f"judge calls, estimated ${p.estimate_usd:.4f} at the configured prices"
    )
    if p.feedback or p.feedback_unknown:
        unknown = ", ".join(f"{n} of tier {t!r}" for t, n in p.feedback_unknown.items())
        typer.echo(
            f"feedback: {len(p.feedback):,} rows join as source 'feedback'"
            + (f" ({unknown} skipped: not a tier of the config)" if unknown else "")
        )
        typer.echo(
            "feedback per client (kept of given): "
            + ", ".join(
                f"{c} {kept:,} of {given:,}"
                for c, (kept, given) in sorted(p.feedback_clients.items(), key=lambda x: (-x[1][1], x[0]))
            )
        )
    if max_usd is not None and p.estimate_usd > max_usd:
        typer.echo(
            f"--max-usd {max_usd:g}: the run stops before a call that would pass it (about "
            f"{max_usd / p.estimate_usd:.0%} of the estimate, which prices every answer at judge.answer_max_tokens)"
        )
    if p.jobs and not yes:
        if not sys.stdin.isatty():
            raise RouterError(
                "--yes: this run makes calls that cost money; pass --yes to start it without a question "
                "(stdin is not a terminal)"
            )
        if not typer.confirm("start?", default=False):
            typer.echo("nothing was sent")
            raise typer.Exit(1)
    with quieted(quiet):
        s = run_label(p)
    typer.echo(
        f"rows written: {s.written:,}"
        + (f" ({s.feedback:,} of them feedback)" if s.feedback else "")
        + f"; {p.out} holds {s.total:,} rows"
    )
    typer.echo(f"rows skipped (already graded): {s.skipped:,}")
    typer.echo(f"failures (provider failed): {s.failed:,}" + (f" (e.g. {'; '.join(s.failures)})" if s.failures else ""))
    typer.echo(
        f"unparseable judge answers: {s.unparseable:,}"
        + (f" ({s.unparseable_rows:,} rows not written; a rerun asks again)" if s.unparseable else "")
    )
    typer.echo(f"spent: ${s.spent:.4f} (estimated ${p.estimate_usd:.4f})")
    typer.echo(f"rate: {s.per_minute:,.0f} rows/minute")
    if s.unreadable:
        typer.echo(f"journal: {s.unreadable} unreadable line(s) skipped (a crash mid-write)")
    if s.budget_stop:
        typer.echo(
            f"stopped at the budget: ${s.spent:.4f} spent of --max-usd {max_usd:g}; rerun the same command to go on "
            "(graded rows are skipped)"
        )
    if s.interrupted:
        typer.echo(f"interrupted: the rows graded so far are in {p.out}; rerun the same command to go on")
        raise typer.Exit(130)


@app.command()
@user_errors
def soak(
    router: Annotated[Path, typer.Option(help="Router folder.")] = Path("models/default"),
    requests: Annotated[
        int, typer.Option(min=100, max=50000, help="Requests in all, split evenly over the fault phases.")
    ] = 3000,
    concurrency: Annotated[int, typer.Option(min=1, max=256, help="Concurrent clients.")] = 16,
):
    """A bounded soak on 127.0.0.1: the service, fake providers broken phase by phase, hostile clients; per phase
    sent / answered / refused / stream errors / 5xx / 500 / lost. Exit code 1 unless 0 lost and 0 500s, and no 5xx
    where the strong provider fails while the weak one's circuit is half-open."""
    from collections import Counter

    _serve_imports()
    from .manifest import read_manifest
    from .tools.soak import COLUMNS, PHASES, STRICT, run

    read_manifest(router)  # a clear error before anything starts
    package = logging.getLogger("learned_router")
    level = package.level
    package.setLevel(logging.ERROR)  # the faults are deliberate: keep their warnings out
    try:
        results = run(str(router), requests, concurrency)
    finally:
        package.setLevel(level)
    total = sum((c for _, c in results), Counter())
    typer.echo(f"{'total':30s} " + "  ".join(f"{k} {round(total[k], 1)}" for k in COLUMNS))
    strict = dict(results)[STRICT]
    if total["lost"] or total["500"] or strict["5xx"] or total["sent"] != len(PHASES) * (requests // len(PHASES)):
        raise typer.Exit(1)


@app.command("bench-serve")
@user_errors
def bench_serve(
    router: Annotated[Path, typer.Option(help="Router folder.")] = Path("models/default"),
    requests: Annotated[
        int, typer.Option(min=100, max=20000, help="/v1/route requests per concurrency level (a quarter at 1).")
    ] = 2000,
    chat_requests: Annotated[
        int, typer.Option(min=50, max=5000, help="Chat requests for the overhead measurement.")
    ] = 500,
    max_wait_ms: Annotated[
        float, typer.Option(min=0, help="Batcher wait for more prompts (router.max_wait_ms).")
    ] = 0.0,
    threads: Annotated[int, typer.Option(min=1, help="onnxruntime threads (router.threads).")] = 1,
    router_workers: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            help="Threads scoring batches at once (router.workers; default: the service's, one per usable core), in "
            "one process; serve's --workers are processes.",
        ),
    ] = None,
    replicas: Annotated[
        int, typer.Option(min=1, max=8, help="Service processes the load is spread over (with --state).")
    ] = 1,
    state: Annotated[
        Optional[list[str]],
        typer.Option(
            help="sqlite or redis (repeat it to compare): measure each state backend "
            "in turn, with a rate limit and a budget; redis starts a redis-server."
        ),
    ] = None,
    compare: Annotated[
        Optional[list[str]],
        typer.Option(
            help="NAME=URL of another OpenAI-compatible proxy (base URL ending "
            "in /v1) that forwards model 'router' to the same upstream (--upstream): "
            "the same chat load goes to it, to this service and to the upstream "
            "directly, interleaved; repeatable."
        ),
    ] = None,
    compare_key_env: Annotated[
        Optional[list[str]],
        typer.Option(help="NAME=ENV: the environment variable holding the key of a --compare proxy."),
    ] = None,
    upstream: Annotated[
        Optional[str],
        typer.Option(
            help="With --compare: the upstream base URL every proxy forwards to "
            "(default: a fake provider started here)."
        ),
    ] = None,
    prompt_tokens: Annotated[
        str, typer.Option(help="With --compare: prompt sizes in tokens, comma-separated.")
    ] = "30,250,1000",
):
    """Benchmark the service on 127.0.0.1: /v1/route throughput and latency at concurrency 1, 16, 64; routing overhead;
    with --compare, the added latency and requests/s of this service next to another proxy's."""
    import shutil

    _serve_imports()
    from .manifest import read_manifest
    from .tools.bench_serve import run

    read_manifest(router)  # a clear error before anything starts
    for s in state or []:
        if s not in ("sqlite", "redis"):
            fail(f"--state: expected sqlite or redis, got {s!r}")
        if s == "redis" and shutil.which("redis-server") is None:
            fail("--state redis: redis-server is not on PATH (apt-get install redis-server)")
    if replicas > 1 and not state:
        fail("--replicas: needs --state (replicas without shared state are measured as one service each)")
    if compare or upstream:
        from .tools.bench_serve import run_compare

        others = dict(pair_option(c, "--compare", "NAME=URL") for c in compare or [])
        key_envs = dict(pair_option(k, "--compare-key-env", "NAME=ENV") for k in compare_key_env or [])
        unknown = [k for k in key_envs if k not in others]
        if unknown or {"direct", "router"} & set(others):
            fail(
                f"--compare-key-env: {unknown[0]!r} is not a --compare name"
                if unknown
                else "--compare: 'direct' and 'router' are taken"
            )
        missing = [env for env in key_envs.values() if env not in os.environ]
        if missing:
            fail(f"--compare-key-env: environment variable {missing[0]} is not set")
        for name, url in [*others.items(), *([("--upstream", upstream)] if upstream else [])]:
            if not re.match(r"^https?://[^/\s]+", url):
                fail(f"{name}: expected an http(s) base URL such as http://127.0.0.1:4000/v1, got {url!r}")
        try:
            sizes = tuple(int(t) for t in names_of(prompt_tokens))
        except ValueError:
            sizes = ()
        if not sizes or min(sizes) < 10 or max(sizes) > 4000:
            fail(f"--prompt-tokens: expected comma-separated sizes between 10 and 4000, got {prompt_tokens!r}")
        typer.echo(
            run_compare(
                str(router),
                {k: v.rstrip("/") for k, v in others.items()},
                {k: os.environ[v] for k, v in key_envs.items()},
                upstream,
                sizes=sizes,
                n=max(50, chat_requests // 4),
                threads=threads,
                workers=router_workers or "auto",
            )
        )
        return
    typer.echo(
        run(
            str(router),
            requests,
            chat_requests,
            max_wait_ms=max_wait_ms,
            threads=threads,
            workers=router_workers or "auto",
            replicas=replicas,
            states=tuple(state or ()),
        )
    )
