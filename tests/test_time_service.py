"""Time and cancellation over the wire: waiting replies, deadlines in pause replies and
notifications, ``expired`` refusals, the cancel subject, and durable cancels.

A real nats-server and SQLite file; the engine runs on a ``ManualClock`` the test moves.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import pytest
from examples.flows import app as example_app
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from evflow import Client, ManualClock
from evflow.nats_server import NatsServer
from evflow.server import Server
from wire import call, error, events, invoke_subject, log_size, reply, resume_subject, types

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
QUOTE = {"customer": "ann", "price": 99.5}
BOUND = 20.0


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
async def server(nats_server: NatsServer, tmp_path: Path, clock: ManualClock):
    """The example flows served on a moved-by-hand clock."""
    engine = Server(
        example_app, f"sqlite:///{tmp_path / 'evflow.db'}", nats_server.url, clock=clock
    )
    await engine.start()
    yield engine
    await engine.stop()


@pytest.fixture
async def nc(nats_server: NatsServer, server: Server) -> AsyncIterator[NATS]:
    connection = await nats.connect(nats_server.url)
    yield connection
    await connection.drain()


class Notes:
    """Every notification of one execution, as published."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def kinds(self, count: int) -> list[dict[str, Any]]:
        notes = [await asyncio.wait_for(self.queue.get(), BOUND) for _ in range(count)]
        return [json.loads(note.data) for note in notes]


@pytest.fixture
async def notes(nc: NATS) -> Notes:
    collected = Notes()
    await nc.subscribe("evflow.events.quote.>", cb=collected.queue.put)
    await nc.flush()
    return collected


async def test_a_pause_with_a_timeout_says_its_deadline_in_reply_and_notification(
    nc: NATS, notes: Notes
) -> None:
    paused = reply(await call(nc, invoke_subject("quote"), QUOTE))

    started, pause_note = await notes.kinds(2)

    assert paused["status"] == "paused" and paused["pause"] == "offer"
    assert paused["deadline"] == "2026-03-01T08:01:00Z"
    assert started["kind"] == "started"
    assert pause_note["kind"] == "paused"
    assert pause_note["deadline"] == "2026-03-01T08:01:00Z"
    assert pause_note["event"]["default"] == {"accepted": False}


async def test_a_resume_reaching_a_wait_replies_waiting_and_the_timer_finishes_it(
    nc: NATS, notes: Notes, clock: ManualClock
) -> None:
    execution_id = reply(await call(nc, invoke_subject("quote"), QUOTE))["execution_id"]

    waiting = reply(await call(nc, resume_subject("quote", execution_id), {"accepted": True}))
    clock.advance(timedelta(seconds=10))
    kinds = [note["kind"] for note in await notes.kinds(7)]

    assert waiting["status"] == "waiting"
    assert waiting["wake_at"] == "2026-03-01T08:00:10Z"
    assert kinds == [
        "started", "paused", "resumed", "waiting", "woken", "step_completed", "completed",
    ]  # fmt: skip
    state = reply(await call(nc, f"evflow.executions.get.{execution_id}"))
    assert state["status"] == "completed"
    assert state["result"] == {"status": "ordered", "order": "order-ann-99.50"}


async def test_an_unanswered_pause_expires_and_a_late_resume_is_refused_as_expired(
    nc: NATS, notes: Notes, clock: ManualClock, server: Server
) -> None:
    execution_id = reply(await call(nc, invoke_subject("quote"), QUOTE))["execution_id"]

    clock.advance(timedelta(minutes=1))
    kinds = [note["kind"] for note in await notes.kinds(4)]
    size = await log_size(server)
    late = await call(nc, resume_subject("quote", execution_id), {"accepted": True})

    assert kinds == ["started", "paused", "expired", "completed"]
    refused = error(late, 409, "expired")
    assert refused["status"] == "completed" and refused["version"] == 4
    assert late.headers is not None and late.headers["Evflow-Execution-Id"] == execution_id
    assert await log_size(server) == size
    state = reply(await call(nc, f"evflow.executions.get.{execution_id}"))
    assert state["result"] == {"status": "declined"}
    assert state["expired"] == [1]


