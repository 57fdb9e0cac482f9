"""Commands on a router folder: train, export, score, calibrate, compare, bench, task-types."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import RouterError
from ..progress import quiet as quieted
from ..progress import no_library_bars, step
from ..recipe import Recipe

from .common import Quiet, Threads, names_of, pair_option, user_errors
from .main import app


def parse_weights(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, value = pair_option(item, "--weight", "SOURCE=NUMBER")
        try:
            out[name] = float(value)
        except ValueError:
            raise RouterError(f"--weight expects SOURCE=NUMBER, got {item!r}") from None
    return out


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

    from ..evaluator import RoutingEvaluator
    from ..tracking import run_link
    from ..train import train as run_training

    chosen = names_of(variants)
    bad = [v for v in chosen if v not in ("fp32", "int8")]
    if bad or not chosen:
        raise RouterError(f"--variants: expected fp32, int8 or both, got {variants!r}")
    if device not in ("auto", "cpu", "cuda"):
        raise RouterError(f"--device: expected auto, cpu or cuda, got {device!r}")
    with quieted(quiet):
        evaluators = [RoutingEvaluator.from_file(path, recipe.weak, recipe.strong) for path in eval_data]
        if prior is not None:
            from ..prior import train_on_prior

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
    from ..export import export

    with quieted(quiet), step(f"exporting {router} to ONNX ({variants}) and checking parity"), no_library_bars():
        manifest = export(router, out, names_of(variants), overwrite=overwrite)
    typer.echo(f"exported to {out or router}; against the torch model: {parity_line(manifest)}")


def read_prompts(prompts: list[str], file: Optional[Path]) -> tuple[list[str], list]:
    """Prompts and their ids, from arguments, a file or stdin (one per line)."""
    from ..data import prompt_lines, prompts_of_file

    if prompts and file:
        raise RouterError("give prompts as arguments or --file, not both")
    if prompts:
        return prompts, list(range(len(prompts)))
    if file is not None:
        return prompts_of_file(file)
    if sys.stdin.isatty():
        raise RouterError("no prompts: pass them as arguments, with --file, or on stdin (one per line)")
    lines = prompt_lines(sys.stdin.buffer.read(), "stdin")
    return lines, list(range(len(lines)))


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
    threads: Threads = None,
):
    """Score prompts: one JSON line each with the weak model's pass chance against the strong one, the decision and
    the prompt's difficulty."""
    import json

    from ..manifest import GENERIC
    from ..scorer import Router, decide

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
    t = r.threshold(weak, strong, threshold, strong_fraction)
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
    threads: Threads = None,
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
    from ..calibrate import calibrate as run
    from ..manifest import GENERIC, read_manifest

    if quality_target is not None:
        from ..quality import strong_share_for

        if strong_fraction is not None or graded is None:
            raise RouterError("--quality-target takes --graded (a 'quality export' file) and no --strong-fraction")
        strong_fraction, kept = strong_share_for(graded, quality_target)
        typer.echo(
            f"{graded}: {kept['prompts']} graded requests keep {kept['retained_quality']:.3f} of the quality at "
            f"{kept['cost_ratio']:.3f} of the cost with a strong share of {strong_fraction:g}"
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
    from ..compare import AUC_TOL, OUTPUT_TOL, THRESHOLD_TOL, differences
    from ..export import PROBES
    from ..scorer import Router

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

    from ..tools.bench_score import run, verdicts

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
    threads: Threads = None,
):
    """Task types: list them, type prompts, or evaluate the inferred types on a labelled table."""
    import json

    from ..scorer import Router
    from ..tasktypes import TaskClassifier, check_labels, evaluate, load_types, read_table, types_path

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
