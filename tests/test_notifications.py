"""Notifications: one per appended event, on ``evflow.events.<flow>.<execution_id>.<kind>``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from functools import partial
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from evflow import Client
from evflow.messages import Notification
from evflow.nats_server import NatsServer
from evflow.server import Server
from wire import (
    APPROVAL,
    FINANCE_YES,
    MANAGER_YES,
    PURCHASE,
    YES,
    call,
    events,
    invoke,
    invoke_subject,
    resume,
    resume_subject,
)

BOUND = 20.0
"""Seconds to wait for a notification that must come."""


class Watcher:
    """A raw subscription to every notification, live before the test sends anything."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def start(self) -> None:
        await self.nc.subscribe("evflow.events.>", cb=self.queue.put)
        await self.nc.flush()

    async def next(self) -> Msg:
        return await asyncio.wait_for(self.queue.get(), BOUND)

    async def take(self, count: int) -> list[Msg]:
        return [await self.next() for _ in range(count)]


@pytest.fixture
async def watcher(nats_server: NatsServer, engine_server: Server) -> AsyncIterator[Watcher]:
    connection = await nats.connect(nats_server.url)
    watcher = Watcher(connection)
    await watcher.start()
    yield watcher
    await connection.drain()


def body(msg: Msg) -> dict[str, Any]:
    return json.loads(msg.data)


async def test_every_event_is_notified_once_on_its_subject(watcher: Watcher) -> None:
    """Invoke and resume give started, paused, resumed, completed, each with its Nats-Msg-Id."""
    nc = watcher.nc
    execution_id = (await invoke(nc))["execution_id"]
    await resume(nc, "approval", execution_id, YES)

    received = await watcher.take(4)
    sentinel = (await invoke(nc))["execution_id"]
    after = await watcher.next()

    kinds = ["started", "paused", "resumed", "completed"]
    prefix = f"evflow.events.approval.{execution_id}"
    assert [msg.subject for msg in received] == [f"{prefix}.{kind}" for kind in kinds]
    ids = [(msg.headers or {}).get("Nats-Msg-Id") for msg in received]
    assert ids == [f"{execution_id}:{version}" for version in (1, 2, 3, 4)]
    assert [body(msg)["version"] for msg in received] == [1, 2, 3, 4]
    assert {body(msg)["flow"] for msg in received} == {"approval"}
    assert {body(msg)["execution_id"] for msg in received} == {execution_id}
    assert after.subject == f"evflow.events.approval.{sentinel}.started"


async def test_a_notification_carries_the_event_as_the_log_holds_it(watcher: Watcher) -> None:
    """The event in each notification equals the logged event of that version."""
    nc = watcher.nc
    execution_id = (await invoke(nc))["execution_id"]
    await resume(nc, "approval", execution_id, YES)

    received = await watcher.take(4)
    history = await events(nc, execution_id)

    assert [body(msg)["event"] for msg in received] == [stored["event"] for stored in history]
    assert [body(msg)["at"] for msg in received] == [stored["at"] for stored in history]


async def test_the_pause_notification_says_how_to_answer(watcher: Watcher) -> None:
    """A paused notification carries inputs, outputs, output_schema, resume_subject and at."""
    paused = await invoke(watcher.nc)
    execution_id = paused["execution_id"]

    started, pause = await watcher.take(2)

    notice = body(pause)
    assert pause.subject == f"evflow.events.approval.{execution_id}.paused"
    assert notice["kind"] == "paused"
    assert (notice["execution_id"], notice["flow"]) == (execution_id, "approval")
    assert notice["inputs"] == APPROVAL
    assert notice["outputs"] == ["approved", "note"]
    assert notice["output_schema"] == paused["output_schema"]
    assert notice["resume_subject"] == f"evflow.flo.approval.resume.{execution_id}"
    assert datetime.fromisoformat(notice["at"]).utcoffset() is not None
    assert "resume_subject" not in body(started)


