"""The commands that talk to a running engine: invoke, resume, cancel, show, history, ls,
watch."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import click
import msgspec
from rich.table import Table

from ..client import DEFAULT_URL, Client
from ..errors import EvflowError
from ..messages import (
    MAX_LIST_LIMIT,
    Cancelled,
    Completed,
    ExecutionList,
    Failed,
    Paused,
    Settled,
    Waiting,
)
from ..state import Status
from . import err, main, nats_option, out


@main.command()
@click.argument("flow")
@click.option(
    "--input",
    "-i",
    "pairs",
    multiple=True,
    metavar="K=V",
    help="An input field; V is read as JSON when it parses, else as text.",
)
@click.option("--json", "body", metavar="BODY", help="The whole input as a JSON object.")
@click.option("--idempotency-key", help="Makes a repeat of this invoke return the first reply.")
@nats_option
def invoke(
    flow: str, pairs: tuple[str, ...], body: str | None, idempotency_key: str | None, nats_url: str
) -> None:
    """Start an execution of FLOW and print where it settled."""
    fields = _fields(pairs, body, "--input")
    reply = _call(nats_url, lambda c: c.invoke(flow, fields, idempotency_key=idempotency_key))
    _print_reply(reply)


@main.command()
@click.argument("flow")
@click.argument("execution_id")
@click.option(
    "--output",
    "-o",
    "pairs",
    multiple=True,
    metavar="K=V",
    help="An output field of the pause; V is read as JSON when it parses, else text.",
)
@click.option("--json", "body", metavar="BODY", help="The whole answer as a JSON object.")
@click.option("--pause", type=int, help="The sequence of the pause to answer, to be exact.")
@click.option("--idempotency-key", help="Makes a repeat of this resume return the first reply.")
@nats_option
def resume(
    flow: str,
    execution_id: str,
    pairs: tuple[str, ...],
    body: str | None,
    pause: int | None,
    idempotency_key: str | None,
    nats_url: str,
) -> None:
    """Answer the pause of an execution and print where it settled next."""
    fields = _fields(pairs, body, "--output")
    reply = _call(
        nats_url,
        lambda c: c.resume(
            flow, execution_id, fields, idempotency_key=idempotency_key, pause=pause
        ),
    )
    _print_reply(reply)


@main.command()
@click.argument("flow")
@click.argument("execution_id")
@click.option("--reason", help="Why; kept in the execution's history.")
@click.option("--idempotency-key", help="Makes a repeat of this cancel return the first reply.")
@nats_option
def cancel(
    flow: str, execution_id: str, reason: str | None, idempotency_key: str | None, nats_url: str
) -> None:
    """End a paused, waiting or running execution as cancelled."""
    reply = _call(
        nats_url,
        lambda c: c.cancel(flow, execution_id, reason, idempotency_key=idempotency_key),
    )
    _print_reply(reply)


@main.command()
@click.argument("execution_id")
@click.option(
    "--at",
    "at_version",
    type=click.IntRange(min=1),
    metavar="VERSION",
    help="The state as it was at this version (1 is the start).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the state as JSON.")
@nats_option
def show(execution_id: str, at_version: int | None, as_json: bool, nats_url: str) -> None:
    """Print the folded state of an execution, now or at a version."""
    state = _call(nats_url, lambda c: c.get(execution_id, at_version))
    if as_json:
        click.echo(msgspec.json.encode(state))
        return
    table = Table(show_header=False, box=None)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # wrap a long value, never hide part of it
    for name, value in msgspec.to_builtins(state).items():
        if value not in (None, [], {}):
            table.add_row(f"[bold]{name}[/]", value if isinstance(value, str) else _text(value))
    out.print(table)


@main.command()
@click.argument("execution_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines, one event a line.")
@nats_option
def history(execution_id: str, as_json: bool, nats_url: str) -> None:
    """Print the events of an execution."""
    events = _call(nats_url, lambda c: c.history(execution_id))
    if as_json:
        for stored in events:
            click.echo(msgspec.json.encode(stored))
        return
    table = Table(title=f"execution {execution_id}")
    for column in ("version", "at", "type"):
        table.add_column(column, no_wrap=True)
    table.add_column("data", overflow="fold")  # wrap a long event, never hide part of it
    for stored in events:
        data = {k: v for k, v in msgspec.to_builtins(stored.event).items() if k != "type"}
        table.add_row(
            str(stored.version),
            stored.at.isoformat(timespec="milliseconds"),
            type(stored.event).__name__,
            _text(data),
        )
    out.print(table)


@main.command(name="ls")
@click.option("--flow", help="Only executions of this flow.")
@click.option(
    "--status",
    type=click.Choice([status.value for status in Status], case_sensitive=False),
    help="Only executions in this status.",
)
@click.option(
    "--limit",
    type=click.IntRange(1, MAX_LIST_LIMIT),
    default=50,
    show_default=True,
    help="Most executions to print.",
)
@click.option("--after", metavar="TOKEN", help="Go on after the page that gave this token.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines, one execution a line.")
@nats_option
def list_executions(
    flow: str | None,
    status: str | None,
    limit: int,
    after: str | None,
    as_json: bool,
    nats_url: str,
) -> None:
    """List executions, the most recently changed first."""
    page: ExecutionList = _call(nats_url, lambda c: c.list_executions(flow, status, limit, after))
    if as_json:
        for row in page.executions:
            click.echo(msgspec.json.encode(row))
    elif page.executions:
        table = Table()
        widest = max(len(row.execution_id) for row in page.executions)
        table.add_column("execution", no_wrap=True, min_width=widest)  # whole, to copy
        for column in ("flow", "version", "status", "last change"):
            table.add_column(column, overflow="fold")
        for row in page.executions:
            at = row.updated_at.isoformat(timespec="milliseconds")
            table.add_row(row.execution_id, row.flow, str(row.version), row.status.value, at)
        out.print(table)

    if not page.executions:
        err.print("no executions match", highlight=False)
    if page.next is not None:
        options = {"--flow": flow, "--status": status, "--limit": str(limit), "--after": page.next}
        again = " ".join(f"{name} {value}" for name, value in options.items() if value)
        flag = " --json" if as_json else ""
        where = f" --nats {nats_url}" if nats_url != DEFAULT_URL else ""
        err.print(f"more executions follow: evflow ls {again}{flag}{where}", highlight=False)


@main.command()
@click.argument("flow", required=False)
@click.option("--kind", help="Only this kind: started, paused, resumed, completed, failed, ...")
@nats_option
def watch(flow: str | None, kind: str | None, nats_url: str) -> None:
    """Print notifications as they arrive, of one FLOW if given, until Ctrl-C."""

    async def follow(client: Client) -> None:
        err.print(f"watching {client.subjects.notifications(flow, kind)} (Ctrl-C to stop)")
        async for note in client.notifications(flow, kind):
            out.print(
                f"{note.at.isoformat(timespec='milliseconds')} [bold]{note.kind}[/] "
                f"{note.flow} {note.execution_id} v{note.version}"
            )
            if isinstance(note.resume_subject, str):
                out.print(f"    inputs {_text(note.inputs)} awaits {_text(note.outputs)}")

    try:
        _call(nats_url, follow)
    except KeyboardInterrupt:
        pass


def _fields(pairs: tuple[str, ...], body: str | None, option: str) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if body is not None:
        try:
            fields = msgspec.json.decode(body)
        except msgspec.DecodeError as error:
            raise click.BadParameter(f"not valid JSON: {error}", param_hint="--json") from None
        if not isinstance(fields, dict):
            raise click.BadParameter("must be a JSON object, {...}", param_hint="--json")
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"'{pair}' is not K=V", param_hint=option)
        try:
            fields[name] = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            fields[name] = raw
    return fields


def _call(nats_url: str, action: Callable[[Client], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        async with await Client.connect(nats_url) as client:
            return await action(client)

    try:
        return asyncio.run(run())
    except EvflowError as error:
        err.print(f"[red]error[/] {error.code}: {error.message}", highlight=False)
        sys.exit(1)


def _print_reply(reply: Settled) -> None:
    out.print(
        f"execution [bold]{reply.execution_id}[/] of flow '{reply.flow}' "
        f"is [bold]{type(reply).__name__.lower()}[/] (version {reply.version})",
        highlight=False,
    )
    if isinstance(reply, Paused):
        out.print(f"  pause '{reply.pause}' shows {_text(reply.inputs)}")
        out.print(f"  it awaits {_text(reply.output_schema.get('properties', {}))}")
        outputs = " ".join(f"--output {name}=..." for name in reply.outputs)
        if reply.deadline is not None:
            out.print(f"  it expires at {reply.deadline.isoformat()}")
        out.print(
            f"  resume with: evflow resume {reply.flow} {reply.execution_id} {outputs}",
            highlight=False,
        )
    elif isinstance(reply, Completed):
        out.print(f"  result {_text(reply.result)}")
    elif isinstance(reply, Failed):
        out.print(f"  error {reply.error.type}: {reply.error.message}")
    elif isinstance(reply, Waiting):
        out.print(f"  wakes at {reply.wake_at.isoformat()}")
    elif isinstance(reply, Cancelled) and reply.reason is not None:
        out.print(f"  reason {reply.reason}")


def _text(value: Any) -> str:
    return msgspec.json.encode(value).decode()
