"""The pause-and-resume cycle, end to end, and what the log costs to fold, replay and start on.

Measures, each on a fresh SQLite log in a temporary folder:

- **cycles**: ``evflow serve`` (a child process) on a nats-server started here; N clients at
  once each invoke ``approve``, get the paused reply, resume it and get the completed reply,
  over the NATS contract, for a fixed time. Prints cycles per second, p50 and p99 of
  invoke-to-paused and resume-to-completed, events appended per second (from the log), and
  the engine's peak RSS. Client and engine share the machine, as users' load tests do.
- **fold and replay**: histories folded into state, and replayed through the runtime
  (``evflow.replay``), in events per second; and replay of the start-up log, read from
  SQLite a window at a time as ``evflow replay`` does.
- **start-up**: ``evflow serve`` from spawn to "listening" with M executions paused in the
  log, and its RSS then.

Run it with ``ops/bench [--clients 1,64] [--seconds S] [--paused M] [--json FILE]``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import nats
import psutil
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

OPS = Path(__file__).resolve().parent
sys.path.insert(0, str(OPS))

from bench_flows import app  # noqa: E402
from bench_timers import serve_start  # noqa: E402
from machine import machine  # noqa: E402

from evflow.events import (  # noqa: E402
    ExecutionCompleted,
    ExecutionPaused,
    ExecutionResumed,
    ExecutionStarted,
    StoredEvent,
    new_execution_id,
)
from evflow.nats_server import NatsServer  # noqa: E402
from evflow.replay import (  # noqa: E402
    REPLAY_WINDOW,
    execution_ids,
    replay_histories,
    replay_log,
)
from evflow.state import fold  # noqa: E402
from evflow.store.sqlite import SqliteStore  # noqa: E402

console = Console()
READY = "listening on"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
INVOKE = b'{"amount": 12.5}'
RESUME = b'{"approved": true}'


# The cycle, through NATS.


class Engine:
    """``evflow serve`` of the bench flows as a child process, with its memory sampled."""

    def __init__(self, store: Path, nats_url: str):
        self.store = store
        self.nats_url = nats_url
        self.process: asyncio.subprocess.Process | None = None
        self.peak_rss = 0
        self._sampler: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Engine:
        env = dict(os.environ, PYTHONPATH=str(OPS))
        self.process = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "evflow"), "serve", "--app", "bench_flows:app",
            "--nats", self.nats_url, "--store", f"sqlite:///{self.store}",
            "--log-level", "warning", env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        self._sampler = asyncio.create_task(self._sample())
        return self

    async def _sample(self) -> None:
        assert self.process is not None
        process = psutil.Process(self.process.pid)
        while True:
            self.peak_rss = max(self.peak_rss, process.memory_info().rss)
            await asyncio.sleep(0.1)

    async def __aexit__(self, *_: object) -> None:
        assert self.process is not None and self._sampler is not None
        self._sampler.cancel()
        self.process.terminate()
        await self.process.wait()


async def ready(nc: nats.NATS) -> None:
    """Wait until the engine answers an invoke (it has started and registered the flows)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            await nc.request("evflow.flo.approve.invoke", INVOKE, timeout=1)
            return
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            if time.monotonic() > deadline:
                raise RuntimeError("evflow serve did not answer within 60 s") from None
            await asyncio.sleep(0.2)


async def cycle(nc: nats.NATS, paused: list[float], completed: list[float]) -> None:
    """One invoke, pause, resume, complete; the two round trips' seconds are recorded."""
    began = time.perf_counter()
    reply = await nc.request("evflow.flo.approve.invoke", INVOKE, timeout=30)
    middle = time.perf_counter()
    execution_id = reply.headers["Evflow-Execution-Id"]  # type: ignore[index]
    assert json.loads(reply.data)["status"] == "paused", reply.data
    reply = await nc.request(f"evflow.flo.approve.resume.{execution_id}", RESUME, timeout=30)
    assert json.loads(reply.data)["status"] == "completed", reply.data
    paused.append(middle - began)
    completed.append(time.perf_counter() - middle)


