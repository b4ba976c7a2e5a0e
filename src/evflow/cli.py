"""The ``evflow`` command: serve an app, and invoke, resume and inspect executions.

Built on click (parsing, environment variables, help) and rich (tables and colour).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import click
import msgspec
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from .client import DEFAULT_URL, Client
from .errors import EvflowError
from .flow import App
from .messages import Cancelled, Completed, Failed, Paused, Settled, Waiting
from .nats_server import NatsServer
from .server import Server
from .store import store_path
from .streams import StreamSettings, parse_duration

logger = logging.getLogger("evflow.cli")
out = Console(soft_wrap=True)  # replies are read by programs too: never break a line
err = Console(stderr=True, soft_wrap=True)

DEFAULT_STORE = "sqlite:///.evflow/evflow.db"
NATS_SCHEMES = ("nats://", "tls://", "ws://", "wss://")
nats_option = click.option(
    "--nats",
    "nats_url",
    envvar="EVFLOW_NATS_URL",
    default=DEFAULT_URL,
    show_default=True,
    help="NATS server URL (env EVFLOW_NATS_URL).",
)


class Duration(click.ParamType):
    """A duration such as 90s, 15m, 2h or 7d, as seconds."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, int | float):
            return float(value)
        try:
            return parse_duration(str(value), "the duration")
        except EvflowError as error:
            self.fail(error.message, param, ctx)


@click.group()
@click.version_option(package_name="evflow")
def main() -> None:
    """evflow: event-sourced pause-and-resume flows on NATS."""


@main.command()
@click.option("--app", "app_spec", required=True, help="The App to serve, as MODULE:ATTR.")
@click.option(
    "--nats",
    "nats_url",
    envvar="EVFLOW_NATS_URL",
    default=None,
    help="NATS server URL (env EVFLOW_NATS_URL). Without it an embedded nats-server "
    "with JetStream is started on 127.0.0.1:4222.",
)
@click.option(
    "--store",
    envvar="EVFLOW_STORE",
    default=DEFAULT_STORE,
    show_default=True,
    help="The event log, sqlite:///PATH (env EVFLOW_STORE).",
)
@click.option(
    "--events-max-age",
    type=Duration(),
    envvar="EVFLOW_EVENTS_MAX_AGE",
    show_envvar=True,
    default="7d",
    show_default=True,
    help="How long the EVFLOW_EVENTS stream keeps a notification; 0 for no limit.",
)
@click.option(
    "--events-max-bytes",
    type=int,
    envvar="EVFLOW_EVENTS_MAX_BYTES",
    show_envvar=True,
    default=-1,
    show_default=True,
    help="Bytes EVFLOW_EVENTS keeps before dropping the oldest; -1 for no limit.",
)
@click.option(
    "--duplicate-window",
    type=Duration(),
    envvar="EVFLOW_DUPLICATE_WINDOW",
    show_envvar=True,
    default="2m",
    show_default=True,
    help="How long both streams drop a repeated Nats-Msg-Id.",
)
@click.option(
    "--command-ack-wait",
    type=Duration(),
    envvar="EVFLOW_COMMAND_ACK_WAIT",
    show_envvar=True,
    default="30s",
    show_default=True,
    help="How long a durable command taken by an engine that died waits to be delivered again.",
)
@click.option(
    "--shutdown-timeout",
    type=Duration(),
    envvar="EVFLOW_SHUTDOWN_TIMEOUT",
    show_envvar=True,
    default="10s",
    show_default=True,
    help="On SIGTERM, how long commands in flight may finish, and then notifications drain.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
    help="The least severe log records shown.",
)
def serve(
    app_spec: str,
    nats_url: str | None,
    store: str,
    events_max_age: float,
    events_max_bytes: int,
    duplicate_window: float,
    command_ack_wait: float,
    shutdown_timeout: float,
    log_level: str,
) -> None:
    """Serve the flows of an App until SIGINT or SIGTERM."""
    _configure_logging(log_level)
    app = _load_app(app_spec)
    _check_urls(store, nats_url)
    streams = StreamSettings(
        events_max_age=events_max_age,
        events_max_bytes=events_max_bytes,
        duplicate_window=duplicate_window,
        command_ack_wait=command_ack_wait,
    )
    try:
        asyncio.run(_serve(app, nats_url, store, streams, shutdown_timeout))
    except EvflowError as error:
        raise click.ClickException(error.message) from None


