"""The published schemas: they match the code, and what a running engine sends fits them.

The engine runs on a real nats-server and SQLite file, on a ManualClock. A scenario makes
it send every message of the AsyncAPI document, every reply status, notification kind and
event type; each is checked against ``schemas/`` the way a service that holds only that
folder would check it, by subject through ``asyncapi.json``.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import nats
import pytest
from examples.flows import app as example_app
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from evflow import App, Context, ManualClock, schemas
from evflow.events import EVENT_TYPES, ExecutionStarted, StoredEvent
from evflow.messages import Paused
from evflow.nats_server import NatsServer
from evflow.schemas import DIALECT
from evflow.server import Server
from processes import evflow
from schema_checks import SCHEMAS, AsyncApi, check, problems, validator
from wire import APPROVAL, YES

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
BOUND = 20.0
ERROR_CODE = "Nats-Service-Error-Code"


def divide(n: int) -> float:
    return 1 / n


def make_app() -> App:
    """The example flows, and one whose step fails, so the flow fails too."""
    app = App()
    for flow in example_app.latest():
        app.flow(flow.name, version=flow.version)(flow.fn)

    @app.flow("faulty")
    async def faulty(ctx: Context, n: int) -> float:
        """Divides one by ``n`` in a step."""
        return await ctx.step("divide", divide, n)

    return app


APP = make_app()


class Exchange(NamedTuple):
    """A request and its reply; ``sent`` is False for a body made to be refused."""

    subject: str
    headers: dict[str, str] | None
    body: bytes
    reply: Msg
    sent: bool = True


@dataclass
class Wire:
    """Every request sent and reply received, and every durable command published."""

    nc: NATS
    exchanges: list[Exchange] = field(default_factory=list)
    bad_invokes: list[tuple[str, Any]] = field(default_factory=list)
    published: list[tuple[str, dict[str, str] | None, bytes]] = field(default_factory=list)

    async def ok(
        self, subject: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """A request the engine must answer without error; returns the reply's body."""
        data = b"" if body is None else json.dumps(body).encode()
        reply = await self.nc.request(subject, data, timeout=BOUND, headers=headers)
        assert ERROR_CODE not in (reply.headers or {}), reply.data
        self.exchanges.append(Exchange(subject, headers, data, reply))
        return json.loads(reply.data)

    async def refused(self, subject: str, body: Any, code: str) -> None:
        """A request the engine must refuse with ``code``; only its reply is checked."""
        data = b"" if body is None else json.dumps(body).encode()
        reply = await self.nc.request(subject, data, timeout=BOUND)
        assert json.loads(reply.data)["error"]["code"] == code, reply.data
        self.exchanges.append(Exchange(subject, None, data, reply, sent=False))
        if subject.endswith(".invoke"):
            self.bad_invokes.append((subject.split(".")[2], body))

    async def publish(self, subject: str, body: Any, headers: dict[str, str] | None = None):
        """A durable command, published to JetStream."""
        data = json.dumps(body).encode()
        await self.nc.jetstream().publish(subject, data, headers=headers)
        self.published.append((subject, headers, data))

    async def settles(self, execution_id: str, status: str) -> None:
        """Wait (bounded) until the execution is ``status``; the polls are not recorded."""

        async def reached() -> bool:
            msg = await self.nc.request(f"evflow.executions.get.{execution_id}", b"", timeout=5)
            return json.loads(msg.data).get("status") == status

        await until(reached, f"execution {execution_id} to be {status}")


async def until(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    for _ in range(int(BOUND / 0.05)):
        if await predicate():
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"waited {BOUND:g} s for {what}")


@dataclass
class Capture:
    wire: Wire
    notes: list[Any]
    """Every message of the EVFLOW_EVENTS stream: notifications and rejections."""
    log: Path


def flo(flow: str, command: str, execution_id: str = "") -> str:
    return f"evflow.flo.{flow}.{command}" + (f".{execution_id}" if execution_id else "")


def durable(subject: str) -> str:
    """The durable intake subject of a request subject."""
    return subject.replace("evflow.", "evflow.cmd.", 1)


async def invoked(wire: Wire, flow: str, body: dict[str, Any]) -> str:
    return (await wire.ok(flo(flow, "invoke"), body))["execution_id"]


