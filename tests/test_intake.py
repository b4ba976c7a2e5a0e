"""Durable intake: commands published to EVFLOW_COMMANDS run once, even when no engine runs.

Real nats-server with JetStream, real SQLite files. Outcomes are read from the log and from
notifications, since a durable command gets no reply.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from examples.flows import app as example_app
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from evflow import Client
from evflow.events import ExecutionStarted, StoredEvent
from evflow.nats_server import NatsServer
from evflow.server import Server
from evflow.store import invoke_scope
from evflow.streams import StreamSettings
from versioned_flows import app_both, make_app
from wire import APPROVAL, YES

BOUND = 20.0


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    connection = await nats.connect(nats_server.url)
    yield connection
    await connection.drain()


@pytest.fixture
async def rejections(nc: NATS) -> AsyncIterator[asyncio.Queue[Msg]]:
    """Every refusal of a durable command, as published."""
    queue: asyncio.Queue[Msg] = asyncio.Queue()
    subscription = await nc.subscribe("evflow.events.rejected", cb=queue.put)
    await nc.flush()
    yield queue
    await subscription.unsubscribe()


async def publish(nc: NATS, subject: str, body: Any, headers: dict[str, str] | None = None) -> int:
    """Publish a durable command (JSON unless bytes); returns its stream sequence."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    ack = await nc.jetstream().publish(subject, data, headers=headers)
    return ack.seq


async def until(predicate, what: str):  # type: ignore[no-untyped-def]
    """Poll ``await predicate()`` until it returns something truthy, and return it."""
    deadline = asyncio.get_running_loop().time() + BOUND
    while not (found := await predicate()):
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"{what} did not happen within {BOUND:g} s")
        await asyncio.sleep(0.05)
    return found


async def started_by(server: Server, key: str) -> StoredEvent:
    """The ExecutionStarted that an invoke with idempotency ``key`` appended."""
    assert server.store is not None

    async def find() -> StoredEvent | None:
        assert server.store is not None
        return await server.store.find_command(invoke_scope("approval", key))

    return await until(find, f"the invoke with key {key}")


async def starts(server: Server) -> list[StoredEvent]:
    assert server.store is not None
    events = await server.store.read_all(limit=10_000)
    return [e for e in events if isinstance(e.event, ExecutionStarted)]


async def drained(nc: NATS) -> bool:
    """Whether the commands stream is empty: every command taken and acknowledged."""
    info = await nc.jetstream().stream_info("EVFLOW_COMMANDS")
    return info.state.messages == 0


async def test_a_durable_invoke_runs_and_is_acknowledged(nc: NATS, engine_server: Server) -> None:
    """A published invoke starts an execution; the stream lets go of the command."""
    await publish(nc, "evflow.cmd.flo.approval.invoke", APPROVAL, {"Idempotency-Key": "d-1"})

    first = await started_by(engine_server, "d-1")
    await until(lambda: drained(nc), "acknowledging the command")

    assert engine_server.store is not None
    history = await engine_server.store.read(first.execution_id)
    assert [type(e.event).__name__ for e in history] == ["ExecutionStarted", "ExecutionPaused"]
    assert first.event == ExecutionStarted("approval", APPROVAL, 1, "d-1")


async def test_a_durable_resume_answers_the_pause(
    nats_server: NatsServer, engine_server: Server
) -> None:
    """A published resume completes an execution paused by a request."""
    client = await Client.connect(nats_server.url)
    try:
        paused = await client.invoke("approval", APPROVAL)
        await client.publish_resume("approval", paused.execution_id, YES, idempotency_key="r")

        async def completed() -> bool:
            return (await client.get(paused.execution_id)).status == "completed"

        await until(completed, "the durable resume")
    finally:
        await client.close()


async def test_commands_published_while_no_engine_runs_run_when_it_starts(
    nats_server: NatsServer, store_url: str, nc: NATS
) -> None:
    """The stream keeps commands across an engine's absence; each runs once on its return."""
    async with Server(example_app, store_url, nats_server.url):
        pass  # creates the streams, as a first deployment does
    for number in range(5):
        body = {"amount": number, "requester": "offline"}
        await publish(nc, "evflow.cmd.flo.approval.invoke", body, {"Nats-Msg-Id": f"o-{number}"})

    async with Server(example_app, store_url, nats_server.url) as server:
        for number in range(5):
            await started_by(server, f"o-{number}")
        await until(lambda: drained(nc), "acknowledging every command")
        found = await starts(server)

    assert sorted(e.event.inputs["amount"] for e in found) == [0, 1, 2, 3, 4]


async def test_a_command_repeated_with_its_key_starts_one_execution(
    nc: NATS, engine_server: Server
) -> None:
    """The same Idempotency-Key under two message IDs, and again by request: one execution."""
    for msg_id in ("m-1", "m-2"):
        headers = {"Idempotency-Key": "same", "Nats-Msg-Id": msg_id}
        await publish(nc, "evflow.cmd.flo.approval.invoke", APPROVAL, headers)
    await until(lambda: drained(nc), "taking both copies")
    client = Client(nc)
    by_request = await client.invoke("approval", APPROVAL, idempotency_key="same")

    found = await starts(engine_server)
    assert len(found) == 1
    assert by_request.execution_id == found[0].execution_id


