"""The outbox: the log published, in order and once, to the EVFLOW_EVENTS stream.

These run against a real nats-server with JetStream and real SQLite files; the crash
windows are reproduced by writing the log without an engine, and by rewinding the stored
checkpoint behind the engine's back as a crash before the checkpoint moved would leave it.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from examples.flows import app as example_app
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from evflow import Client
from evflow.events import ExecutionPaused, ExecutionStarted, StoredEvent
from evflow.nats_server import NatsServer
from evflow.outbox import Outbox
from evflow.server import Server
from evflow.store.sqlite import SqliteStore
from evflow.subjects import Subjects
from evflow.timers import SystemClock
from wire import APPROVAL, YES

BOUND = 20.0


@pytest.fixture
async def js(nats_server: NatsServer) -> AsyncIterator[JetStreamContext]:
    """A JetStream context on the test's server, for reading the streams directly."""
    connection: NATS = await nats.connect(nats_server.url)
    yield connection.jetstream()
    await connection.drain()


async def stream_ids(js: JetStreamContext, stream: str = "EVFLOW_EVENTS") -> list[str]:
    """The Nats-Msg-Id of every message the stream holds, in stream order."""
    info = await js.stream_info(stream)
    ids = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        message = await js.get_msg(stream, seq)
        ids.append((message.headers or {}).get("Nats-Msg-Id", ""))
    return ids


async def log_ids(store_url: str) -> list[str]:
    """``<execution_id>:<version>`` of every event in the log, in global order."""
    store = SqliteStore(store_url.removeprefix("sqlite:///"))
    await store.open()
    try:
        return [f"{e.execution_id}:{e.version}" for e in await store.read_all(limit=100_000)]
    finally:
        await store.close()


async def settle(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
    """Wait until ``await predicate()`` is true; fail naming ``what`` after ``BOUND``."""
    deadline = asyncio.get_running_loop().time() + BOUND
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"{what} did not happen within {BOUND:g} s")
        await asyncio.sleep(0.05)


async def run_cycles(url: str, count: int) -> None:
    """Invoke and resume ``count`` approvals through the request/reply contract."""
    client = await Client.connect(url)
    try:
        for _ in range(count):
            paused = await client.invoke("approval", APPROVAL)
            await client.resume("approval", paused.execution_id, YES)
    finally:
        await client.close()


async def test_every_event_is_stored_once_in_log_order(
    nats_server: NatsServer, store_url: str, js: JetStreamContext
) -> None:
    """After some cycles, EVFLOW_EVENTS holds exactly the log's events, in the log's order."""
    async with Server(example_app, store_url, nats_server.url) as server:
        await run_cycles(nats_server.url, 5)
        assert server.outbox is not None
        await settle(lambda: _published_all(server), "publishing the whole log")

    assert await stream_ids(js) == await log_ids(store_url)


async def _published_all(server: Server) -> bool:
    assert server.store is not None and server.outbox is not None
    last = await server.store.read_all(server.outbox.position, 1)
    return not last


async def test_stop_publishes_everything_appended_and_saves_the_checkpoint(
    nats_server: NatsServer, store_url: str, js: JetStreamContext
) -> None:
    """A clean stop leaves nothing unpublished, and the next start publishes nothing again."""
    async with Server(example_app, store_url, nats_server.url):
        await run_cycles(nats_server.url, 3)
    first = await stream_ids(js)

    async with Server(example_app, store_url, nats_server.url) as again:
        assert again.outbox is not None
        started_at = again.outbox.position
        await asyncio.sleep(0.3)
        published_again = again.outbox.published

    assert first == await log_ids(store_url)
    assert started_at == len(first)
    assert published_again == 0
    assert await stream_ids(js) == first