async def requests(wire: Wire, clock: ManualClock) -> list[str]:
    """Commands and refusals by request; returns the executions they made."""
    one = await invoked(wire, "approval", APPROVAL)
    exact = {"Idempotency-Key": "y1", "Evflow-Pause": "1"}
    await wire.ok(flo("approval", "resume", one), YES, exact)
    await wire.refused(flo("approval", "resume", one), YES, "finished")

    two = await invoked(wire, "quote", {"customer": "ann", "price": 9.5})
    assert (await wire.ok(flo("quote", "resume", two), {"accepted": True}))["wake_at"]
    await wire.refused(flo("quote", "resume", two), {"accepted": True}, "not_paused")
    clock.advance(timedelta(seconds=10))
    await wire.settles(two, "completed")

    three = await invoked(wire, "quote", {"customer": "bo", "price": 1})
    await wire.ok(flo("quote", "cancel", three), {"reason": "left"}, {"Idempotency-Key": "c1"})
    await wire.refused(flo("quote", "cancel", three), {}, "finished")

    four = await invoked(wire, "quote", {"customer": "cy", "price": 2})
    clock.advance(timedelta(minutes=1))
    await wire.settles(four, "completed")
    await wire.refused(flo("quote", "resume", four), {"accepted": True}, "expired")

    five = await invoked(wire, "faulty", {"n": 0})
    await wire.refused(flo("approval", "invoke"), {"amount": "x"}, "invalid_input")
    await wire.refused(flo("approval", "invoke"), [1], "invalid_json")
    await wire.refused(flo("nope", "invoke"), {}, "unknown_flow")
    await wire.refused(flo("approval", "resume", "f00"), YES, "unknown_execution")
    await wire.refused("evflow.executions.get.f00", None, "unknown_execution")
    return [one, two, three, four, five]


async def durable_commands(wire: Wire) -> list[str]:
    """Commands through EVFLOW_COMMANDS, one refused; returns the executions they touched."""
    approval = await invoked(wire, "approval", APPROVAL)
    quote = await invoked(wire, "quote", {"customer": "di", "price": 3})
    await wire.publish("evflow.cmd.flo.approval.invoke", APPROVAL, {"Idempotency-Key": "d1"})
    await wire.publish(durable(flo("approval", "resume", approval)), YES)
    await wire.publish(durable(flo("quote", "cancel", quote)), {"reason": "stream"})
    await wire.publish("evflow.cmd.flo.nope.invoke", {}, {"Nats-Msg-Id": "d3"})
    await wire.settles(approval, "completed")
    await wire.settles(quote, "cancelled")
    js = wire.nc.jetstream()

    async def drained() -> bool:
        return (await js.stream_info("EVFLOW_COMMANDS")).state.messages == 0

    await until(drained, "the engine to take every durable command")
    return [approval, quote]


async def stream(nc: NATS, expected: int) -> list[Any]:
    """The EVFLOW_EVENTS stream's messages, once it holds ``expected`` of them."""
    js = nc.jetstream()

    async def complete() -> bool:
        return (await js.stream_info("EVFLOW_EVENTS")).state.messages >= expected

    await until(complete, f"{expected} messages in EVFLOW_EVENTS")
    info = await js.stream_info("EVFLOW_EVENTS")
    sequences = range(info.state.first_seq, info.state.last_seq + 1)
    return [await js.get_msg("EVFLOW_EVENTS", seq) for seq in sequences]


@pytest.fixture
async def captured(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Capture]:
    """A scenario run on a real engine, with everything it sent."""
    log = tmp_path / "evflow.db"
    clock = ManualClock(T0)
    nc = await nats.connect(nats_server.url)
    try:
        async with Server(APP, f"sqlite:///{log}", nats_server.url, clock=clock):
            wire = Wire(nc)
            executions = await requests(wire, clock) + await durable_commands(wire)
            for execution_id in executions:
                await wire.ok(f"evflow.executions.get.{execution_id}")
                await wire.ok(f"evflow.executions.get.{execution_id}", {"at_version": 1})
                await wire.ok(f"evflow.executions.history.{execution_id}")
            page = await wire.ok("evflow.executions.list", {"limit": 2})
            await wire.ok("evflow.executions.list", {"status": "completed", "after": page["next"]})
            await wire.refused("evflow.executions.list", {"status": "asleep"}, "invalid_input")
            with closing(sqlite3.connect(log)) as db:
                (events,) = db.execute("SELECT count(*) FROM events").fetchone()
            notes = await stream(nc, events + 1)  # and the one rejection
            yield Capture(wire, notes, log)
    finally:
        await nc.drain()


