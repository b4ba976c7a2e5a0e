"""Flow versions: several versions of a flow served side by side.

New executions start on the latest version; an execution runs to its end on the version it
started on; a command on one whose version is not served is refused, naming both versions,
and leaves the log as it was. The engine runs on a real SQLite file with a ``ManualClock``;
a new engine on the same file, with another app, is a restart after a deploy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest

from evflow import (
    App,
    Client,
    Context,
    Engine,
    FlowVersionGone,
    InvalidInput,
    ManualClock,
    Status,
    UnknownFlow,
)
from evflow.events import ExecutionResumed, ExecutionStarted, StoredEvent
from evflow.nats_server import NatsServer
from evflow.server import Server
from evflow.state import ExecutionState
from evflow.store.sqlite import SqliteStore
from processes import Result, Spawn, cli_env, evflow, sqlite_url
from versioned_flows import app_both, app_v1, app_v2, approval_v1, approval_v2, make_app
from wire import call, error, invoke_subject, reply, resume_subject

TESTS = Path(__file__).resolve().parent

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)

MakeEngine = Callable[[App], Awaitable[Engine]]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "evflow.db"


@pytest.fixture
async def make_engine(db: Path, clock: ManualClock) -> AsyncIterator[MakeEngine]:
    """Starts an Engine (recovery and timers included) for an App on the test's SQLite file;
    a new one stops the previous one first, as a restart after a deploy does."""
    running: list[tuple[Engine, SqliteStore]] = []

    async def make(app: App) -> Engine:
        for engine, store in running:
            await engine.stop()
            await store.close()
        running.clear()
        store = SqliteStore(db)
        await store.open()
        engine = Engine(app, store, clock=clock)
        await engine.recover()
        await engine.start()
        running.append((engine, store))
        return engine

    yield make
    for engine, store in running:
        await engine.stop()
        await store.close()


def body(**values: Any) -> bytes:
    return msgspec.json.encode(values)


def log_rows(db: Path) -> list[tuple]:
    """Every row of the log, every column, as SQLite holds them: the bytes to compare."""
    with closing(sqlite3.connect(db)) as connection:
        return connection.execute("SELECT * FROM events ORDER BY position").fetchall()


async def logged(caplog: pytest.LogCaptureFixture, *words: str) -> logging.LogRecord:
    """The first record whose message holds all ``words``, once one is logged (30 s at most)."""
    deadline = time.monotonic() + 30
    while True:
        for record in caplog.records:
            if all(word in record.getMessage() for word in words):
                return record
        assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
        await asyncio.sleep(0.01)


async def until(engine: Engine, execution_id: str, status: Status) -> ExecutionState:
    """The execution's state once it reaches ``status`` (timers fire in the background)."""
    deadline = time.monotonic() + 30
    while (state := await engine.get(execution_id)).status is not status:
        assert time.monotonic() < deadline, f"still {state.status.value}: {state}"
        await asyncio.sleep(0.01)
    return state


# Registering versions.


def test_versions_of_one_flow_register_side_by_side_and_get_defaults_to_the_latest() -> None:
    app = make_app(1, 2)

    assert app.versions("approval") == [1, 2]
    assert app.get("approval").fn is approval_v2
    assert app.get("approval", 1).fn is approval_v1
    assert app.get("approval", 2).version == 2
    assert app.describe("approval") == "v1, v2"
    assert app.summary() == "approval v1, v2; reminder v1, v2"
    assert [flow.version for flow in app.latest()] == [2, 2]


def test_the_latest_version_is_the_highest_whatever_the_order_of_registration() -> None:
    app = App()
    app.flow("approval", version=3)(approval_v2)
    app.flow("approval", version=1)(approval_v1)

    assert app.get("approval").version == 3
    assert app.versions("approval") == [1, 3]


def test_each_version_has_its_own_inputs() -> None:
    app = make_app(1, 2)

    assert msgspec.structs.fields(app.get("approval", 1).inputs)[0].name == "amount"
    assert [f.name for f in msgspec.structs.fields(app.get("approval", 2).inputs)] == [
        "amount",
        "currency",
    ]


def test_registering_one_version_twice_names_both_functions() -> None:
    app = make_app(1)

    async def approval_again(ctx: Context, amount: float) -> dict:
        return {}

    with pytest.raises(ValueError) as info:
        app.flow("approval", version=1)(approval_again)

    message = str(info.value)
    assert "version 1 of flow 'approval' is registered twice" in message
    assert "approval_v1" in message and "approval_again" in message
    assert "version=2" in message
    assert app.get("approval", 1).fn is approval_v1


@pytest.mark.parametrize("version", [0, -1, "2", 1.5, True, None])
def test_a_version_must_be_a_whole_number_from_one(version: Any) -> None:
    app = App()

    with pytest.raises(ValueError) as info:
        app.flow("approval", version=version)(approval_v1)

    assert f"flow 'approval' has version {version!r}" in str(info.value)
    assert "whole number from 1" in str(info.value)
    assert app.flows == {}


