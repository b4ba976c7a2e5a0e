"""Engines on a three-node NATS cluster with a replicated JetStream log (issue 7).

Two ``evflow serve`` processes share the log's partitions. Load runs through them while one
engine is SIGKILLed, or one NATS node is SIGKILLed and restarted. Afterwards: every invoke
that was answered is in the log, paused and resumable; every history is whole, each
version once; every wait timer fired exactly once; no execution is left running, with no
engine started again: the survivor took over the dead engine's partitions.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from evflow import Client, EvflowError, Status
from evflow.messages import Paused, Waiting
from evflow.nats_cluster import NatsCluster
from processes import ROOT, Child, Spawn, cli_env

TESTS = ROOT / "tests"
WAIT_MS = 200
"""The ``timed`` flow's wait: short, so timers fire while the faults happen."""


def engine_args(cluster: NatsCluster) -> list[str]:
    return [
        "serve", "--app", "fault_flows:app", "--nats", ",".join(cluster.urls),
        "--store", "jetstream?replicas=3", "--replicas", "3", "--shutdown-timeout", "2s",
    ]  # fmt: skip


async def start_engine(spawn: Spawn, cluster: NatsCluster, tmp_path: Path) -> Child:
    (tmp_path / "effects").mkdir(exist_ok=True)
    env = cli_env(PYTHONPATH=str(TESTS), EVFLOW_FAULT_DIR=str(tmp_path))
    engine = await spawn(*engine_args(cluster), env=env)
    await engine.wait_for("listening on")
    return engine


async def start_engines(spawn: Spawn, cluster: NatsCluster, tmp_path: Path) -> list[Child]:
    """Two engines, once each holds a share of the partitions."""
    engines = [await start_engine(spawn, cluster, tmp_path) for _ in range(2)]
    for engine in engines:
        await engine.wait_for("took partition")
    return engines


async def load(client: Client, seconds: float, fault: Callable[[], Awaitable[None]]) -> list[str]:
    """Invoke ``order`` and ``timed`` from 8 workers, each about ten times a second, for
    ``seconds``, with ``fault`` a second in; the IDs of the executions whose invoke was
    answered."""
    answered: list[str] = []
    numbers = itertools.count()
    stop = asyncio.get_running_loop().time() + seconds

    async def worker() -> None:
        while asyncio.get_running_loop().time() < stop:
            n = next(numbers)
            flow, inputs = ("order", {"n": n}) if n % 2 else ("timed", _timed(n))
            try:
                settled = await client.invoke(flow, inputs)
            except EvflowError:
                await asyncio.sleep(0.05)  # unanswered: it may or may not have started
                continue
            answered.append(settled.execution_id)
            await asyncio.sleep(0.1)

    async def later() -> None:
        await asyncio.sleep(1)
        await fault()

    await asyncio.gather(later(), *(worker() for _ in range(8)))
    return answered


def _timed(n: int) -> dict[str, int]:
    return {"n": n, "wait_ms": WAIT_MS, "expire_ms": 600_000}


async def settle_all(client: Client, answered: list[str]) -> None:
    """Resume every answered execution once it is paused, until each has ended."""
    slots = asyncio.Semaphore(16)

    async def settle(execution_id: str) -> None:
        async with slots:
            while True:
                try:
                    state = await client.get(execution_id)
                    if state.status is Status.PAUSED:
                        await client.resume(state.flow, execution_id, {"ok": True})
                        continue
                except EvflowError:
                    await asyncio.sleep(0.2)  # a node or an engine still coming back
                    continue
                if state.status in (Status.COMPLETED, Status.FAILED):
                    return  # judged by check_histories
                await asyncio.sleep(0.1)  # waiting on its timer

    async with asyncio.timeout(60):
        await asyncio.gather(*(settle(execution_id) for execution_id in answered))


async def check_histories(client: Client, answered: list[str]) -> None:
    """Every history whole, each version once; ``timed`` fired its wait exactly once."""
    for execution_id in answered:
        history = await client.history(execution_id)
        assert [s.version for s in history] == list(range(1, len(history) + 1))
        kinds = [type(s.event).__name__ for s in history]
        assert kinds.count("StepCompleted") == 2, kinds
        if history[0].event.flow == "timed":  # type: ignore[attr-defined]
            assert kinds.count("TimerFired") == 1, kinds


async def none_left_running(client: Client) -> None:
    """After recovery, no execution of the log is still running."""
    async with asyncio.timeout(30):
        while (await client.list_executions(status="running")).executions:
            await asyncio.sleep(0.2)


