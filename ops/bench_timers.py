"""What many pending timers cost: start-up time, memory, and firing rate.

Writes N executions that each wait on a timer into a fresh SQLite log, then measures:

- ``evflow serve`` start-up with that log, from spawn to "listening", and its RSS then,
  next to the same for an empty log;
- in-process, the engine's load of the N timers, the tasks they cost, and how fast it
  fires them all once a ``ManualClock`` is moved past their due times.

Run it with ``ops/bench-timers [--executions N] [--json FILE]``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import psutil
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

OPS = Path(__file__).resolve().parent
sys.path.insert(0, str(OPS))

from bench_flows import app  # noqa: E402
from machine import machine  # noqa: E402

from evflow import Engine, ManualClock  # noqa: E402
from evflow.events import ExecutionStarted, StoredEvent, TimerStarted  # noqa: E402
from evflow.nats_server import NatsServer  # noqa: E402
from evflow.store.sqlite import SqliteStore  # noqa: E402

T0 = datetime.now(UTC).replace(microsecond=0)
"""Now: every timer is due a day or more from now, so none fires while serve starts."""
READY = "listening on"
console = Console()


async def populate(path: Path, executions: int) -> float:
    """Append ``executions`` waiting executions (as ``sleeper`` records them); seconds taken."""
    store = SqliteStore(path)
    await store.open()
    began = time.perf_counter()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"writing {executions:,} waiting executions", total=executions)
        for first in range(0, executions, 1000):
            batch = range(first, min(first + 1000, executions))
            await asyncio.gather(*(store.append(*_waiting(n)) for n in batch))
            progress.advance(task, len(batch))
    seconds = time.perf_counter() - began
    await store.close()
    return seconds


def _waiting(n: int) -> tuple[str, int, list[StoredEvent]]:
    execution_id = uuid.uuid4().hex
    hours = 24 + n / 3600
    started = ExecutionStarted("sleeper", {"hours": hours})
    timer = TimerStarted(1, T0 + timedelta(hours=hours))
    return (
        execution_id,
        0,
        [
            StoredEvent(execution_id, 1, T0, started),
            StoredEvent(execution_id, 2, T0, timer),
        ],
    )


async def serve_start(store: Path, nats_url: str) -> dict[str, float]:
    """Start ``evflow serve`` on ``store``; seconds to "listening", and its memory then."""
    env = dict(os.environ, PYTHONPATH=str(OPS))
    evflow = Path(sys.executable).parent / "evflow"
    began = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        str(evflow), "serve", "--app", "bench_flows:app", "--nats", nats_url,
        "--store", f"sqlite:///{store}", env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    output = []
    while True:
        line = (await asyncio.wait_for(process.stderr.readline(), 120)).decode()
        if not line:
            raise RuntimeError("evflow serve exited before listening:\n" + "".join(output))
        output.append(line)
        if READY in line:
            break
    seconds = time.perf_counter() - began
    memory = psutil.Process(process.pid).memory_info()
    process.terminate()
    await process.wait()
    return {"seconds": seconds, "rss_mb": memory.rss / 2**20}


async def fire_all(path: Path, executions: int) -> dict[str, float]:
    """Load the timers into an engine on a manual clock, then fire every one of them."""
    clock = ManualClock(T0)
    store = SqliteStore(path)
    await store.open()
    engine = Engine(app, store, clock=clock)
    tasks_before = len(asyncio.all_tasks())
    rss_before = psutil.Process().memory_info().rss

    began = time.perf_counter()
    await engine.start()
    loaded = time.perf_counter() - began
    pending = len(engine.timers)
    tasks = len(asyncio.all_tasks()) - tasks_before
    scheduler_mb = (psutil.Process().memory_info().rss - rss_before) / 2**20

    began = time.perf_counter()
    clock.advance(timedelta(days=365))
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"firing {pending:,} timers", total=pending)
        while engine.timers.fired < pending:
            await asyncio.sleep(0.2)
            progress.update(task, completed=engine.timers.fired)
    while await store.unsettled():  # the last firings' flows still finishing
        await asyncio.sleep(0.05)
    fired = time.perf_counter() - began

    await engine.stop()
    await store.close()
    assert pending == executions, f"loaded {pending} timers of {executions}"
    return {
        "load_seconds": loaded,
        "pending": pending,
        "tasks": tasks,
        "scheduler_rss_mb": scheduler_mb,
        "fire_seconds": fired,
        "fired_per_second": pending / fired,
    }


async def run(executions: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="evflow-bench-") as folder:
        work = Path(folder)
        figures: dict[str, Any] = {"executions": executions}
        figures["populate_seconds"] = await populate(work / "timers.db", executions)
        nats = NatsServer(work / "nats", port=0)
        await nats.start()
        try:
            figures["serve_empty"] = await serve_start(work / "empty.db", nats.url)
            figures["serve_loaded"] = await serve_start(work / "timers.db", nats.url)
        finally:
            await nats.stop()
        figures["in_process"] = await fire_all(work / "timers.db", executions)
    return figures


def report(figures: dict[str, Any], command: str) -> None:
    n = figures["executions"]
    empty, loaded, engine = figures["serve_empty"], figures["serve_loaded"], figures["in_process"]
    table = Table(title=f"{n:,} executions waiting on a timer")
    table.add_column("measure")
    table.add_column("figure", justify="right")
    rows = [
        ("evflow serve start-up, empty log", f"{empty['seconds']:.2f} s"),
        (f"evflow serve start-up, {n:,} waiting", f"{loaded['seconds']:.2f} s"),
        ("evflow serve RSS after start, empty log", f"{empty['rss_mb']:.0f} MB"),
        (f"evflow serve RSS after start, {n:,} waiting", f"{loaded['rss_mb']:.0f} MB"),
        ("engine: load the pending timers", f"{engine['load_seconds']:.2f} s"),
        ("engine: memory the loaded timers take", f"{engine['scheduler_rss_mb']:.0f} MB"),
        ("engine: tasks the pending timers take", f"{engine['tasks']}"),
        ("engine: fire all and complete their flows", f"{engine['fire_seconds']:.1f} s"),
        ("engine: timers fired per second", f"{engine['fired_per_second']:,.0f}"),
        ("(writing the log beforehand)", f"{figures['populate_seconds']:.1f} s"),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"command: {command}")
    console.print(f"machine: {figures['machine']}")


@click.command()
@click.option("--executions", default=100_000, show_default=True, help="Waiting executions.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write here.")
def main(executions: int, json_path: str | None) -> None:
    """Measure start-up, memory and firing with many executions waiting on timers."""
    figures = asyncio.run(run(executions))
    figures["machine"] = machine()
    command = "ops/bench-timers " + " ".join(sys.argv[1:])
    figures["command"] = command.strip()
    report(figures, figures["command"])
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