def test_getting_a_version_not_registered_names_the_registered_ones() -> None:
    with pytest.raises(UnknownFlow) as info:
        app_v2.get("approval", 1)

    assert "flow 'approval' has no version 1; registered: v2" in info.value.message


# Running executions across versions.


async def test_a_paused_v1_execution_resumes_on_v1_code_while_new_invokes_run_v2(
    make_engine: MakeEngine,
) -> None:
    old = await (await make_engine(app_v1)).invoke("approval", body(amount=50.0))

    engine = await make_engine(app_both)
    new = await engine.invoke("approval", body(amount=70.0, currency="EUR"))
    old_done = await engine.resume("approval", old.execution_id, body(approved=True))
    new_done = await engine.resume(
        "approval", new.execution_id, body(approved=False, note="over budget")
    )

    assert (old.flow_version, new.flow_version) == (1, 2)
    assert old_done.result == {"code": "v1", "amount": 50.0, "approved": True}
    assert old_done.flow_version == 1
    assert new_done.result == {"code": "v2", "approved": False, "note": "over budget"}
    started = (await engine.history(new.execution_id))[0].event
    assert isinstance(started, ExecutionStarted) and started.flow_version == 2


async def test_invoke_validates_against_the_latest_versions_inputs(
    make_engine: MakeEngine, db: Path
) -> None:
    engine = await make_engine(app_both)

    with pytest.raises(InvalidInput) as info:
        await engine.invoke("approval", body(amount=5.0))

    assert info.value.field == "currency"
    assert log_rows(db) == []


async def test_resume_of_an_execution_whose_version_is_gone_is_refused_and_changes_nothing(
    make_engine: MakeEngine, db: Path
) -> None:
    paused = await (await make_engine(app_v1)).invoke("approval", body(amount=50.0))
    before = log_rows(db)

    engine = await make_engine(app_v2)
    with pytest.raises(FlowVersionGone) as info:
        await engine.resume("approval", paused.execution_id, body(approved=True))

    gone = info.value
    assert log_rows(db) == before
    assert f"execution {paused.execution_id} started on version 1 of flow 'approval'" in str(gone)
    assert "serves only v2" in gone.message
    assert "serve version 1 beside the new one" in gone.message
    assert (gone.flow_version, gone.registered, gone.details["flow"]) == (1, [2], "approval")
    assert (gone.execution_status, gone.version) == ("paused", 2)
    assert (gone.status, gone.code) == (409, "flow_version_gone")

    engine = await make_engine(app_both)
    done = await engine.resume("approval", paused.execution_id, body(approved=True))
    assert done.result == {"code": "v1", "amount": 50.0, "approved": True}


async def test_a_resume_past_the_deadline_of_a_gone_version_records_no_expiry(
    make_engine: MakeEngine, clock: ManualClock, db: Path
) -> None:
    """The deadline passed, but expiring the pause would run v1 code on: it is left be."""
    first = await make_engine(app_v1)
    paused = await first.invoke("approval", body(amount=50.0))
    await first.stop()
    before = log_rows(db)
    clock.advance(timedelta(hours=2))

    engine = await make_engine(app_v2)
    with pytest.raises(FlowVersionGone):
        await engine.resume("approval", paused.execution_id, body(approved=True))
    await asyncio.sleep(0.05)  # room for a wrong firing of the overdue deadline

    assert log_rows(db) == before
    engine = await make_engine(app_both)
    expired = await until(engine, paused.execution_id, Status.FAILED)
    assert expired.error is not None and expired.error.type == "PauseTimedOut"


async def test_a_timer_of_a_gone_version_is_left_unfired_until_its_version_is_served(
    make_engine: MakeEngine, clock: ManualClock, db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="evflow")
    first = await make_engine(app_v1)
    waiting = await first.invoke("reminder", body(hours=1.0))
    await first.stop()
    before = log_rows(db)
    clock.advance(timedelta(hours=2))

    engine = await make_engine(app_v2)
    record = await logged(caplog, waiting.execution_id, "left unfired")
    still = await engine.get(waiting.execution_id)

    assert record.levelno == logging.WARNING
    assert "version 1 of flow 'reminder'" in record.getMessage()
    assert "serves only v2" in record.getMessage()
    assert log_rows(db) == before
    assert still.status is Status.WAITING
    assert engine.timers.next_due() is None  # left for a later start, not retried in a loop

    engine = await make_engine(app_both)
    done = await until(engine, waiting.execution_id, Status.COMPLETED)
    assert done.result["code"] == "v1"


