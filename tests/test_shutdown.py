"""Stopping and surviving: SIGTERM finishes what is in flight, and a NATS restart is ridden out.

``evflow serve`` runs as a real process serving ``slow_flows:app``, whose step takes as long
as its input says and writes a line when it starts, so the test can signal mid-step.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from pathlib import Path

import pytest

from evflow import Client, Unavailable
from evflow.messages import Paused
from evflow.nats_server import NatsServer
from processes import Child, Spawn, cli_env, sqlite_url

TESTS = Path(__file__).resolve().parent
BOUND = 20.0


async def serve_slow(
    spawn: Spawn, nats_server: NatsServer, tmp_path: Path, *extra: str
) -> tuple[Child, Path]:
    """``evflow serve`` of the slow flow on the test's NATS and a fresh log; its trace file."""
    trace = tmp_path / "steps.log"
    env = cli_env(PYTHONPATH=str(TESTS), EVFLOW_SLOW_TRACE=str(trace))
    store = sqlite_url(tmp_path / "evflow.db")
    child = await spawn(
        "serve", "--app", "slow_flows:app", "--nats", nats_server.url, "--store", store,
        *extra, env=env,
    )  # fmt: skip
    await child.wait_for("listening on")
    return child, trace


async def step_started(trace: Path, count: int = 1) -> None:
    """Wait until ``count`` step calls have started."""
    deadline = asyncio.get_running_loop().time() + BOUND
    while not trace.exists() or len(trace.read_text().splitlines()) < count:
        assert asyncio.get_running_loop().time() < deadline, "the step never started"
        await asyncio.sleep(0.02)


@pytest.mark.slow
async def test_sigterm_lets_a_running_command_finish_and_answer(
    nats_server: NatsServer, spawn: Spawn, tmp_path: Path
) -> None:
    """A request mid-step when SIGTERM comes gets its reply; the engine then exits 0."""
    serve, trace = await serve_slow(spawn, nats_server, tmp_path)
    client = await Client.connect(nats_server.url)
    try:
        reply = asyncio.ensure_future(client.invoke("slow", {"seconds": 1.0}))
        await step_started(trace)
        serve.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        with pytest.raises(Unavailable):  # it took no new command meanwhile
            await client.invoke("slow", {"seconds": 0})

        settled = await asyncio.wait_for(reply, BOUND)
        code = await asyncio.wait_for(serve.process.wait(), BOUND)
    finally:
        await client.close()

    assert isinstance(settled, Paused)
    assert settled.inputs == {"slept": 1.0}
    assert code == 0, serve
    assert "Traceback" not in serve.stderr


@pytest.mark.slow
async def test_sigterm_lets_a_durable_command_finish_before_it_is_acknowledged(
    nats_server: NatsServer, spawn: Spawn, tmp_path: Path
) -> None:
    """A durable invoke mid-step at SIGTERM is finished and acknowledged, not redelivered."""
    serve, trace = await serve_slow(spawn, nats_server, tmp_path)
    client = await Client.connect(nats_server.url)
    try:
        await client.publish_invoke("slow", {"seconds": 1.0}, idempotency_key="graceful")
        await step_started(trace)
        code = await serve.stop(signal.SIGTERM)
        info = await client.nc.jetstream().stream_info("EVFLOW_COMMANDS")
    finally:
        await client.close()

    assert code == 0, serve
    assert info.state.messages == 0
    assert len(trace.read_text().splitlines()) == 1


@pytest.mark.slow
async def test_sigterm_gives_up_on_a_step_after_the_shutdown_timeout(
    nats_server: NatsServer, spawn: Spawn, tmp_path: Path
) -> None:
    """A step longer than --shutdown-timeout is dropped; the next start drives it on."""
    serve, trace = await serve_slow(spawn, nats_server, tmp_path, "--shutdown-timeout", "0.5s")
    client = await Client.connect(nats_server.url)
    try:
        pending = asyncio.ensure_future(client.invoke("slow", {"seconds": 3.0}))
        await step_started(trace)
        began = asyncio.get_running_loop().time()
        code = await serve.stop(signal.SIGTERM)
        stopped_after = asyncio.get_running_loop().time() - began
        pending.cancel()

        again, _ = await serve_slow(spawn, nats_server, tmp_path)
        await step_started(trace, 2)
        kinds = await recovered(tmp_path / "evflow.db", again)
    finally:
        await client.close()

    assert code == 0, serve
    assert stopped_after < 3.0
    assert kinds == ["ExecutionStarted", "StepCompleted", "ExecutionPaused"]


async def recovered(db: Path, serve: Child) -> list[str]:
    """The event types of the one execution in the log, once it paused after recovery."""
    deadline = asyncio.get_running_loop().time() + BOUND
    while (kinds := await asyncio.to_thread(event_types, db))[-1:] != ["ExecutionPaused"]:
        assert asyncio.get_running_loop().time() < deadline, f"not recovered: {kinds}\n{serve}"
        await asyncio.sleep(0.05)
    return kinds


def event_types(db: Path) -> list[str]:
    """The type of every event in the log, read with sqlite3 alone."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        rows = connection.execute("SELECT type FROM events ORDER BY position").fetchall()
    connection.close()
    return [kind for (kind,) in rows]


@pytest.mark.slow
async def test_the_engine_rides_out_a_nats_restart(
    nats_server: NatsServer, spawn: Spawn, tmp_path: Path
) -> None:
    """After nats-server is killed and restarted, requests and durable commands work again."""
    serve, _ = await serve_slow(spawn, nats_server, tmp_path)
    assert nats_server.pid is not None
    os.kill(nats_server.pid, signal.SIGKILL)
    await nats_server.stop()
    await nats_server.start()

    client = await Client.connect(nats_server.url)
    try:
        await serve.wait_for("reconnected to NATS")
        by_request = await client.invoke("slow", {"seconds": 0})
        sequence = await client.publish_invoke("slow", {"seconds": 0}, idempotency_key="after")
        deadline = asyncio.get_running_loop().time() + BOUND
        while (await client.nc.jetstream().stream_info("EVFLOW_COMMANDS")).state.messages:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
    finally:
        await client.close()

    assert isinstance(by_request, Paused)
    assert sequence > 0
    assert serve.process.returncode is None
    assert "disconnected from NATS" in serve.stderr