async def test_what_a_running_engine_sends_fits_the_schemas(captured: Capture) -> None:
    """Requests, replies, durable commands, notifications and rejections, found by subject."""
    api = AsyncApi()
    statuses: set[str] = set()
    codes: set[str] = set()
    for exchange in captured.wire.exchanges:
        if exchange.sent:
            api.check_message(exchange.subject, exchange.headers, exchange.body)
        api.check_reply(exchange.subject, exchange.reply.headers, exchange.reply.data)
        answer = json.loads(exchange.reply.data)
        if ERROR_CODE in (exchange.reply.headers or {}):
            codes.add(answer["error"]["code"])
        elif exchange.subject.startswith("evflow.flo."):
            statuses.add(answer["status"])
            check(f"replies/{answer['status']}.json", answer, f"reply on {exchange.subject}")
    for subject, headers, body in captured.wire.published:
        api.check_message(subject, headers, body)

    kinds = set()
    for note in captured.notes:
        name = api.check_message(note.subject, note.headers, note.data)
        if name == "notification":
            event = json.loads(note.data)["event"]
            kinds.add(note.subject.rsplit(".", 1)[1])
            check(f"events/{event['type']}.json", event, f"the event of {note.subject}")

    assert api.exercised == set(api.doc["components"]["messages"]), "a message went unchecked"
    assert statuses == {"paused", "waiting", "completed", "failed", "cancelled"}
    assert kinds == {cls.kind for cls in EVENT_TYPES}
    assert codes >= {"finished", "not_paused", "expired", "invalid_input", "unknown_execution"}


async def test_invoke_bodies_fit_the_schema_of_their_flow(
    captured: Capture, tmp_path: Path
) -> None:
    """``evflow schemas --app`` describes each flow's invoke body as the engine judges it."""
    folder = tmp_path / "generated"
    schemas.write(folder, schemas.generate(APP))

    accepted = [
        (exchange.subject.split(".")[2], json.loads(exchange.body))
        for exchange in captured.wire.exchanges
        if exchange.subject.endswith(".invoke") and exchange.sent
    ]
    assert {flow for flow, _ in accepted} == {"approval", "quote", "faulty"}
    for flow, body in accepted:
        check(f"flows/{flow}.invoke.json", body, f"an invoke of {flow}", folder)
    for flow, body in captured.wire.bad_invokes:
        if flow in APP.flows:
            assert problems(f"flows/{flow}.invoke.json", body, folder), body
    assert problems("commands/invoke.json", [1]), "a body that is not an object must not fit"


async def test_the_rows_of_the_log_fit_the_stored_event_schema(captured: Capture) -> None:
    """Each SQLite row, read with sqlite3 alone, is a stored event; its data column an event."""
    with closing(sqlite3.connect(captured.log)) as db:
        rows = db.execute(
            "SELECT position, execution_id, version, type, schema_version, at, data FROM events"
        ).fetchall()

    assert {row[3] for row in rows} == {cls.__name__ for cls in EVENT_TYPES}
    for position, execution_id, version, kind, schema_version, at, data in rows:
        event = json.loads(data)
        stored = {
            "position": position,
            "execution_id": execution_id,
            "version": version,
            "schema_version": schema_version,
            "at": at,
            "event": event,
        }
        assert event["type"] == kind
        check("stored-event.json", stored, f"row {position}")
        check("event.json", event, f"the data of row {position}")
        check(f"events/{kind}.json", event, f"the data of row {position}")