async def test_recovery_leaves_an_execution_of_a_gone_version_for_an_engine_that_serves_it(
    make_engine: MakeEngine, db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A crash fell after the resume was recorded, before the flow ran on from it."""
    engine = await make_engine(app_v1)
    paused = await engine.invoke("approval", body(amount=9.0))
    answer = ExecutionResumed(1, {"approved": True})
    resumed = StoredEvent(paused.execution_id, 3, engine.clock.now(), answer)
    await engine.store.append(paused.execution_id, 2, [resumed])
    before = log_rows(db)

    caplog.set_level(logging.WARNING, logger="evflow")
    engine = await make_engine(app_v2)
    record = await logged(caplog, paused.execution_id, "was not recovered")

    assert record.levelno == logging.WARNING
    assert "version 1 of flow 'approval'" in record.getMessage()
    assert log_rows(db) == before
    assert (await engine.get(paused.execution_id)).status is Status.RUNNING

    engine = await make_engine(app_both)
    done = await engine.get(paused.execution_id)
    assert done.status is Status.COMPLETED
    assert done.result == {"code": "v1", "amount": 9.0, "approved": True}


async def test_an_execution_whose_version_is_gone_can_still_be_cancelled(
    make_engine: MakeEngine,
) -> None:
    """Cancelling runs no flow code, so it needs no version of it."""
    paused = await (await make_engine(app_v1)).invoke("approval", body(amount=50.0))

    engine = await make_engine(app_v2)
    cancelled = await engine.cancel("approval", paused.execution_id, "retired with v1")

    assert cancelled.status is Status.CANCELLED
    assert cancelled.flow_version == 1
    assert cancelled.cancel_reason == "retired with v1"


# Over NATS, and from the command line.


async def test_a_resume_over_nats_of_a_gone_version_is_a_409_carrying_both_versions(
    nats_server: NatsServer, store_url: str
) -> None:
    first = Server(app_v1, store_url, nats_server.url)
    await first.start()
    async with await Client.connect(nats_server.url) as client:
        paused = await client.invoke("approval", {"amount": 5.0})
    await first.stop()

    server = Server(app_v2, store_url, nats_server.url)
    await server.start()
    nc = await nats.connect(nats_server.url)
    try:
        refused = await call(nc, resume_subject("approval", paused.execution_id), {"approved": 1})
        async with await Client.connect(nats_server.url) as client:
            with pytest.raises(FlowVersionGone) as info:
                await client.resume("approval", paused.execution_id, {"approved": True})
        fresh = reply(await call(nc, invoke_subject("approval"), {"amount": 1, "currency": "USD"}))
        got = reply(await call(nc, f"evflow.executions.get.{paused.execution_id}"))
        metadata = json.loads((await call(nc, "$SRV.INFO.evflow")).data)["metadata"]
    finally:
        await nc.drain()
        await server.stop()

    body = error(refused, 409, "flow_version_gone")
    assert body["execution_id"] == paused.execution_id
    assert (body["flow"], body["flow_version"], body["registered"]) == ("approval", 1, [2])
    assert (body["status"], body["version"]) == ("paused", 2)
    assert "started on version 1" in body["message"] and "serves only v2" in body["message"]
    assert (info.value.flow_version, info.value.registered) == (1, [2])
    assert (paused.flow_version, fresh["flow_version"], got["flow_version"]) == (1, 2, 1)
    assert metadata["flows"] == "approval v2; reminder v2"


async def test_serve_logs_the_versions_and_the_cli_shows_a_gone_version_refused(
    nats_server: NatsServer, spawn: Spawn, tmp_path: Path
) -> None:
    """Serve v1 and invoke; deploy v2 alone and resume (refused); serve both and resume."""
    env = cli_env(PYTHONPATH=str(TESTS))
    nats_url = ("--nats", nats_server.url)
    store = ("--store", sqlite_url(tmp_path / "evflow.db"))
    logs = []

    async def serve_and_run(app: str, *command: str) -> Result:
        server = await spawn("serve", "--app", f"versioned_flows:{app}", *nats_url, *store, env=env)
        await server.wait_for("try it:")
        result = await evflow(*command, *nats_url, env=env)
        assert await server.stop() == 0
        logs.append(server.stderr)
        return result

    invoked = await serve_and_run("app_v1", "invoke", "approval", "--input", "amount=3")
    execution_id = invoked.settled()["id"]
    resume = ("resume", "approval", execution_id, "--output", "approved=true")
    refused = await serve_and_run("app_v2", *resume)
    resumed = await serve_and_run("app_both", *resume)

    assert "serving flow 'approval' v1 on evflow.flo.approval.invoke" in logs[0]
    assert "serving flow 'approval' v2 on evflow.flo.approval.invoke" in logs[1]
    assert "serving flow 'approval' v1, v2 on evflow.flo.approval.invoke" in logs[2]
    assert "try it: evflow invoke approval --input amount=... --input currency=..." in logs[2]
    assert refused.returncode == 1 and refused.stdout == ""
    assert "flow_version_gone" in refused.stderr
    assert f"execution {execution_id} started on version 1" in " ".join(refused.stderr.split())
    assert resumed.settled()["status"] == "completed"
    assert '"code":"v1"' in resumed.stdout
