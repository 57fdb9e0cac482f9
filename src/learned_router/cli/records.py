"""What a service recorded: traffic export, quality report and quality export."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import RouterError

from .common import user_errors
from .main import app


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
    from ..data import PROMPT_TABLES

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
    from ..data import write_table
    from ..serving.traffic import export_traffic

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
    from ..serving.shadow import ShadowStore

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

    from .. import quality
    from ..evals.plots import plot_quality

    if (store is None) == (data is None):
        raise RouterError("give one of --store (a service's quality.store) or --data (a 'quality export' file)")
    graded = quality.Graded.of(shadow_rows(store, since)) if store else quality.from_file(data)
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
    from .. import quality
    from ..data import write_table

    check_table_out(out, overwrite)
    rows = shadow_rows(store, since)
    write_table(quality.graded_table(rows), out)
    typer.echo(f"{len(rows)} shadow-graded requests written to {out}")
