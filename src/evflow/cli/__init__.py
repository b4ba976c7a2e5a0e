"""The ``evflow`` command: serve an app, and invoke, resume, cancel and inspect executions.

Built on click (parsing, environment variables, help) and rich (tables and colour).
``serve`` lives in ``cli.serve``; the commands that talk to a running engine in
``cli.executions``; ``replay``, which reads a log offline, in ``cli.replay``.
"""

from __future__ import annotations

import click
from rich.console import Console

from ..client import DEFAULT_URL

out = Console(soft_wrap=True)  # replies are read by programs too: never break a line
err = Console(stderr=True, soft_wrap=True)

nats_option = click.option(
    "--nats",
    "nats_url",
    envvar="EVFLOW_NATS_URL",
    default=DEFAULT_URL,
    show_default=True,
    help="NATS server URL (env EVFLOW_NATS_URL).",
)

DEFAULT_STORE = "sqlite:///.evflow/evflow.db"

store_option = click.option(
    "--store",
    envvar="EVFLOW_STORE",
    default=DEFAULT_STORE,
    show_default=True,
    help=(
        "The event log: sqlite:///PATH, or a JetStream log as nats://HOST:PORT[,...]"
        "[?replicas=N] or jetstream (on evflow's NATS server) (env EVFLOW_STORE)."
    ),
)
"""The log a command reads or writes; ``serve`` and the offline audit commands share it."""


@click.group()
@click.version_option(package_name="evflow")
def main() -> None:
    """evflow: event-sourced pause-and-resume flows on NATS."""


from . import (  # noqa: E402, F401  (each registers its commands on main)
    audit,
    executions,
    replay,
    schemas,
    serve,
)
