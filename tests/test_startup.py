"""An engine's start rides out NATS out of reach or electing leaders, within its start-up
timeout, and fails at once on what will not pass (``evflow.startup``).

The cluster tests start ``evflow serve`` as a process against a real three-node cluster
with two nodes down (no quorum: every JetStream request times out or is answered 503),
then bring the nodes back.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats
import pytest
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import BadRequestError, ServiceUnavailableError

from evflow import Client
from evflow.errors import StoreError, Unavailable
from evflow.messages import Completed, Paused
from evflow.nats_cluster import NatsCluster
from evflow.nats_server import NatsServer
from evflow.startup import Startup, may_pass
from processes import APP, Child, Spawn, cli_env, evflow, sqlite_url, unused_port
from test_cluster_engines import TESTS, engine_args

UP = 90.0
"""Seconds an engine waiting out the outage may take to listen once the nodes are back: an
election after a restart takes seconds to tens of seconds on this loaded 2-core machine."""


@pytest.mark.parametrize(
    ("error", "passes"),
    [
        (Unavailable("JetStream did not answer"), True),
        (NatsTimeout(), True),
        (NoRespondersError(), True),
        (ConnectionRefusedError(), True),
        (ServiceUnavailableError(code=503, err_code=10008), True),
        (BadRequestError(code=400, err_code=10005), True),  # no peers: a node restarting
        (BadRequestError(code=400, err_code=10058), False),  # a stream's settings clash
        (StoreError("damaged"), False),
        (PermissionError("no access to the log's folder"), False),
    ],
)
def test_what_may_pass(error: Exception, passes: bool) -> None:
    assert may_pass(error) is passes


async def test_a_step_is_tried_again_while_its_failure_may_pass() -> None:
    failures = [NatsTimeout(), Unavailable("electing")]

    async def step() -> str:
        if failures:
            raise failures.pop(0)
        return "up"

    assert await Startup(30).attempt("the test's step", step) == "up"
    assert failures == []


async def test_a_failure_that_will_not_pass_is_raised_at_once() -> None:
    tries = []

    async def step() -> None:
        tries.append(1)
        raise StoreError("the log is damaged; restore it")

    with pytest.raises(StoreError, match="damaged"):
        await Startup(30).attempt("the test's step", step)
    assert len(tries) == 1


async def test_past_the_deadline_the_start_gives_up_naming_what_it_waited_for() -> None:
    async def step() -> None:
        raise NatsTimeout()

    with pytest.raises(Unavailable) as raised:
        await Startup(0.3).attempt("the test's stream", step, hint="start it")
    assert raised.value.message == (
        "could not reach the test's stream within the start-up timeout of 0.3 s "
        "(last: nats: timeout); start it"
    )


async def wait_for(engine: Child, text: str, seconds: float = UP) -> None:
    """Wait until the engine logs ``text``; fail if it exits first or time runs out."""
    async with asyncio.timeout(seconds):
        while text not in engine.stderr:
            if engine.process.returncode is not None:
                pytest.fail(f"exited with {engine.process.returncode} before {text!r}:\n{engine}")
            await asyncio.sleep(0.1)


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_an_engine_started_without_quorum_waits_and_serves(
    nats_cluster: NatsCluster, spawn: Spawn, tmp_path: Path
) -> None:
    """An engine started while two of three nodes are down waits, and serves once they are
    back: the log it finds (a paused execution) included."""
    (tmp_path / "effects").mkdir()
    env = cli_env(PYTHONPATH=str(TESTS), EVFLOW_FAULT_DIR=str(tmp_path))
    urls = ",".join(nats_cluster.urls)
    first = await spawn(*engine_args(nats_cluster), env=env)
    await wait_for(first, "listening on")
    client = await Client.connect(urls, timeout=5)
    try:
        paused = await client.invoke("order", {"n": 1})
        assert await first.stop() == 0

        for node in (1, 2):
            nats_cluster.kill(node)
            await nats_cluster.stop_node(node)
        engine = await spawn(*engine_args(nats_cluster), env=env)
        await wait_for(engine, "waiting for")  # it met the outage, and waits
        await asyncio.sleep(3)
        for node in (1, 2):
            await nats_cluster.start_node(node)
        await wait_for(engine, "listening on")

        resumed = await client.resume("order", paused.execution_id, {"ok": True})
        assert isinstance(resumed, Completed), resumed
        assert isinstance(await client.invoke("order", {"n": 2}), Paused)
        assert engine.process.returncode is None
        assert "Traceback" not in engine.stderr
    finally:
        await client.close()


@pytest.mark.slow
async def test_a_start_against_an_unreachable_cluster_fails_with_one_clear_line(
    tmp_path: Path,
) -> None:
    """Nothing at any node: the start tries again until its timeout, then exits 1 with one
    line naming what it could not reach and what to do, and no traceback."""
    urls = ",".join(f"nats://127.0.0.1:{unused_port()}" for _ in range(3))
    args = ["serve", "--app", APP, "--nats", urls, "--store", "jetstream?replicas=3"]

    result = await evflow(*args, "--startup-timeout", "6s")  # a try takes 5 s

    assert result.returncode == 1, result
    assert "waiting for the log jetstream?replicas=3" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "Error: could not reach the log jetstream?replicas=3 within the start-up timeout of 6 s"
    ), result.stderr
    assert f"cannot connect to NATS at {urls}" in last
    assert "--startup-timeout" in last
    assert "Traceback" not in result.stderr


@pytest.mark.slow
async def test_a_start_that_cannot_succeed_fails_at_once(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """A commands stream made by someone else with settings the engine cannot change is
    not waited for: the start fails on the first answer, though the timeout is a minute."""
    nc = await nats.connect(nats_server.url)
    try:
        config = {"name": "EVFLOW_COMMANDS", "subjects": ["evflow.cmd.>"], "retention": "limits"}
        reply = await nc.request(
            "$JS.API.STREAM.CREATE.EVFLOW_COMMANDS", json.dumps(config).encode(), timeout=5
        )
        assert b'"error"' not in reply.data, reply.data
    finally:
        await nc.close()
    store = sqlite_url(tmp_path / "evflow.db")
    args = ["serve", "--app", APP, "--nats", nats_server.url, "--store", store]

    result = await evflow(*args, "--startup-timeout", "60s")  # evflow() allows 20 s

    assert result.returncode == 1, result
    assert "cannot set up the JetStream streams" in result.stderr.strip().splitlines()[-1]
    assert "waiting for" not in result.stderr
    assert "Traceback" not in result.stderr
