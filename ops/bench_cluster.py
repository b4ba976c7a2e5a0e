"""The pause-and-resume cycle with one, two and three engines on a three-node NATS cluster
(the JetStream log, three replicas of everything), next to one engine on SQLite on the same
machine. Each count gets a fresh cluster and log; clients spread over the nodes.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import click
import nats
from rich.console import Console
from rich.table import Table

OPS = Path(__file__).resolve().parent
sys.path.insert(0, str(OPS))

from bench import load, percentile, ready  # noqa: E402
from machine import machine  # noqa: E402

from evflow.nats_cluster import NatsCluster  # noqa: E402
from evflow.nats_server import NatsServer  # noqa: E402

console = Console()


async def start_engine(
    nats_url: str, store: str, replicas: int, log: Path
) -> asyncio.subprocess.Process:
    """``evflow serve`` of the bench flows as a child, its warnings and errors in ``log``."""
    with log.open("wb") as err:
        return await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "evflow"), "serve", "--app", "bench_flows:app",
            "--nats", nats_url, "--store", store, "--replicas", str(replicas),
            "--log-level", "warning", env=dict(os.environ, PYTHONPATH=str(OPS)),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=err,
        )  # fmt: skip


async def stop_engine(child: asyncio.subprocess.Process, log: Path) -> None:
    """Stop an engine; one that had exited already is reported with its log's end."""
    if child.returncode is None:
        child.terminate()
    code = await child.wait()
    if code not in (0, -15):
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"an engine exited with {code}; its log ends:\n{tail}")


async def measure(urls: list[str], clients: int, seconds: float) -> dict[str, float]:
    """Cycles per second and round trips with ``clients`` spread over ``urls``."""
    connections = [await nats.connect(urls[i % len(urls)]) for i in range(min(clients, 8))]
    try:
        await ready(connections[0])
        per = [clients // len(connections)] * len(connections)
        per[0] += clients - sum(per)
        pairs = list(zip(connections, per, strict=True))
        await asyncio.gather(*(load(nc, n, 2.0) for nc, n in pairs))  # warm-up
        runs = await asyncio.gather(*(load(nc, n, seconds) for nc, n in pairs))
    finally:
        for nc in connections:
            await nc.drain()
    done = sum(run[0] for run in runs)
    paused = [s for run in runs for s in run[1]]
    completed = [s for run in runs for s in run[2]]
    return {
        "cycles_per_second": done / seconds,
        "invoke_to_paused_p50_ms": percentile(paused, 50),
        "resume_to_completed_p50_ms": percentile(completed, 50),
    }


async def on_cluster(engines: int, clients: int, seconds: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="evflow-bench-cluster-") as folder:
        cluster = NatsCluster(Path(folder))
        await cluster.start()
        children = []
        try:
            url = ",".join(cluster.urls)
            for n in range(engines):
                log = Path(folder) / f"engine-{n}.log"
                child = await start_engine(url, "jetstream?replicas=3", 3, log)
                children.append((child, log))
            return await measure(cluster.urls, clients, seconds)
        finally:
            for child, log in children:
                await stop_engine(child, log)
            await cluster.stop()


async def on_sqlite(clients: int, seconds: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="evflow-bench-cluster-") as folder:
        server = NatsServer(Path(folder) / "nats", port=0)
        await server.start()
        log = Path(folder) / "engine.log"
        child = await start_engine(server.url, f"sqlite:///{folder}/evflow.db", 1, log)
        try:
            return await measure([server.url], clients, seconds)
        finally:
            await stop_engine(child, log)
            await server.stop()


async def run(engines: list[int], clients: int, seconds: float) -> list[dict[str, Any]]:
    rows = []
    console.print(f"one engine on SQLite, {clients} clients, {seconds:g} s ...")
    rows.append({"setup": "1 engine, SQLite, 1 nats-server", **await on_sqlite(clients, seconds)})
    for n in engines:
        console.print(f"{n} engine(s) on the cluster, {clients} clients, {seconds:g} s ...")
        figures = await on_cluster(n, clients, seconds)
        rows.append({"setup": f"{n} engine(s), JetStream log, 3 nodes, 3 replicas", **figures})
    return rows


@click.command()
@click.option("--engines", default="1,2,3", show_default=True, help="Engine counts, by commas.")
@click.option("--clients", default=64, show_default=True, help="Clients at once.")
@click.option("--seconds", default=10.0, show_default=True, help="Measured seconds per setup.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write here.")
def main(engines: str, clients: int, seconds: float, json_path: str | None) -> None:
    """Cycles per second with engines on a NATS cluster, beside one engine on SQLite."""
    rows = asyncio.run(run([int(n) for n in engines.split(",")], clients, seconds))
    table = Table(title=f"evflow: the cycle with {clients} clients, engines on a NATS cluster")
    for column in ("setup", "cycles/s", "invoke→paused p50 ms", "resume→done p50 ms"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row["setup"],
            f"{row['cycles_per_second']:,.0f}",
            f"{row['invoke_to_paused_p50_ms']:.2f}",
            f"{row['resume_to_completed_p50_ms']:.2f}",
        )
    console.print(table)
    command = ("ops/bench-cluster " + " ".join(sys.argv[1:])).strip()
    console.print(f"command: {command}\nmachine: {machine()}")
    if json_path:
        figures = {"rows": rows, "command": command, "machine": machine()}
        Path(json_path).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