async def load(nc: nats.NATS, clients: int, seconds: float) -> tuple[int, list[float], list[float]]:
    """``clients`` loops of cycles for ``seconds``; cycles done and the two latencies."""
    paused: list[float] = []
    completed: list[float] = []
    stop = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < stop:
            await cycle(nc, paused, completed)

    await asyncio.gather(*(client() for _ in range(clients)))
    return len(completed), paused, completed


def last_position(store: Path) -> int:
    with closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:
        return db.execute("SELECT coalesce(max(position), 0) FROM events").fetchone()[0]


async def cycles(work: Path, nats_url: str, clients: int, seconds: float) -> dict[str, float]:
    """The cycle figures with ``clients`` at once, after two seconds of warm-up."""
    store = work / f"cycles-{clients}.db"
    async with Engine(store, nats_url) as engine:
        nc = await nats.connect(nats_url)
        try:
            await ready(nc)
            await load(nc, clients, 2.0)
            first = last_position(store)
            began = time.perf_counter()
            done, paused, completed = await load(nc, clients, seconds)
            took = time.perf_counter() - began
            events = last_position(store) - first
        finally:
            await nc.drain()
    return {
        "clients": clients,
        "cycles_per_second": done / took,
        "invoke_to_paused_p50_ms": percentile(paused, 50),
        "invoke_to_paused_p99_ms": percentile(paused, 99),
        "resume_to_completed_p50_ms": percentile(completed, 50),
        "resume_to_completed_p99_ms": percentile(completed, 99),
        "events_per_second": events / took,
        "engine_peak_rss_mb": engine.peak_rss / 2**20,
    }


def percentile(seconds: list[float], p: int) -> float:
    """The ``p``th percentile of ``seconds``, in milliseconds."""
    return statistics.quantiles(seconds, n=100, method="inclusive")[p - 1] * 1000


# Fold and replay, in process.


def history(execution_id: str) -> list[StoredEvent]:
    """A completed ``approve`` execution as the engine records it."""
    events = [
        ExecutionStarted("approve", {"amount": 12.5}),
        ExecutionPaused(1, "pause", {"amount": 12.5}, {"approved": "bool"}, {"type": "object"}),
        ExecutionResumed(1, {"approved": True}),
        ExecutionCompleted({"amount": 12.5, "approved": True}),
    ]
    return [StoredEvent(execution_id, v, T0, e, v) for v, e in enumerate(events, 1)]


async def fold_and_replay(executions: int) -> dict[str, float]:
    """Events per second folded into state, and replayed through the runtime.

    The histories are built first and then frozen out of the garbage collector's sight: a
    replay of a log reads a window at a time and never holds such a heap, whose traversal
    by the collector took a third of the replay's time here.
    """
    histories = [history(new_execution_id()) for _ in range(executions)]
    events = sum(len(h) for h in histories)
    gc.freeze()
    try:
        return await _time_fold_and_replay(histories, events)
    finally:
        gc.unfreeze()


async def _time_fold_and_replay(
    histories: list[list[StoredEvent]], events: int
) -> dict[str, float]:
    began = time.perf_counter()
    for events_of_one in histories:
        fold(events_of_one)
    folded = time.perf_counter() - began

    began = time.perf_counter()
    for start in range(0, len(histories), REPLAY_WINDOW):  # as evflow replay does
        for verdict in await replay_histories(app, histories[start : start + REPLAY_WINDOW]):
            assert verdict.outcome == "ok", verdict
    replayed = time.perf_counter() - began
    return {
        "events": events,
        "fold_events_per_second": events / folded,
        "replay_events_per_second": events / replayed,
    }


# Start-up with many paused executions.


