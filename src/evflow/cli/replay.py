"""``evflow replay``: check recorded executions against the current flow code, offline.

It reads the log directly (read-only, so a copy made by ``evflow export`` and a log an
engine is serving both do) and needs no NATS. The exit status gates a deployment: 0 when
every execution replays as recorded, 1 when any does not, 2 when the command cannot run.
"""

from __future__ import annotations

import asyncio
import sys

import click
import msgspec
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.text import Text

from ..errors import EvflowError
from ..flow import App
from ..replay import Summary, Verdict, execution_ids, quoted, replay_log
from ..store import open_store, parse_store
from . import err, main, out, store_option
from .serve import load_app

LABELS = {
    "ok": ("ok", "green"),
    "diverged": ("DIVERGED", "bold red"),
    "unknown_flow": ("UNKNOWN FLOW", "bold red"),
    "error": ("ERROR", "bold red"),
}
"""How each outcome starts its line, and its colour on a terminal."""


@main.command()
@click.option("--app", "app_spec", required=True, help="The App to check, as MODULE:ATTR.")
@click.option("--execution", "execution_id", metavar="ID", help="Replay only this execution.")
@click.option("--flow", metavar="FLOW", help="Replay only the executions of this flow.")
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines, then a summary line.")
def replay(
    app_spec: str, execution_id: str | None, flow: str | None, store: str, as_json: bool
) -> None:
    """Replay recorded executions against the current flow code, writing nothing.

    Prints ok or the first divergence of each execution, then a summary. Exits 1 when any
    execution diverged, could not be replayed (error) or belongs to a flow or version the
    app does not register; 0 when all replay as recorded.
    """
    if execution_id is not None and flow is not None:
        raise click.UsageError("give --execution or --flow, not both")
    app = load_app(app_spec)
    if flow is not None and not app.versions(flow):
        raise click.BadParameter(
            f"the app registers no flow '{flow}' (it registers: {app.summary() or 'none'}); "
            "give one of its flows",
            param_hint="--flow",
        )
    try:
        parse_store(store)
    except EvflowError as error:
        raise click.BadParameter(error.message, param_hint="--store") from None

    try:
        summary = asyncio.run(_replay(app, store, execution_id, flow, as_json))
    except EvflowError as error:
        err.print(f"[red]error[/] {error.code}: {error.message}", highlight=False)
        sys.exit(2)
    sys.exit(0 if summary.passed else 1)


async def _replay(
    app: App, url: str, execution_id: str | None, flow: str | None, as_json: bool
) -> Summary:
    """Replay the chosen executions, printing each verdict as it comes."""
    store = await open_store(url, read_only=True)
    summary = Summary()
    try:
        executions = [execution_id] if execution_id else await execution_ids(store, flow)
        with _progress(len(executions), as_json) as progress:
            task = progress.add_task("replaying", total=len(executions))
            async for verdict in replay_log(app, store, executions):
                summary.add(verdict)
                _print_verdict(verdict, as_json)
                progress.advance(task)
    finally:
        await store.close()
    _print_summary(summary, flow, as_json)
    return summary


def _progress(total: int, as_json: bool) -> Progress:
    """A bar for many executions on a terminal; off for JSON, pipes and a few executions."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=out,
        transient=True,
        disable=as_json or not out.is_terminal or total < 20,
    )


def _print_verdict(verdict: Verdict, as_json: bool) -> None:
    if as_json:
        click.echo(msgspec.json.encode(verdict))
        return
    label, style = LABELS[verdict.outcome]
    line = Text.assemble(
        (label, style),
        f" {verdict.execution_id} {verdict.flow} v{verdict.flow_version}: ",
        _detail(verdict),
    )
    out.print(line, highlight=False)


def _detail(verdict: Verdict) -> str:
    """The rest of a verdict's line: where it diverged, or the verdict's sentence."""
    if verdict.outcome == "diverged" and verdict.sequence is not None:
        return (
            f"at operation {verdict.sequence} the history records {quoted(verdict.recorded)}"
            f", the code issues {quoted(verdict.issued)}"
        )
    return verdict.message


def _print_summary(summary: Summary, flow: str | None, as_json: bool) -> None:
    if as_json:
        click.echo(msgspec.json.encode({"summary": summary}))
        return
    if not summary.executions:
        of = f" of flow '{flow}'" if flow else ""
        out.print(f"no executions{of} in the log: nothing to check", highlight=False)
        return
    counts = (
        f"{summary.executions} executions: {summary.ok} ok, {summary.diverged} diverged, "
        f"{summary.unknown_flow} unknown flow, {summary.error} error"
    )
    out.print(Text(counts, style="green" if summary.passed else "bold red"))
    if summary.diverged:
        out.print(
            "a diverged execution cannot be driven on by this code: restore the code it "
            "started on, or register the new code as a new flow version",
            highlight=False,
        )