async def test_cancel_ends_a_waiting_execution_with_its_reason(
    nc: NATS, notes: Notes, clock: ManualClock
) -> None:
    execution_id = reply(await call(nc, invoke_subject("quote"), QUOTE))["execution_id"]
    await call(nc, resume_subject("quote", execution_id), {"accepted": True})

    cancelled = reply(
        await call(nc, f"evflow.flo.quote.cancel.{execution_id}", {"reason": "changed my mind"})
    )
    clock.advance(timedelta(minutes=5))
    kinds = [note["kind"] for note in await notes.kinds(5)]

    assert cancelled == {
        "status": "cancelled",
        "execution_id": execution_id,
        "flow": "quote",
        "version": 5,
        "reason": "changed my mind",
        "flow_version": 1,
    }
    assert kinds == ["started", "paused", "resumed", "waiting", "cancelled"]
    assert types(await events(nc, execution_id))[-1] == "ExecutionCancelled"
    await asyncio.sleep(0.1)
    assert notes.queue.empty()  # the cancelled timer never fires


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({"reason": 5}, 400, "invalid_input", "reason"),
        ({"why": "x"}, 400, "invalid_input", "why"),
        (b"[1]", 400, "invalid_json", None),
        (b"{", 400, "invalid_json", None),
    ],
)
async def test_a_bad_cancel_body_is_refused_naming_the_field_and_appends_nothing(
    nc: NATS, server: Server, body: Any, status: int, code: str, field: str | None
) -> None:
    execution_id = reply(await call(nc, invoke_subject("quote"), QUOTE))["execution_id"]
    size = await log_size(server)

    refused = error(await call(nc, f"evflow.flo.quote.cancel.{execution_id}", body), status, code)

    assert refused.get("field") == field
    assert refused["execution_id"] == execution_id
    assert await log_size(server) == size


async def test_cancel_refusals_say_where_the_execution_stands(nc: NATS, server: Server) -> None:
    paused = reply(await call(nc, invoke_subject("approval"), {"amount": 1, "requester": "x"}))
    execution_id = paused["execution_id"]
    await call(nc, f"evflow.flo.approval.cancel.{execution_id}")
    size = await log_size(server)

    again = await call(nc, f"evflow.flo.approval.cancel.{execution_id}")
    unknown = await call(nc, f"evflow.flo.approval.cancel.{'0' * 32}")
    wrong_flow = await call(nc, f"evflow.flo.quote.cancel.{execution_id}")
    no_flow = await call(nc, f"evflow.flo.nope.cancel.{execution_id}")

    finished = error(again, 409, "finished")
    assert finished["status"] == "cancelled" and finished["version"] == 3
    error(unknown, 404, "unknown_execution")
    error(wrong_flow, 404, "unknown_execution")
    error(no_flow, 404, "unknown_flow")
    assert await log_size(server) == size


async def test_a_repeated_cancel_key_gets_the_first_reply_byte_for_byte(nc: NATS) -> None:
    execution_id = reply(await call(nc, invoke_subject("quote"), QUOTE))["execution_id"]
    subject = f"evflow.flo.quote.cancel.{execution_id}"
    key = {"Idempotency-Key": "cancel-1"}

    first = await call(nc, subject, {"reason": "a"}, key)
    again = await call(nc, subject, {"reason": "b"}, key)

    assert again.data == first.data
    assert types(await events(nc, execution_id)).count("ExecutionCancelled") == 1


async def test_a_durable_cancel_runs_once_and_one_of_a_finished_execution_is_rejected(
    nats_server: NatsServer, server: Server, nc: NATS
) -> None:
    client = Client(nc)
    paused = await client.invoke("quote", QUOTE)
    rejected: asyncio.Queue[Msg] = asyncio.Queue()
    await nc.subscribe("evflow.events.rejected", cb=rejected.put)

    await client.publish_cancel("quote", paused.execution_id, "no stock", idempotency_key="k1")
    await client.publish_cancel("quote", paused.execution_id, "no stock", idempotency_key="k1")
    deadline = asyncio.get_running_loop().time() + BOUND
    while (state := await client.get(paused.execution_id)).status.value != "cancelled":
        assert asyncio.get_running_loop().time() < deadline, state
        await asyncio.sleep(0.05)
    await client.publish_cancel("quote", paused.execution_id, idempotency_key="k2")
    refusal = json.loads((await asyncio.wait_for(rejected.get(), BOUND)).data)

    assert state.cancel_reason == "no stock"
    assert types(await events(nc, paused.execution_id)).count("ExecutionCancelled") == 1
    assert refusal["error"]["code"] == "finished"
    assert refusal["execution_id"] == paused.execution_id
    assert refusal["subject"] == f"evflow.cmd.flo.quote.cancel.{paused.execution_id}"


async def test_the_client_cancels_and_raises_finished_for_a_finished_execution(
    nc: NATS,
) -> None:
    from evflow import Finished
    from evflow.messages import Cancelled

    client = Client(nc)
    paused = await client.invoke("quote", QUOTE)

    cancelled = await client.cancel("quote", paused.execution_id, "test")
    with pytest.raises(Finished) as refused:
        await client.cancel("quote", paused.execution_id)

    assert isinstance(cancelled, Cancelled) and cancelled.reason == "test"
    assert refused.value.execution_status == "cancelled"
