"""What the JetStream log's start-up scans and listing cost on a log of many executions.

Writes N executions into a fresh JetStream log on one local nats-server (each a start and
two steps, then a quarter each waiting on a timer, paused with a deadline, completed, or
left running), then times, on that log:

- ``unsettled()`` and ``pending_timers()`` of the whole log: an engine alone starting;
- the same for one partition: an engine taking over a partition on a cluster;
- ``list_executions()``: the first page of ``evflow ls``, and one filtered by flow and status.

Each figure is the median of a few runs. Run it with ``ops/bench-scans [--executions N]``.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
from machine import machine
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from evflow.events import (
    Event,
    ExecutionCompleted,
    ExecutionPaused,
    ExecutionStarted,
    StepCompleted,
    StoredEvent,
    TimerStarted,
)
from evflow.nats_server import NatsServer
from evflow.partitions import partition_of
from evflow.state import Status
from evflow.store.jetstream import JetStreamStore

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
RUNS = 3
"""Runs of each scan; the median is reported."""
console = Console()


def history(n: int) -> tuple[str, list[StoredEvent]]:
    """Execution ``n``: a start, two steps, then a timer, a pause, a completion or nothing."""
    execution_id = uuid.uuid4().hex
    later = T0 + timedelta(days=1, seconds=n)
    events: list[Event] = [
        ExecutionStarted("sleeper" if n % 2 else "approval", {"n": n}),
        StepCompleted(1, "fetch", {"n": n}),
        StepCompleted(2, "check", True),
    ]
    ending: Event | None = [
        TimerStarted(3, later),
        ExecutionPaused(3, "approve", {}, {"approved": "bool"}, {}, deadline=later),
        ExecutionCompleted({"n": n}),
        None,
    ][n % 4]
    if ending is not None:
        events.append(ending)
    stamped = [
        StoredEvent(execution_id, version, T0, event)
        for version, event in enumerate(events, start=1)
    ]
    return execution_id, stamped


async def populate(store: JetStreamStore, executions: int) -> float:
    """Append ``executions`` histories, 200 at a time; seconds taken."""
    began = time.perf_counter()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"writing {executions:,} executions", total=executions)
        for first in range(0, executions, 200):
            batch = [history(n) for n in range(first, min(first + 200, executions))]
            await asyncio.gather(*(store.append(e, 0, events) for e, events in batch))
            progress.advance(task, len(batch))
    return time.perf_counter() - began


async def timed(scan: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    """The median seconds of ``RUNS`` runs of ``scan``, and what the last run gave."""
    seconds = []
    for _ in range(RUNS):
        began = time.perf_counter()
        found = await scan()
        seconds.append(time.perf_counter() - began)
    return statistics.median(seconds), found


async def measure(store: JetStreamStore, partition: int) -> dict[str, dict[str, float]]:
    """Each scan's median seconds and how many items it found."""
    one = {partition}
    scans: dict[str, Callable[[], Awaitable[Any]]] = {
        "unsettled, whole log": store.unsettled,
        "pending_timers, whole log": store.pending_timers,
        "unsettled, one partition": lambda: store.unsettled(one),
        "pending_timers, one partition": lambda: store.pending_timers(one),
        "list_executions, first page": store.list_executions,
        "list_executions, sleeper paused": lambda: store.list_executions(
            flow="sleeper", status=Status.PAUSED
        ),
    }
    figures = {}
    for name, scan in scans.items():
        seconds, found = await timed(scan)
        figures[name] = {"seconds": seconds, "found": len(found)}
    return figures


async def run(executions: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="evflow-bench-") as folder:
        nats = NatsServer(Path(folder) / "nats", port=0)
        await nats.start()
        store = JetStreamStore(nats.url, timeout=30.0)
        try:
            await store.open()
            figures: dict[str, Any] = {"executions": executions}
            figures["populate_seconds"] = await populate(store, executions)
            figures["events"] = await store.last_position()
            partition = partition_of((await store.read_all(0, 1))[0].execution_id)
            figures["scans"] = await measure(store, partition)
        finally:
            await store.close()
            await nats.stop()
    return figures


def report(figures: dict[str, Any]) -> None:
    n = figures["executions"]
    table = Table(title=f"JetStream log scans, {n:,} executions ({figures['events']:,} events)")
    table.add_column("scan")
    table.add_column("seconds (median)", justify="right")
    table.add_column("found", justify="right")
    for name, figure in figures["scans"].items():
        table.add_row(name, f"{figure['seconds']:.3f}", f"{figure['found']:,}")
    table.add_row("(writing the log beforehand)", f"{figures['populate_seconds']:.1f}", "")
    console.print(table)
    console.print(f"command: {figures['command']}")
    console.print(f"machine: {figures['machine']}")


@click.command()
@click.option("--executions", default=20_000, show_default=True, help="Executions written.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write here.")
def main(executions: int, json_path: str | None) -> None:
    """Time the JetStream log's start-up scans and listing on a log of many executions."""
    figures = asyncio.run(run(executions))
    figures["machine"] = machine()
    figures["command"] = ("ops/bench-scans " + " ".join(sys.argv[1:])).strip()
    report(figures)
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