async def test_a_recorded_step_is_notified_as_step_completed(watcher: Watcher) -> None:
    """The purchase flow's budget step appears between the last resume and the completion."""
    nc = watcher.nc
    execution_id = (await invoke(nc, "purchase", PURCHASE))["execution_id"]
    await resume(nc, "purchase", execution_id, MANAGER_YES)
    await resume(nc, "purchase", execution_id, FINANCE_YES)

    received = await watcher.take(7)

    kinds = [msg.subject.rsplit(".", 1)[1] for msg in received]
    assert kinds == [
        "started",
        "paused",
        "resumed",
        "paused",
        "resumed",
        "step_completed",
        "completed",
    ]
    step = body(received[5])
    assert step["event"]["name"] == "reserve_budget"
    assert step["event"]["result"] == {"reservation": "budget-desk-300.00"}
    assert received[5].headers["Nats-Msg-Id"] == f"{execution_id}:6"
    assert int(received[5].headers["Evflow-Position"]) > 0


async def test_a_refused_command_publishes_nothing(watcher: Watcher) -> None:
    """Bad input and a resume of a finished execution append nothing, so notify nothing."""
    nc = watcher.nc
    execution_id = (await invoke(nc))["execution_id"]
    await resume(nc, "approval", execution_id, YES)
    await watcher.take(4)

    await call(nc, resume_subject("approval", execution_id), YES)
    await call(nc, invoke_subject("approval"), {"amount": "lots"})
    sentinel = (await invoke(nc))["execution_id"]

    after = await watcher.next()
    assert after.subject == f"evflow.events.approval.{sentinel}.started"


class Pump:
    """Runs ``Client.notifications`` in a task, feeding a queue."""

    def __init__(self, notifications: AsyncIterator[Notification]) -> None:
        self.queue: asyncio.Queue[Notification] = asyncio.Queue()
        self._task = asyncio.create_task(self._run(notifications))

    async def _run(self, notifications: AsyncIterator[Notification]) -> None:
        async for notice in notifications:
            await self.queue.put(notice)

    async def until(self, execution_id: str, kind: str) -> list[Notification]:
        """Everything received up to and including ``kind`` of ``execution_id``."""
        seen: list[Notification] = []
        while not seen or (seen[-1].execution_id, seen[-1].kind) != (execution_id, kind):
            seen.append(await asyncio.wait_for(self.queue.get(), BOUND))
        return seen

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def complete_approval(client: Client) -> str:
    paused = await client.invoke("approval", APPROVAL)
    await client.resume("approval", paused.execution_id, YES)
    return paused.execution_id


async def until_live(pump: Pump, probe: Callable[[], Awaitable[object]]) -> None:
    """``Client.notifications`` subscribes when first iterated and gives no signal when it
    is live, so send probes that it would hear until it hears one."""
    for _ in range(40):
        await probe()
        try:
            await asyncio.wait_for(pump.queue.get(), 0.5)
            return
        except TimeoutError:
            continue
    pytest.fail("Client.notifications never delivered a notification")


async def test_client_notifications_filter_by_flow_and_kind(client: Client) -> None:
    """Only completions of the approval flow reach a flow='approval', kind='completed' reader."""
    pump = Pump(client.notifications(flow="approval", kind="completed"))
    try:
        await until_live(pump, partial(complete_approval, client))
        purchase = await client.invoke("purchase", {"item": "pen", "amount": 2.0})
        await client.resume("purchase", purchase.execution_id, MANAGER_YES | {"approved": False})
        wanted = await complete_approval(client)
        seen = await pump.until(wanted, "completed")
    finally:
        await pump.stop()

    assert all(isinstance(notice, Notification) for notice in seen)
    assert {(notice.flow, notice.kind) for notice in seen} == {("approval", "completed")}
    assert purchase.execution_id not in {notice.execution_id for notice in seen}


async def test_client_notifications_filter_by_kind_across_flows(client: Client) -> None:
    """A kind='paused' reader hears pauses of every flow, and nothing else."""
    pump = Pump(client.notifications(kind="paused"))
    try:
        await until_live(pump, partial(client.invoke, "approval", APPROVAL))
        purchase = await client.invoke("purchase", PURCHASE)
        await client.resume("purchase", purchase.execution_id, MANAGER_YES)
        approval = await client.invoke("approval", APPROVAL)
        seen = await pump.until(approval.execution_id, "paused")
    finally:
        await pump.stop()

    assert {notice.kind for notice in seen} == {"paused"}
    pauses = [(n.flow, n.event.name) for n in seen if n.execution_id == purchase.execution_id]
    assert pauses == [("purchase", "manager"), ("purchase", "finance")]
    assert seen[-1].resume_subject == f"evflow.flo.approval.resume.{approval.execution_id}"
