"""label: grade the configured models' answers with the judge, into a table train reads."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import RouterError
from ..progress import quiet as quieted

from .common import Quiet, names_of, serve_imports, user_errors
from .main import app


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
    serve_imports(("httpx", "prometheus_client"))  # the upstream calls and their metrics; no server, no Redis
    from ..label import plan as make_plan
    from ..label import run as run_label
    from ..serving.config import load_config

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