@pytest.mark.timeout(180)
async def test_a_killed_engine_loses_nothing(
    nats_cluster: NatsCluster, spawn: Spawn, tmp_path: Path
):
    engines = await start_engines(spawn, nats_cluster, tmp_path)
    client = await Client.connect(",".join(nats_cluster.urls), timeout=5)
    try:
        answered = await load(client, 4, engines[0].kill)

        assert len(answered) > 20
        await engines[1].wait_for("from engine")  # took the dead one's share
        await settle_all(client, answered)
        await check_histories(client, answered)
        await none_left_running(client)
        assert engines[1].process.returncode is None
    finally:
        await client.close()


@pytest.mark.timeout(180)
async def test_a_killed_nats_node_loses_nothing(
    nats_cluster: NatsCluster, spawn: Spawn, tmp_path: Path
):
    engines = await start_engines(spawn, nats_cluster, tmp_path)
    client = await Client.connect(",".join(nats_cluster.urls), timeout=5)

    async def kill_and_restart_a_node() -> None:
        """The node that leads the log's stream: its followers must elect another."""
        info = await client.nc.request("$JS.API.STREAM.INFO.EVFLOW_LOG", b"", timeout=5)
        leader = json.loads(info.data)["cluster"]["leader"]
        node = [nats_cluster.name(i) for i in range(len(nats_cluster.urls))].index(leader)
        nats_cluster.kill(node)
        await nats_cluster.stop_node(node)
        await asyncio.sleep(1)
        await nats_cluster.start_node(node)
        await nats_cluster.until_ready()

    try:
        answered = await load(client, 5, kill_and_restart_a_node)

        assert len(answered) > 20
        await settle_all(client, answered)
        await check_histories(client, answered)
        await none_left_running(client)  # what the outage cut short was driven on
        assert all(engine.process.returncode is None for engine in engines)
        # No engine died, so no step of an answered invoke ran twice (each call of a step
        # leaves a line; one cut short by the outage, unanswered, may run again: at least once).
        calls = (tmp_path / "runs.log").read_text().split()[::2]
        ours = [key for key in calls if key.split("/")[0] in set(answered)]
        assert len(ours) == len(set(ours)) == 2 * len(answered)
    finally:
        await client.close()


async def until_answered(invoke: Callable[[], Awaitable[object]]) -> object:
    """Send a command until an engine answers it (JetStream electing refuses it a while)."""
    async with asyncio.timeout(90):
        while True:
            try:
                return await invoke()
            except EvflowError:
                await asyncio.sleep(0.5)


async def notified_until(notes: Any, execution_id: str, last: str) -> list[str]:
    """The kinds of the notifications about ``execution_id``, up to one of kind ``last``."""
    kinds: list[str] = []
    async with asyncio.timeout(30):
        while last not in kinds:
            *_, about, kind = (await notes.next_msg(timeout=30)).subject.split(".")
            if about == execution_id:
                kinds.append(kind)
    return kinds


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_engines_act_again_when_the_cluster_regains_its_quorum(
    nats_cluster: NatsCluster, spawn: Spawn, tmp_path: Path
):
    """Two of three nodes down: every engine stops acting at its fence. Once the nodes are
    back, the engines act on their partitions again, though JetStream still elects for a
    while: commands are answered, timers fire, and notifications flow again."""
    engines = await start_engines(spawn, nats_cluster, tmp_path)
    client = await Client.connect(",".join(nats_cluster.urls), timeout=5)
    try:
        notes = await client.nc.subscribe("evflow.events.>")
        for node in (1, 2):
            nats_cluster.kill(node)
            await nats_cluster.stop_node(node)
        for engine in engines:
            await engine.wait_for("stops acting on them")
        for node in (1, 2):
            await nats_cluster.start_node(node)
        timed = await until_answered(lambda: client.invoke("timed", _timed(1)))
        paused = await until_answered(lambda: client.invoke("order", {"n": 2}))

        assert isinstance(timed, Waiting) and isinstance(paused, Paused)
        kinds = await notified_until(notes, paused.execution_id, "paused")
        assert kinds[0] == "started" and kinds.count("paused") == 1
        await settle_all(client, [timed.execution_id, paused.execution_id])
        await check_histories(client, [timed.execution_id, paused.execution_id])
        assert all(engine.process.returncode is None for engine in engines)
    finally:
        await client.close()