def test_the_schemas_reject_what_the_engine_never_sends() -> None:
    """Not vacuous: a missing field, an unknown tag, kind or code, a bad timestamp fail."""
    paused = msgspec.to_builtins(
        Paused("e1", "approval", 2, "pause", 1, {}, ["ok"], {}, "evflow.flo.approval.resume.e1")
    )
    stored = msgspec.to_builtins(StoredEvent("e1", 1, T0, ExecutionStarted("approval", {})))
    error = {"code": "finished", "message": "over", "status": "completed", "version": 4}
    for path, good in [("replies/paused.json", paused), ("stored-event.json", stored)]:
        check(path, good, "the unchanged instance")
    check("error.json", {"error": error}, "the unchanged error")

    bad = {
        "replies/paused.json": [_without(paused, "execution_id"), {**paused, "deadline": "soon"}],
        "replies/settled.json": [_without(paused, "execution_id"), {**paused, "status": "odd"}],
        "stored-event.json": [{**stored, "event": {"type": "Exploded"}}, {**stored, "at": "x"}],
        "event.json": [{"type": "Exploded"}, {"type": "ExecutionStarted", "flow": "a"}],
        "notification.json": [{"kind": "exploded", "execution_id": "e1", "flow": "a",
                               "version": 1, "at": "2026-03-01T08:00:00Z", "event": None}],
        "error.json": [{"error": {**error, "code": "oops"}}, {"error": _without(error, "status")}],
        "commands/cancel.json": [{"reason": "x", "why": "unknown field"}],
    }  # fmt: skip
    for path, instances in bad.items():
        for instance in instances:
            assert problems(path, instance), f"{path} accepts {instance}"


def _without(instance: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in instance.items() if k != key}


def test_the_asyncapi_document_holds_together() -> None:
    """Every reference resolves; parameters match addresses; operations use their channels."""
    api = AsyncApi()
    doc = api.doc
    assert doc["asyncapi"] == "3.0.0"

    for ref in _refs(doc):
        if ref.startswith("#/"):
            api.resolve(ref)
        else:
            assert (SCHEMAS / ref).is_file(), f"asyncapi.json refers to missing {ref}"
    for name, channel in doc["channels"].items():
        placeholders = set(re.findall(r"\{(\w+)\}", channel["address"] or ""))
        assert set(channel.get("parameters", {})) == placeholders, name
    for name, operation in doc["operations"].items():
        channel = operation["channel"]["$ref"]
        for message in operation["messages"]:
            assert message["$ref"].startswith(f"{channel}/messages/"), (name, message)
    for path in SCHEMAS.rglob("*.json"):
        if path.name != "asyncapi.json":
            assert validator(path.relative_to(SCHEMAS).as_posix()).schema["$schema"] == DIALECT
    with pytest.raises(AssertionError, match="Evflow-Pause"):
        api.check_message("evflow.flo.approval.resume.e1", {"Evflow-Pause": "0"}, b"{}")
    with pytest.raises(AssertionError, match="Evflow-Execution-Id"):
        api.check_reply("evflow.executions.get.e1", {}, b"{}")


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


async def test_the_checked_in_schemas_are_what_the_code_generates(tmp_path: Path) -> None:
    """``evflow schemas`` regenerates the folder byte for byte."""
    result = await evflow("schemas", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr

    fresh = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    kept = {p.relative_to(SCHEMAS).as_posix() for p in SCHEMAS.rglob("*") if p.is_file()}
    hint = "schemas/ is stale: run `evflow schemas` and commit the result"
    assert fresh == kept, f"{hint} (files differ: {sorted(fresh ^ kept)})"
    changed = []
    for path in sorted(fresh):
        if (tmp_path / path).read_bytes() != (SCHEMAS / path).read_bytes():
            changed.append(path)
    assert not changed, f"{hint} (changed: {changed})"
    assert schemas.generate() == schemas.generate(), "two generations differ"


async def test_check_names_each_stale_file_and_fails(tmp_path: Path) -> None:
    """``--check`` passes on a fresh copy, and names a changed, a missing and an extra file."""
    copy = tmp_path / "schemas"
    shutil.copytree(SCHEMAS, copy)
    fresh = await evflow("schemas", "--check", "--out", str(copy))
    (copy / "error.json").write_text("{}\n")
    (copy / "events" / "TimerFired.json").unlink()
    (copy / "events" / "Old.json").write_text("{}\n")
    stale = await evflow("schemas", "--check", "--out", str(copy))

    assert fresh.returncode == 0, fresh.stderr
    assert stale.returncode == 1
    for name in ("error.json: differs", "TimerFired.json: missing", "Old.json: not generated"):
        assert name in stale.stderr, stale.stderr
    assert "run `evflow schemas --out" in stale.stderr
    assert (copy / "error.json").read_text() == "{}\n", "--check must write nothing"