async def test_a_message_id_is_the_key_of_a_command_without_one(
    nc: NATS, engine_server: Server
) -> None:
    """Without Idempotency-Key the Nats-Msg-Id dedups, even once the stream forgot it."""
    await publish(nc, "evflow.cmd.flo.approval.invoke", APPROVAL, {"Nats-Msg-Id": "only-id"})
    await started_by(engine_server, "only-id")
    await until(lambda: drained(nc), "taking the first copy")
    await nc.jetstream().purge_stream("EVFLOW_COMMANDS")  # as if the duplicate window passed

    await publish(nc, "evflow.cmd.flo.approval.invoke", APPROVAL, {"Nats-Msg-Id": "only-id"})
    await until(lambda: drained(nc), "taking the second copy")

    assert len(await starts(engine_server)) == 1


@pytest.mark.parametrize(
    ("subject", "body", "code", "field"),
    [
        ("evflow.cmd.flo.approval.invoke", {"amount": 1}, "invalid_input", "requester"),
        ("evflow.cmd.flo.approval.invoke", b"not json", "invalid_json", None),
        ("evflow.cmd.flo.approval.invoke", [1, 2], "invalid_json", None),
        ("evflow.cmd.flo.nope.invoke", APPROVAL, "unknown_flow", None),
        ("evflow.cmd.flo.approval.resume.nobody", YES, "unknown_execution", None),
        ("evflow.cmd.flo.approval.cancel", {}, "invalid_input", "subject"),
        ("evflow.cmd.something", {}, "invalid_input", "subject"),
    ],
    ids=["missing-field", "not-json", "not-object", "unknown-flow", "unknown-execution",
         "short-subject", "other-subject"],
)  # fmt: skip
async def test_a_refused_command_is_published_as_rejected_and_never_retried(
    nc: NATS,
    engine_server: Server,
    rejections: asyncio.Queue[Msg],
    subject: str,
    body: Any,
    code: str,
    field: str | None,
) -> None:
    """A command the engine refuses is acknowledged, appends nothing, and says why once."""
    sequence = await publish(nc, subject, body)

    rejected = json.loads((await asyncio.wait_for(rejections.get(), BOUND)).data)
    await until(lambda: drained(nc), "acknowledging the refused command")
    await asyncio.sleep(0.3)

    assert rejected["subject"] == subject
    assert rejected["stream_sequence"] == sequence
    assert rejected["error"]["code"] == code
    assert rejected["error"]["message"]
    assert rejected["error"].get("field") == field
    assert rejections.empty(), "a refused command was retried"
    assert engine_server.store is not None
    assert await engine_server.store.read_all() == []


async def test_a_resume_of_a_finished_execution_is_rejected_with_its_status(
    nats_server: NatsServer, engine_server: Server, rejections: asyncio.Queue[Msg]
) -> None:
    """A durable resume of a completed execution is refused as finished, naming it."""
    client = await Client.connect(nats_server.url)
    try:
        paused = await client.invoke("approval", APPROVAL)
        await client.resume("approval", paused.execution_id, YES)
        await client.publish_resume("approval", paused.execution_id, YES)
    finally:
        await client.close()

    rejected = json.loads((await asyncio.wait_for(rejections.get(), BOUND)).data)

    assert rejected["execution_id"] == paused.execution_id
    assert rejected["error"]["code"] == "finished"
    assert (rejected["error"]["status"], rejected["error"]["version"]) == ("completed", 4)


async def test_many_durable_commands_all_run_once(
    nats_server: NatsServer, engine_server: Server, nc: NATS
) -> None:
    """300 published invokes start 300 executions, each exactly once."""
    client = Client(nc)
    count = 300

    await asyncio.gather(
        *(
            client.publish_invoke(
                "approval", {"amount": n, "requester": "bulk"}, idempotency_key=f"bulk-{n}"
            )
            for n in range(count)
        )
    )
    await until(lambda: drained(nc), "taking every command")

    found = await starts(engine_server)
    assert len(found) == count
    assert sorted(e.event.idempotency_key or "" for e in found) == sorted(
        f"bulk-{n}" for n in range(count)
    )


async def test_a_command_for_a_version_no_engine_serves_waits_for_one_that_does(
    nats_server: NatsServer, store_url: str, nc: NATS, rejections: asyncio.Queue[Msg]
) -> None:
    """A durable resume of a version-1 execution, taken by an engine serving only version 2,
    is neither run on the wrong code nor rejected: it waits in the stream, and the engine
    that serves version 1 again runs it."""
    # A delivery taken just as an engine stops comes back after the ack wait: keep it short.
    streams = StreamSettings(command_ack_wait=2.0)
    async with Server(make_app(1), store_url, nats_server.url, streams=streams):
        client = await Client.connect(nats_server.url)
        paused = await client.invoke("approval", {"amount": 5})
        await client.close()
    async with Server(make_app(2), store_url, nats_server.url, streams=streams) as new:
        subject = f"evflow.cmd.flo.approval.resume.{paused.execution_id}"
        await publish(nc, subject, {"approved": True})
        await asyncio.sleep(1.5)  # several deliveries, each refused and retried
        assert new.store is not None
        history = await new.store.read(paused.execution_id)
        assert [type(e.event).__name__ for e in history][-1] == "ExecutionPaused"
        assert not await drained(nc)

    async with Server(app_both, store_url, nats_server.url, streams=streams) as both:
        await until(lambda: drained(nc), "the waiting command to run")
        assert both.store is not None
        history = await both.store.read(paused.execution_id)

    assert history[-1].event.result == {"code": "v1", "amount": 5.0, "approved": True}
    assert rejections.empty()