async def test_events_appended_while_no_engine_ran_are_published_on_start(
    nats_server: NatsServer, store_url: str, js: JetStreamContext
) -> None:
    """A crash between append and publication: the next engine publishes what the log holds."""
    store = SqliteStore(store_url.removeprefix("sqlite:///"))
    await store.open()
    now = SystemClock().now()
    started = ExecutionStarted("approval", {"amount": 1.0, "requester": "x"})
    paused = ExecutionPaused(1, "pause", {}, {"approved": "bool", "note": "str"}, {})
    await store.append("e1", 0, [StoredEvent("e1", 1, now, started)])
    await store.append("e1", 1, [StoredEvent("e1", 2, now, paused)])
    await store.close()

    async with Server(example_app, store_url, nats_server.url) as server:
        await settle(lambda: _published_all(server), "publishing the crash's events")

    info = await js.stream_info("EVFLOW_EVENTS")
    message = await js.get_msg("EVFLOW_EVENTS", info.state.last_seq)
    assert await stream_ids(js) == ["e1:1", "e1:2"]
    assert message.subject == "evflow.events.approval.e1.paused"
    assert message.headers is not None and message.headers["Evflow-Position"] == "2"


async def test_events_published_again_after_a_crash_are_stored_once(
    nats_server: NatsServer, store_url: str, js: JetStreamContext, tmp_path: Path
) -> None:
    """A checkpoint that did not move before a crash re-publishes; the stream drops copies."""
    async with Server(example_app, store_url, nats_server.url):
        await run_cycles(nats_server.url, 4)
    published = await stream_ids(js)
    with sqlite3.connect(store_url.removeprefix("sqlite:///")) as db:
        db.execute("UPDATE checkpoints SET position = 3 WHERE name = 'outbox'")
    db.close()

    async with Server(example_app, store_url, nats_server.url) as again:
        assert again.outbox is not None
        await settle(lambda: _published_all(again), "re-publishing after the checkpoint")
        republished = again.outbox.published

    assert republished == len(published) - 3
    assert await stream_ids(js) == published


async def test_a_subscriber_that_was_offline_catches_up_from_the_stream(
    nats_server: NatsServer, engine_server: Server, js: JetStreamContext
) -> None:
    """Notifications published before a consumer existed are delivered to it in order."""
    await run_cycles(nats_server.url, 2)
    await settle(lambda: _published_all(engine_server), "publishing")

    consumer = await js.pull_subscribe("evflow.events.approval.*.completed", stream="EVFLOW_EVENTS")
    messages = await consumer.fetch(10, timeout=2)

    assert len(messages) == 2
    assert all(m.subject.endswith(".completed") for m in messages)


async def test_notifications_wait_out_a_nats_restart(
    nats_server: NatsServer, store_url: str, js: JetStreamContext
) -> None:
    """Events appended while NATS is down are published once it is back, none lost."""
    async with Server(example_app, store_url, nats_server.url) as server:
        await run_cycles(nats_server.url, 1)
        await settle(lambda: _published_all(server), "publishing the first cycle")

        await nats_server.stop()
        assert server.engine is not None
        state = await server.engine.invoke("approval", b'{"amount": 2, "requester": "y"}')
        await nats_server.start()
        await settle(lambda: _published_all(server), "publishing after the restart")

    reconnected: NATS = await nats.connect(nats_server.url)
    try:
        ids = await stream_ids(reconnected.jetstream())
    finally:
        await reconnected.drain()
    assert ids == await log_ids(store_url)
    assert f"{state.execution_id}:2" in ids


async def test_a_shared_outbox_told_to_stand_by_while_taking_the_lead_does_not_lead(
    nats_server: NatsServer, tmp_path: Path
):
    """An engine that loses partition 0 while its outbox reads the checkpoint to lead must
    not start publishing afterwards: another engine's outbox publishes by then."""
    store = SqliteStore(tmp_path / "log.db")
    await store.open()
    nc = await nats.connect(nats_server.url)
    outbox = Outbox(store, nc, Subjects(), shared=True)
    try:
        await outbox.start()
        assert not outbox.leading

        leading = asyncio.create_task(outbox.lead())
        await asyncio.sleep(0)  # it reads the checkpoint
        outbox.stop_leading()
        await leading
        after_stand_by = outbox.leading
        await outbox.lead()

        assert not after_stand_by
        assert outbox.leading  # told to lead again, it does
    finally:
        await outbox.close()
        await nc.close()
        await store.close()
