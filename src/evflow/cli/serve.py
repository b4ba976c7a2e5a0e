"""``evflow serve``: the engine on NATS and a log, until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import click
import msgspec
from rich.logging import RichHandler

from ..client import DEFAULT_URL
from ..connection import servers
from ..errors import EvflowError
from ..flow import App
from ..hot import DEFAULT_CAPACITY
from ..nats_server import NatsServer
from ..server import Server
from ..store import SqliteLog, parse_store
from ..streams import StreamSettings, parse_duration
from . import err, main, store_option

logger = logging.getLogger("evflow.cli")

NATS_SCHEMES = ("nats://", "tls://", "ws://", "wss://")


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
@store_option
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
    "--startup-timeout",
    type=Duration(),
    envvar="EVFLOW_STARTUP_TIMEOUT",
    show_envvar=True,
    default="60s",
    show_default=True,
    help="How long a start waits, trying again, for NATS to be reachable and JetStream to "
    "answer (a cluster electing leaders); 0 to fail at the first failure.",
)
@click.option(
    "--replicas",
    type=click.IntRange(min=1, max=5),
    envvar="EVFLOW_REPLICAS",
    show_envvar=True,
    default=1,
    show_default=True,
    help="Copies a NATS cluster keeps of the EVFLOW_EVENTS and EVFLOW_COMMANDS streams (a "
    "JetStream log takes its own from --store ...?replicas=N).",
)
@click.option(
    "--hot-executions",
    type=click.IntRange(min=0),
    envvar="EVFLOW_HOT_EXECUTIONS",
    show_envvar=True,
    default=DEFAULT_CAPACITY,
    show_default=True,
    help="Executions at a pause kept in memory, flow code waiting, so a resume replays "
    "nothing (about 4 KB each for a small flow; 0 keeps none).",
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
    startup_timeout: float,
    replicas: int,
    hot_executions: int,
    log_level: str,
) -> None:
    """Serve the flows of an App until SIGINT or SIGTERM."""
    _configure_logging(log_level)
    app = load_app(app_spec)
    _check_urls(store, nats_url)
    streams = StreamSettings(
        events_max_age=events_max_age,
        events_max_bytes=events_max_bytes,
        duplicate_window=duplicate_window,
        command_ack_wait=command_ack_wait,
        replicas=replicas,
    )
    options = {
        "streams": streams,
        "shutdown_timeout": shutdown_timeout,
        "startup_timeout": startup_timeout,
        "hot_executions": hot_executions,
    }
    try:
        asyncio.run(_serve(app, nats_url, store, options))
    except EvflowError as error:
        raise click.ClickException(error.message) from None


def _tune_collector() -> None:
    """Collect garbage less often, and never walk what start-up built.

    An engine allocates many short-lived objects per message and keeps many long-lived ones
    (hot executions, the latest events, the writer's heads). Under load, Python's default
    thresholds ran a full collection about twice a second, some 30 ms each, over all of
    them: a tenth of the engine's time, and its p99 latency. With a young generation of
    20,000 objects, full collections became rare (none in a 10 s run at 64 clients) and the
    p99 round trip fell from about 55 ms to 26 ms. This is the serving process's policy,
    so it lives here and not in the library.
    """
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)


def _configure_logging(level: str) -> None:
    """Rich log lines on a terminal; plain, unwrapped, timestamped lines for a log file."""
    if err.is_terminal:
        handler: logging.Handler = RichHandler(console=err)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


async def _serve(app: App, nats_url: str | None, store: str, options: dict[str, Any]) -> None:
    stop = _stop_on_signals()
    embedded = None
    if nats_url is None:
        embedded = NatsServer(_store_folder(store) / "nats", port=4222)
        await embedded.start()
        nats_url = embedded.url
    server = Server(app, store, nats_url, **options)
    try:
        await server.start()
        _tune_collector()
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
        parse_store(store)
    except EvflowError as error:
        raise click.BadParameter(error.message, param_hint="--store") from None
    for url in servers(nats_url) if nats_url is not None else []:
        if not url.startswith(NATS_SCHEMES):
            raise click.BadParameter(
                f"'{url}' is not a NATS URL; write it as nats://HOST:PORT (or tls://, ws://, "
                "wss://), for example nats://127.0.0.1:4222, and a cluster's nodes joined "
                "by commas",
                param_hint="--nats",
            )


def _store_folder(store: str) -> Path:
    """Where the embedded nats-server keeps its data: beside an SQLite log, else .evflow."""
    log = parse_store(store)
    return log.path.resolve().parent if isinstance(log, SqliteLog) else Path(".evflow")


def _announce(app: App, server: Server) -> None:
    for flow in app.latest():
        subject = server.subjects.invoke(flow.name)
        logger.info("serving flow '%s' %s on %s", flow.name, app.describe(flow.name), subject)
    example = next(iter(app.latest()), None)
    if example is not None:
        names = [field.name for field in msgspec.structs.fields(example.inputs)]
        fields = " ".join(f"--input {name}=..." for name in names)
        where = f" --nats {server.nats_url}" if server.nats_url != DEFAULT_URL else ""
        logger.info("try it: evflow invoke %s %s%s", example.name, fields, where)


def _stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM, installed before start-up so neither kills us."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def load_app(spec: str) -> App:
    """The App that ``--app MODULE:ATTR`` names, imported from the current folder first."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise click.BadParameter(
            f"'{spec}' is not MODULE:ATTR, e.g. examples.flows:app", param_hint="--app"
        )
    sys.path.insert(0, str(Path.cwd()))
    try:
        app = getattr(importlib.import_module(module_name), attr)
    except Exception as error:  # importing runs the module: any error of its own may arise
        raise click.BadParameter(
            f"cannot load '{spec}': {type(error).__name__}: {error}", param_hint="--app"
        ) from None
    if not isinstance(app, App):
        raise click.BadParameter(
            f"'{spec}' is a {type(app).__name__}, not an evflow App", param_hint="--app"
        )
    return app