async def replay_stored(path: Path) -> dict[str, float]:
    """Events per second that ``evflow replay``'s path checks in a log: read and replayed."""
    store = SqliteStore(path, read_only=True)
    await store.open()
    try:
        began = time.perf_counter()
        executions = await execution_ids(store)
        events = 0
        async for verdict in replay_log(app, store, executions):
            assert verdict.outcome == "ok", verdict
            events += verdict.events
        seconds = time.perf_counter() - began
    finally:
        await store.close()
    return {"events": events, "events_per_second": events / seconds}


async def populate_paused(path: Path, executions: int) -> None:
    """Append ``executions`` executions paused on ``approve``'s pause."""
    store = SqliteStore(path)
    await store.open()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"writing {executions:,} paused executions", total=executions)
        for first in range(0, executions, 1000):
            count = min(1000, executions - first)
            batch = [history(new_execution_id())[:2] for _ in range(count)]
            await asyncio.gather(*(store.append(h[0].execution_id, 0, h) for h in batch))
            progress.advance(task, len(batch))
    await store.close()


async def run(clients: list[int], seconds: float, paused: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="evflow-bench-") as folder:
        work = Path(folder)
        figures: dict[str, Any] = {"cycles": [], "paused": paused}
        server = NatsServer(work / "nats", port=0)
        await server.start()
        try:
            for n in clients:
                console.print(f"cycles with {n} client(s) for {seconds:g} s ...")
                figures["cycles"].append(await cycles(work, server.url, n, seconds))
            figures["fold_replay"] = await fold_and_replay(20_000)
            await populate_paused(work / "paused.db", paused)
            figures["startup"] = await serve_start(work / "paused.db", server.url)
            figures["replay_log"] = await replay_stored(work / "paused.db")
        finally:
            await server.stop()
    return figures


def report(figures: dict[str, Any]) -> None:
    table = Table(title="evflow: the pause-and-resume cycle over NATS, SQLite synchronous=FULL")
    for column in ("clients", "cycles/s", "invoke→paused ms p50/p99", "resume→done ms p50/p99"):
        table.add_column(column, justify="right")
    table.add_column("events/s", justify="right")
    table.add_column("peak RSS", justify="right")
    for row in figures["cycles"]:
        table.add_row(
            str(row["clients"]),
            f"{row['cycles_per_second']:,.0f}",
            f"{row['invoke_to_paused_p50_ms']:.2f} / {row['invoke_to_paused_p99_ms']:.2f}",
            f"{row['resume_to_completed_p50_ms']:.2f} / {row['resume_to_completed_p99_ms']:.2f}",
            f"{row['events_per_second']:,.0f}",
            f"{row['engine_peak_rss_mb']:.0f} MB",
        )
    console.print(table)
    fr, start = figures["fold_replay"], figures["startup"]
    console.print(f"fold:   {fr['fold_events_per_second']:,.0f} events/s")
    console.print(f"replay: {fr['replay_events_per_second']:,.0f} events/s")
    stored = figures["replay_log"]
    console.print(
        f"replay of the log's {stored['events']:,} events, read from SQLite: "
        f"{stored['events_per_second']:,.0f} events/s"
    )
    console.print(
        f"start-up with {figures['paused']:,} paused executions: {start['seconds']:.2f} s, "
        f"RSS {start['rss_mb']:.0f} MB"
    )
    console.print(f"command: {figures['command']}")
    console.print(f"machine: {figures['machine']}")


@click.command()
@click.option("--clients", default="1,64", show_default=True, help="Client counts, by commas.")
@click.option("--seconds", default=10.0, show_default=True, help="Measured seconds per count.")
@click.option("--paused", default=100_000, show_default=True, help="Paused, for start-up.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write here.")
def main(clients: str, seconds: float, paused: int, json_path: str | None) -> None:
    """Measure the cycle, fold and replay, and start-up with many paused executions."""
    counts = [int(n) for n in clients.split(",")]
    figures = asyncio.run(run(counts, seconds, paused))
    figures["machine"] = machine()
    figures["command"] = ("ops/bench " + " ".join(sys.argv[1:])).strip()
    report(figures)
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