def _configure_logging(level: str) -> None:
    """Rich log lines on a terminal; plain, unwrapped, timestamped lines for a log file."""
    if err.is_terminal:
        handler: logging.Handler = RichHandler(console=err)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


async def _serve(
    app: App, nats_url: str | None, store: str, streams: StreamSettings, shutdown_timeout: float
) -> None:
    stop = _stop_on_signals()
    embedded = None
    if nats_url is None:
        embedded = NatsServer(_store_folder(store) / "nats", port=4222)
        await embedded.start()
        nats_url = embedded.url
    server = Server(app, store, nats_url, streams=streams, shutdown_timeout=shutdown_timeout)
    try:
        await server.start()
        _announce(app, server)
        code = await _until_stopped(stop, embedded)
        logger.info("stopping: finishing commands in flight")
    finally:
        await server.stop()
        if embedded is not None:
            await embedded.stop()
    if code is not None:
        raise EvflowError(
            f"the embedded nats-server exited with code {code}, so evflow stopped; its last "
            "output is above (run with --log-level debug to see all of it)"
        )


async def _until_stopped(stop: asyncio.Event, embedded: NatsServer | None) -> int | None:
    """Wait for SIGINT or SIGTERM; or for the embedded server to die (its exit code)."""
    waits = {asyncio.ensure_future(stop.wait())}
    if embedded is not None:
        waits.add(asyncio.ensure_future(embedded.wait()))
    done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    if stop.is_set():
        return None
    code = done.pop().result()
    logger.error("the embedded nats-server exited with code %s", code)
    return code


def _check_urls(store: str, nats_url: str | None) -> None:
    """Refuse a store or NATS URL evflow cannot use, before anything starts."""
    try:
        store_path(store)
    except EvflowError as error:
        raise click.BadParameter(error.message, param_hint="--store") from None
    if nats_url is not None and not nats_url.startswith(NATS_SCHEMES):
        raise click.BadParameter(
            f"'{nats_url}' is not a NATS URL; write it as nats://HOST:PORT (or tls://, ws://, "
            "wss://), for example nats://127.0.0.1:4222",
            param_hint="--nats",
        )


def _store_folder(store: str) -> Path:
    return store_path(store).resolve().parent


def _announce(app: App, server: Server) -> None:
    for flow in app.flows.values():
        logger.info("serving flow '%s' on %s", flow.name, server.subjects.invoke(flow.name))
    example = next(iter(app.flows.values()), None)
    if example is not None:
        names = [field.name for field in msgspec.structs.fields(example.inputs)]
        fields = " ".join(f"--input {name}=..." for name in names)
        logger.info("try it: evflow invoke %s %s", example.name, fields)


def _stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM, installed before start-up so neither kills us."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _load_app(spec: str) -> App:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise click.BadParameter(
            f"'{spec}' is not MODULE:ATTR, e.g. examples.flows:app", param_hint="--app"
        )
    sys.path.insert(0, str(Path.cwd()))
    try:
        app = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise click.BadParameter(f"cannot load '{spec}': {error}", param_hint="--app") from None
    if not isinstance(app, App):
        raise click.BadParameter(
            f"'{spec}' is a {type(app).__name__}, not an evflow App", param_hint="--app"
        )
    return app


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
@click.option("--json", "as_json", is_flag=True, help="Print the state as JSON.")
@nats_option
def show(execution_id: str, as_json: bool, nats_url: str) -> None:
    """Print the folded state of an execution."""
    state = _call(nats_url, lambda c: c.get(execution_id))
    if as_json:
        click.echo(msgspec.json.encode(state))
        return
    table = Table(show_header=False, box=None)
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
