"""Flows driven by the Engine on a real SQLite log, without NATS.

Each test builds a small ``App`` and calls ``Engine.invoke`` / ``resume`` / ``recover``
directly: command validation, replay of steps, pauses and time, failures, non-determinism,
recovery of executions a crash left running, and idempotency keys across restarts.
"""

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from evflow import (
    AlreadyResumed,
    App,
    Context,
    Engine,
    EvflowError,
    Finished,
    InvalidInput,
    InvalidJson,
    NondeterminismError,
    NotPaused,
    Status,
    StepError,
    UnknownExecution,
    UnknownFlow,
)
from evflow.events import (
    ExecutionFailed,
    ExecutionPaused,
    ExecutionResumed,
    ExecutionStarted,
    StepCompleted,
    StepFailed,
    StoredEvent,
    new_execution_id,
)
from evflow.store.sqlite import SqliteStore

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)

MakeEngine = Callable[..., Awaitable[Engine]]


class Ticker:
    """A clock that moves on one second each time it is read, so no two reads agree."""

    def __init__(self) -> None:
        self.current = T0

    def now(self) -> datetime:
        self.current += timedelta(seconds=1)
        return self.current


@pytest.fixture(params=[0, 16], ids=["cold", "hot"])
async def make_engine(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[MakeEngine]:
    """Builds an Engine for an App on the test's SQLite file; a new one acts as a restart.

    Each test runs twice: with no hot executions (every resume replays from the log) and
    with some (a resume answers the flow waiting in memory).
    """
    stores: list[SqliteStore] = []

    async def make(app: App, hot_executions: int = request.param) -> Engine:
        for old in stores:  # one process at a time on the file, as after a restart
            await old.close()
        store = SqliteStore(tmp_path / "evflow.db")
        await store.open()
        stores.append(store)
        return Engine(app, store, clock=Ticker(), hot_executions=hot_executions)

    yield make
    for store in stores:
        await store.close()


COLD_ONLY = pytest.mark.parametrize("make_engine", [0], indirect=True, ids=["cold"])
"""For tests of what a replay from the log does: run with no hot executions only."""


def body(**values: Any) -> bytes:
    """A JSON command body."""
    return json.dumps(values).encode()


def types(events: list) -> list[str]:
    """The event type names of a history."""
    return [type(e.event).__name__ for e in events]


def ordering_app(calls: list[str], fn: Callable[[str], Any] | None = None) -> App:
    """A flow that runs a step, pauses with the step's result, then returns both."""
    app = App()

    def reserve(item: str) -> dict:
        calls.append(item)
        return {"reservation": f"r-{item}"}

    @app.flow("order")
    async def order(ctx: Context, item: str) -> dict:
        reservation = await ctx.step("reserve", fn or reserve, item)
        answer = await ctx.pause(inputs=reservation, outputs={"ok": bool})
        return {"reservation": reservation, "ok": answer["ok"]}

    return app


async def test_step_runs_once_across_resume(make_engine: MakeEngine):
    """A step runs live once; resuming (cold: replaying it from the log) does not call it."""
    calls: list[str] = []
    engine = await make_engine(ordering_app(calls))

    paused = await engine.invoke("order", body(item="book"))
    assert calls == ["book"] and paused.pause is not None
    assert paused.pause.inputs == {"reservation": "r-book"}

    done = await engine.resume("order", paused.execution_id, body(ok=True))

    assert calls == ["book"]
    assert done.status is Status.COMPLETED
    assert done.result == {"reservation": {"reservation": "r-book"}, "ok": True}
    assert done.steps == 1


async def test_step_runs_once_across_a_restart(make_engine: MakeEngine):
    """An engine restarted between pause and resume replays the step, never re-runs it."""
    calls: list[str] = []
    first = await make_engine(ordering_app(calls))
    paused = await first.invoke("order", body(item="lamp"))

    second = await make_engine(ordering_app(calls))
    done = await second.resume("order", paused.execution_id, body(ok=False))

    assert calls == ["lamp"]
    assert done.result == {"reservation": {"reservation": "r-lamp"}, "ok": False}


async def test_async_step_function_is_awaited_and_recorded(make_engine: MakeEngine):
    """An async step function is awaited; its result is recorded and replayed."""
    calls: list[str] = []

    async def reserve_later(item: str) -> dict:
        await asyncio.sleep(0)
        calls.append(item)
        return {"reservation": f"async-{item}"}

    engine = await make_engine(ordering_app(calls, reserve_later))
    paused = await engine.invoke("order", body(item="pen"))
    done = await engine.resume("order", paused.execution_id, body(ok=True))

    assert calls == ["pen"]
    assert done.result == {"reservation": {"reservation": "async-pen"}, "ok": True}
    history = await engine.history(paused.execution_id)
    assert history[1].event == StepCompleted(1, "reserve", {"reservation": "async-pen"})


async def test_a_blocking_sync_step_holds_up_no_other_execution(make_engine: MakeEngine):
    """A sync step runs in a worker thread: while it blocks, the event loop serves another
    execution, whose run is what lets the blocked step go on."""
    gate = threading.Event()

    def blocked() -> bool:
        return gate.wait(timeout=10)  # True only if the loop could run meanwhile

    def opener() -> bool:
        gate.set()
        return True

    app = App()

    @app.flow("blocked")
    async def blocked_flow(ctx: Context) -> bool:
        return await ctx.step("wait_for_gate", blocked)

    @app.flow("opener")
    async def opener_flow(ctx: Context) -> bool:
        return await ctx.step("open_gate", opener)

    engine = await make_engine(app)
    first = asyncio.create_task(engine.invoke("blocked", b""))
    await asyncio.sleep(0.05)
    opened = await asyncio.wait_for(engine.invoke("opener", b""), 5)
    done = await first

    assert opened.result is True
    assert done.result is True


def failing_app(calls: list[int], seen: list[tuple[str, str, str]], fn: Callable) -> App:
    """A flow that catches a failing step's StepError, pauses, and returns what it saw."""
    app = App()

    @app.flow("fragile")
    async def fragile(ctx: Context) -> list:
        try:
            await ctx.step("check", fn)
        except StepError as error:
            seen.append((error.step, error.error_type, error.error_message))
        await ctx.pause(outputs={"ok": bool})
        return list(seen[-1])

    return app


@COLD_ONLY
async def test_failing_step_raises_step_error_live_and_on_replay(make_engine: MakeEngine):
    """A step that raises gives the flow a StepError; replay raises the same, without a run.

    No execution is kept hot, so the resume replays the flow from its start."""
    calls: list[int] = []
    seen: list[tuple[str, str, str]] = []

    def out_of_stock() -> None:
        calls.append(1)
        raise ValueError("no stock left")

    engine = await make_engine(failing_app(calls, seen, out_of_stock))
    paused = await engine.invoke("fragile", b"")
    done = await engine.resume("fragile", paused.execution_id, body(ok=True))

    assert calls == [1]
    assert seen == [("check", "ValueError", "no stock left")] * 2
    assert done.result == ["check", "ValueError", "no stock left"]
    history = await engine.history(paused.execution_id)
    assert history[1].event == StepFailed(1, "check", "ValueError", "no stock left")


async def test_step_returning_non_json_fails_with_type_error(make_engine: MakeEngine):
    """A step whose result is not JSON is recorded as StepFailed with TypeError."""
    calls: list[int] = []
    seen: list[tuple[str, str, str]] = []

    def opaque() -> object:
        calls.append(1)
        return object()

    engine = await make_engine(failing_app(calls, seen, opaque))
    paused = await engine.invoke("fragile", b"")

    history = await engine.history(paused.execution_id)
    failed = history[1].event
    assert isinstance(failed, StepFailed) and failed.error_type == "TypeError"
    assert seen[0][:2] == ("check", "TypeError") and "JSON" in seen[0][2]
    assert calls == [1]


async def test_uncaught_step_error_fails_the_execution(make_engine: MakeEngine):
    """A StepError the flow does not catch ends the execution failed, naming the step."""
    app = App()

    def boom() -> None:
        raise RuntimeError("service down")

    @app.flow("careless")
    async def careless(ctx: Context) -> None:
        await ctx.step("call", boom)

    engine = await make_engine(app)
    state = await engine.invoke("careless", b"{}")

    assert state.status is Status.FAILED and state.error is not None
    assert state.error.type == "StepError"
    assert state.error.message == "step 'call' raised RuntimeError: service down"


async def test_flow_raising_ends_failed_with_type_and_message(make_engine: MakeEngine):
    """An exception from flow code after a resume ends the execution failed."""
    app = App()

    @app.flow("picky")
    async def picky(ctx: Context) -> None:
        answer = await ctx.pause(outputs={"code": str})
        raise KeyError(f"unknown code {answer['code']}")

    engine = await make_engine(app)
    paused = await engine.invoke("picky", b"")
    failed = await engine.resume("picky", paused.execution_id, body(code="zz"))

    assert failed.status is Status.FAILED and failed.error is not None
    assert (failed.error.type, failed.error.message) == ("KeyError", "'unknown code zz'")
    history = await engine.history(paused.execution_id)
    assert history[-1].event == ExecutionFailed("KeyError", "'unknown code zz'")


async def test_flow_returning_non_json_ends_failed(make_engine: MakeEngine):
    """A flow whose return value is not JSON ends failed with TypeError, not completed."""
    app = App()

    @app.flow("opaque")
    async def opaque(ctx: Context) -> object:
        return object()

    engine = await make_engine(app)
    state = await engine.invoke("opaque", b"")

    assert state.status is Status.FAILED and state.error is not None
    assert state.error.type == "TypeError"


async def test_context_names_the_execution_and_flow(make_engine: MakeEngine):
    """ctx.execution_id and ctx.flow say which execution of which flow is running."""
    app = App()

    @app.flow("whoami")
    async def whoami(ctx: Context) -> dict:
        return {"execution_id": ctx.execution_id, "flow": ctx.flow}

    engine = await make_engine(app)
    state = await engine.invoke("whoami", b"")

    assert state.result == {"execution_id": state.execution_id, "flow": "whoami"}


@COLD_ONLY
async def test_now_is_the_same_instant_live_and_on_replay(make_engine: MakeEngine):
    """ctx.now() is recorded: replay sees what the live run saw, though the clock moved."""
    app = App()
    seen: list[datetime] = []

    @app.flow("timed")
    async def timed(ctx: Context) -> dict:
        before = ctx.now()
        seen.append(before)
        await ctx.pause(outputs={"ok": bool})
        return {"before": before.isoformat(), "after": ctx.now().isoformat()}

    engine = await make_engine(app)  # cold: the resume replays
    paused = await engine.invoke("timed", b"")
    done = await engine.resume("timed", paused.execution_id, body(ok=True))

    history = await engine.history(paused.execution_id)
    assert seen == [history[0].at, history[0].at]
    assert done.result == {
        "before": history[0].at.isoformat(),
        "after": history[2].at.isoformat(),
    }


@COLD_ONLY
async def test_now_after_a_step_is_the_step_time(make_engine: MakeEngine):
    """After a step, ctx.now() is the step's recorded time, on replay as well."""
    app = App()
    seen: list[datetime] = []

    @app.flow("stamped")
    async def stamped(ctx: Context) -> str:
        await ctx.step("noop", lambda: None)
        seen.append(ctx.now())
        await ctx.pause(outputs={})
        return ctx.now().isoformat()

    engine = await make_engine(app)  # cold: the resume replays
    paused = await engine.invoke("stamped", b"")
    await engine.resume("stamped", paused.execution_id, b"")

    history = await engine.history(paused.execution_id)
    assert type(history[1].event) is StepCompleted
    assert seen == [history[1].at, history[1].at]


class Verdict(msgspec.Struct):
    """A resume body declared as a Struct."""

    approved: bool
    reason: str = "none given"


async def test_pause_with_struct_outputs_returns_an_instance(make_engine: MakeEngine):
    """A pause declaring a Struct answers with an instance of it, defaults honoured."""
    app = App()

    @app.flow("review")
    async def review(ctx: Context) -> dict:
        verdict = await ctx.pause(outputs=Verdict)
        return {"is_verdict": isinstance(verdict, Verdict), "reason": verdict.reason}

    engine = await make_engine(app)
    paused = await engine.invoke("review", b"")
    done = await engine.resume("review", paused.execution_id, body(approved=True))

    assert paused.pause is not None
    assert paused.pause.outputs == {"approved": "bool", "reason": "str"}
    assert done.result == {"is_verdict": True, "reason": "none given"}


async def test_two_pauses_are_answered_in_turn(make_engine: MakeEngine):
    """Each resume answers the pending pause and runs to the next one."""
    engine = await make_engine(two_pause_app())
    paused = await engine.invoke("purchase", body(item="desk"))
    second = await engine.resume("purchase", paused.execution_id, body(ok=True))
    done = await engine.resume("purchase", paused.execution_id, body(ok=False))

    assert paused.pause is not None and paused.pause.name == "manager"
    assert second.pause is not None and second.pause.name == "finance"
    assert second.answered == (1,)
    assert done.result == {"manager": True, "finance": False}
    history = await engine.history(paused.execution_id)
    assert [e.event.sequence for e in history if type(e.event) is ExecutionResumed] == [1, 2]


def two_pause_app() -> App:
    """A flow with two pauses, manager then finance."""
    app = App()

    @app.flow("purchase")
    async def purchase(ctx: Context, item: str) -> dict:
        manager = await ctx.pause(name="manager", inputs={"item": item}, outputs={"ok": bool})
        finance = await ctx.pause(name="finance", inputs={"item": item}, outputs={"ok": bool})
        return {"manager": manager["ok"], "finance": finance["ok"]}

    return app


def approval_app(variant: str = "original", calls: list[str] | None = None) -> App:
    """The approval flow, or a changed version of it registered under the same name."""
    app = App()

    @app.flow("approval")
    async def approval(ctx: Context, amount: float) -> dict:
        if variant == "step_first":
            await ctx.step("audit", lambda: (calls or []).append("audit"))
        if variant == "no_pause":
            return {"approved": True}
        name = "review" if variant == "renamed" else "pause"
        answer = await ctx.pause(name=name, inputs={"amount": amount}, outputs={"ok": bool})
        return {"approved": answer["ok"]}

    return app


@pytest.mark.parametrize("variant", ["renamed", "step_first", "no_pause"])
async def test_changed_flow_code_is_a_nondeterminism_fault(make_engine: MakeEngine, variant: str):
    """Resuming with changed flow code raises NondeterminismError and leaves the log as is."""
    calls: list[str] = []
    first = await make_engine(approval_app())
    paused = await first.invoke("approval", body(amount=10.0))
    execution_id = paused.execution_id
    before = await first.store.read_all()

    changed = await make_engine(approval_app(variant, calls))
    with pytest.raises(NondeterminismError) as info:
        await changed.resume("approval", execution_id, body(ok=True))

    assert info.value.execution_id == execution_id
    assert info.value.details["sequence"] == 1
    assert execution_id in info.value.message
    assert await changed.store.read_all() == before
    assert calls == []


async def test_nondeterminism_names_both_operations(make_engine: MakeEngine):
    """The fault says what the history recorded and what the code issued at the sequence."""
    first = await make_engine(approval_app())
    paused = await first.invoke("approval", body(amount=10.0))

    changed = await make_engine(approval_app("renamed"))
    with pytest.raises(NondeterminismError) as info:
        await changed.resume("approval", paused.execution_id, body(ok=True))

    assert info.value.details["recorded"] == "pause pause"
    assert info.value.details["issued"] == "pause review"
    assert "operation 1" in info.value.message


async def test_nondeterminism_cannot_be_swallowed_by_flow_code(make_engine: MakeEngine):
    """Flow code that catches every exception still cannot hide a non-determinism fault."""
    first = await make_engine(approval_app())
    paused = await first.invoke("approval", body(amount=10.0))
    before = await first.store.read_all()
    app = App()

    @app.flow("approval")
    async def approval(ctx: Context, amount: float) -> str:
        try:
            await ctx.step("sneaky", lambda: 1)
        except Exception:
            pass
        return "carried on"

    changed = await make_engine(app)
    with pytest.raises(NondeterminismError):
        await changed.resume("approval", paused.execution_id, body(ok=True))

    assert await changed.store.read_all() == before


async def test_replay_after_a_changed_earlier_step_name_is_a_fault(make_engine: MakeEngine):
    """A step recorded under one name and replayed under another is a fault at its sequence."""
    calls: list[str] = []
    first = await make_engine(ordering_app(calls))
    paused = await first.invoke("order", body(item="mug"))
    before = await first.store.read_all()
    app = App()

    @app.flow("order")
    async def order(ctx: Context, item: str) -> dict:
        await ctx.step("book", calls.append, item)
        await ctx.pause(outputs={"ok": bool})
        return {}

    changed = await make_engine(app)
    with pytest.raises(NondeterminismError) as info:
        await changed.resume("order", paused.execution_id, body(ok=True))

    assert info.value.details["sequence"] == 1
    assert calls == ["mug"]
    assert await changed.store.read_all() == before
    assert types(before) == ["ExecutionStarted", "StepCompleted", "ExecutionPaused"]
    assert isinstance(before[2].event, ExecutionPaused)


# Command validation: a bad body is refused before anything is appended.


class Address(msgspec.Struct):
    """A nested invoke field."""

    city: str
    zip: str


def validated_app() -> App:
    """Flows with typed parameters, a default, a nested Struct, and no parameters."""
    app = App()

    @app.flow("approval")
    async def approval(ctx: Context, amount: float, requester: str, note: str = "none") -> dict:
        answer = await ctx.pause(
            inputs={"amount": amount, "requester": requester, "note": note},
            outputs={"approved": bool, "comment": str},
        )
        return {"approved": answer["approved"], "comment": answer["comment"], "note": note}

    @app.flow("shipping")
    async def shipping(ctx: Context, address: Address) -> str:
        return address.city

    @app.flow("ping")
    async def ping(ctx: Context) -> str:
        return "pong"

    return app


@pytest.mark.parametrize(
    ("flow", "raw", "field"),
    [
        ("approval", b'{"amount": 1.5}', "requester"),
        ("approval", b'{"amount": "lots", "requester": "ann"}', "amount"),
        ("approval", b'{"amount": 1.5, "requester": "ann", "extra": 1}', "extra"),
        ("approval", b'{"amount": 1.5, "requester": "ann", "note": 3}', "note"),
        ("approval", b'{"amount": true, "requester": "ann"}', "amount"),
        ("approval", b"", "amount"),
        ("shipping", b'{"address": {"city": "Oslo"}}', "address.zip"),
        ("shipping", b'{"address": {"city": 7, "zip": "0150"}}', "address.city"),
    ],
)
async def test_invalid_invoke_input_names_the_field_and_appends_nothing(
    make_engine: MakeEngine, flow: str, raw: bytes, field: str
):
    """A missing, mistyped or unknown field is InvalidInput naming it; nothing is logged."""
    engine = await make_engine(validated_app())

    with pytest.raises(InvalidInput) as info:
        await engine.invoke(flow, raw)

    assert info.value.details["field"] == field
    assert info.value.status == 400 and f"'{flow}'" in info.value.message
    assert await engine.store.read_all() == []


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"text"', b"null", b"42", b'{"amount": ', b"{]"])
async def test_invoke_body_that_is_not_a_json_object_appends_nothing(
    make_engine: MakeEngine, raw: bytes
):
    """A body that is not a JSON object (or not JSON at all) is InvalidJson; nothing logged."""
    engine = await make_engine(validated_app())

    with pytest.raises(InvalidJson) as info:
        await engine.invoke("approval", raw)

    assert info.value.status == 400 and info.value.code == "invalid_json"
    assert await engine.store.read_all() == []


async def test_invoke_of_an_unknown_flow_appends_nothing(make_engine: MakeEngine):
    """Invoking a flow nobody registered is UnknownFlow listing the known flows."""
    engine = await make_engine(validated_app())

    with pytest.raises(UnknownFlow) as info:
        await engine.invoke("nope", b"{}")

    assert "approval" in info.value.message and "ping" in info.value.message
    assert await engine.store.read_all() == []


@pytest.mark.parametrize("raw", [b"", b"{}"])
async def test_flow_without_parameters_accepts_an_empty_body(make_engine: MakeEngine, raw: bytes):
    """A flow without parameters runs on an empty body or an empty object."""
    engine = await make_engine(validated_app())

    state = await engine.invoke("ping", raw)

    assert (state.status, state.result, state.inputs) == (Status.COMPLETED, "pong", {})


async def test_invoke_defaults_are_honoured_and_recorded(make_engine: MakeEngine):
    """A parameter with a default may be left out; the default is what the flow and log see."""
    engine = await make_engine(validated_app())

    state = await engine.invoke("approval", body(amount=2, requester="ann"))

    assert state.inputs == {"amount": 2.0, "requester": "ann", "note": "none"}
    assert state.pause is not None and state.pause.inputs["note"] == "none"
    history = await engine.history(state.execution_id)
    assert history[0].event.inputs == state.inputs


@pytest.mark.parametrize(
    ("raw", "error", "field"),
    [
        (b'{"approved": true}', InvalidInput, "comment"),
        (b'{"approved": "yes", "comment": "ok"}', InvalidInput, "approved"),
        (b'{"approved": true, "comment": "ok", "extra": 0}', InvalidInput, "extra"),
        (b'["approved"]', InvalidJson, None),
        (b'{"approved": tru', InvalidJson, None),
    ],
)
async def test_invalid_resume_body_is_refused_and_appends_nothing(
    make_engine: MakeEngine, raw: bytes, error: type[Exception], field: str | None
):
    """A bad resume body is a 400 naming the field; the execution stays paused, log as is."""
    engine = await make_engine(validated_app())
    paused = await engine.invoke("approval", body(amount=1.0, requester="ann"))
    before = await engine.store.read_all()

    with pytest.raises(error) as info:
        await engine.resume("approval", paused.execution_id, raw)

    assert info.value.status == 400
    assert info.value.details.get("field") == field
    assert info.value.execution_id == paused.execution_id
    assert await engine.store.read_all() == before
    assert (await engine.get(paused.execution_id)).status is Status.PAUSED


# Resume of an execution that cannot take it.


async def test_resume_of_an_unknown_execution(make_engine: MakeEngine):
    """Resuming an execution ID the log does not hold is UnknownExecution."""
    engine = await make_engine(validated_app())

    with pytest.raises(UnknownExecution) as info:
        await engine.resume("approval", "0" * 32, body(approved=True, comment=""))

    assert info.value.execution_id == "0" * 32 and info.value.status == 404
    assert await engine.store.read_all() == []


async def test_resume_through_the_wrong_flow(make_engine: MakeEngine):
    """Resuming an execution under another registered flow's name is UnknownExecution."""
    engine = await make_engine(validated_app())
    paused = await engine.invoke("approval", body(amount=1.0, requester="ann"))
    before = await engine.store.read_all()

    with pytest.raises(UnknownExecution):
        await engine.resume("ping", paused.execution_id, b"{}")

    assert await engine.store.read_all() == before


async def test_resume_through_an_unregistered_flow(make_engine: MakeEngine):
    """Resuming under a flow name nobody registered is UnknownFlow."""
    engine = await make_engine(validated_app())
    paused = await engine.invoke("approval", body(amount=1.0, requester="ann"))

    with pytest.raises(UnknownFlow):
        await engine.resume("nope", paused.execution_id, b"{}")


async def test_resume_of_a_completed_execution_is_refused(make_engine: MakeEngine):
    """A completed execution refuses a resume with Finished, its status and version."""
    engine = await make_engine(validated_app())
    paused = await engine.invoke("approval", body(amount=1.0, requester="ann"))
    done = await engine.resume("approval", paused.execution_id, body(approved=True, comment=""))
    before = await engine.store.read_all()

    with pytest.raises(Finished) as info:
        await engine.resume("approval", paused.execution_id, body(approved=False, comment=""))

    assert info.value.status == 409 and info.value.execution_id == paused.execution_id
    assert info.value.details == {"status": "completed", "version": done.version}
    assert (info.value.execution_status, info.value.version) == ("completed", 4)
    assert await engine.store.read_all() == before


async def test_resume_of_a_failed_execution_is_refused(make_engine: MakeEngine):
    """A failed execution refuses a resume with Finished and status failed."""
    app = App()

    @app.flow("broken")
    async def broken(ctx: Context) -> None:
        raise ValueError("bad")

    engine = await make_engine(app)
    state = await engine.invoke("broken", b"")

    with pytest.raises(Finished) as info:
        await engine.resume("broken", state.execution_id, b"{}")

    assert info.value.details == {"status": "failed", "version": 2}
    assert len(await engine.store.read_all()) == 2


async def test_resume_of_a_running_execution_is_not_paused(make_engine: MakeEngine):
    """An execution with no pending pause refuses a resume with NotPaused."""
    engine = await make_engine(validated_app())
    await engine.store.append("e1", 0, [at_version("e1", 1, approval_started())])

    with pytest.raises(NotPaused) as info:
        await engine.resume("approval", "e1", body(approved=True, comment=""))

    assert info.value.details == {"status": "running", "version": 1}
    assert len(await engine.store.read_all()) == 1


async def test_concurrent_resumes_let_exactly_one_win(make_engine: MakeEngine):
    """Two resumes of one pause at once: one answers it, the other is AlreadyResumed."""
    engine = await make_engine(two_pause_app())
    paused = await engine.invoke("purchase", body(item="desk"))
    resume = engine.resume("purchase", paused.execution_id, body(ok=True), pause=1)
    again = engine.resume("purchase", paused.execution_id, body(ok=False), pause=1)

    outcomes = await asyncio.gather(resume, again, return_exceptions=True)

    losers = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(losers) == 1 and isinstance(losers[0], AlreadyResumed)
    history = await engine.history(paused.execution_id)
    assert types(history).count("ExecutionResumed") == 1
    assert types(history)[-1] == "ExecutionPaused"


async def test_resume_naming_a_later_pause_is_not_paused(make_engine: MakeEngine):
    """A resume naming a pause the execution has not reached is refused, nothing appended."""
    engine = await make_engine(two_pause_app())
    paused = await engine.invoke("purchase", body(item="desk"))

    with pytest.raises(NotPaused):
        await engine.resume("purchase", paused.execution_id, body(ok=True), pause=2)

    assert len(await engine.history(paused.execution_id)) == 2


# Recovery: executions a crash left between settle points are driven on.


def approval_started(key: str | None = None) -> ExecutionStarted:
    """The start of an execution of ``validated_app``'s approval flow."""
    return ExecutionStarted("approval", {"amount": 3.0, "requester": "zoe", "note": "n"}, 1, key)


def at_version(execution_id: str, version: int, event: Any) -> StoredEvent:
    """An event for a hand-written history."""
    return StoredEvent(execution_id, version, T0 + timedelta(minutes=version), event)


async def test_recover_drives_on_an_execution_resumed_before_a_crash(make_engine: MakeEngine):
    """A log ending in ExecutionResumed is run on by recover() to completion."""
    engine = await make_engine(validated_app())
    pause = ExecutionPaused(1, "pause", {}, {"approved": "bool", "comment": "str"}, {})
    answer = ExecutionResumed(1, {"approved": False, "comment": "too much"})
    events = [approval_started(), pause, answer]
    await engine.store.append("e1", 0, [at_version("e1", v, e) for v, e in enumerate(events, 1)])

    recovered = await engine.recover()

    assert recovered == 1
    state = await engine.get("e1")
    assert state.status is Status.COMPLETED
    assert state.result == {"approved": False, "comment": "too much", "note": "n"}
    assert await engine.store.unsettled() == []


async def test_recover_replays_recorded_steps_without_running_them(make_engine: MakeEngine):
    """A log ending in a StepCompleted is run on to the pause; the step is not run again."""
    calls: list[str] = []
    engine = await make_engine(ordering_app(calls))
    started = ExecutionStarted("order", {"item": "cup"})
    step = StepCompleted(1, "reserve", {"reservation": "from-the-log"})
    await engine.store.append("e1", 0, [at_version("e1", 1, started), at_version("e1", 2, step)])

    assert await engine.recover() == 1

    state = await engine.get("e1")
    assert calls == []
    assert state.status is Status.PAUSED and state.pause is not None
    assert state.pause.inputs == {"reservation": "from-the-log"}


async def test_recover_runs_a_bare_start_to_its_first_pause(make_engine: MakeEngine):
    """A log holding only ExecutionStarted is run to its first settle point."""
    engine = await make_engine(validated_app())
    await engine.store.append("e1", 0, [at_version("e1", 1, approval_started())])

    assert await engine.recover() == 1

    assert types(await engine.history("e1")) == ["ExecutionStarted", "ExecutionPaused"]


async def test_recover_leaves_settled_executions_alone(make_engine: MakeEngine):
    """Paused and finished executions are not touched by recover()."""
    engine = await make_engine(validated_app())
    await engine.invoke("approval", body(amount=1.0, requester="ann"))
    await engine.invoke("ping", b"")
    before = await engine.store.read_all()

    assert await engine.recover() == 0

    assert await engine.store.read_all() == before


async def test_recover_skips_a_nondeterministic_execution_but_drives_the_others(
    make_engine: MakeEngine,
):
    """One execution whose code changed is reported, left as is, and blocks no other."""
    engine = await make_engine(validated_app())
    wrong = StepCompleted(1, "vanished", None)
    await engine.store.append("bad", 0, [at_version("bad", 1, approval_started())])
    await engine.store.append("bad", 1, [at_version("bad", 2, wrong)])
    await engine.store.append("good", 0, [at_version("good", 1, approval_started())])

    assert await engine.recover() == 1

    assert types(await engine.history("bad")) == ["ExecutionStarted", "StepCompleted"]
    assert (await engine.get("good")).status is Status.PAUSED


# Idempotency keys: a repeated command gets the first answer, also after a restart.


async def test_repeated_invoke_key_returns_the_first_execution(make_engine: MakeEngine):
    """The same invoke key twice gives the same execution and state; one is logged."""
    engine = await make_engine(validated_app())
    first = await engine.invoke("approval", body(amount=1.0, requester="ann"), "key-1")

    again = await engine.invoke("approval", body(amount=9.0, requester="bob"), "key-1")

    assert again == first
    assert types(await engine.store.read_all()).count("ExecutionStarted") == 1


async def test_repeated_invoke_key_after_restart_returns_the_first_state(
    make_engine: MakeEngine,
):
    """After the execution moved on and the engine restarted, a repeat gets the first reply."""
    engine = await make_engine(validated_app())
    first = await engine.invoke("approval", body(amount=1.0, requester="ann"), "key-1")
    await engine.resume("approval", first.execution_id, body(approved=True, comment="ok"))

    restarted = await make_engine(validated_app())
    again = await restarted.invoke("approval", body(amount=1.0, requester="ann"), "key-1")

    assert again == first and again.status is Status.PAUSED
    assert types(await restarted.store.read_all()).count("ExecutionStarted") == 1


async def test_concurrent_invokes_with_one_key_start_one_execution(make_engine: MakeEngine):
    """Invokes racing with the same key all get the one execution that won."""
    engine = await make_engine(validated_app())
    raw = body(amount=1.0, requester="ann")

    states = await asyncio.gather(*(engine.invoke("approval", raw, "race") for _ in range(5)))

    assert len({s.execution_id for s in states}) == 1
    assert all(s == states[0] for s in states)
    assert types(await engine.store.read_all()) == ["ExecutionStarted", "ExecutionPaused"]


async def test_invoke_keys_of_different_flows_do_not_collide(make_engine: MakeEngine):
    """The same key on two flows starts two executions."""
    engine = await make_engine(validated_app())

    one = await engine.invoke("approval", body(amount=1.0, requester="ann"), "shared")
    two = await engine.invoke("ping", b"", "shared")

    assert one.execution_id != two.execution_id
    assert (one.flow, two.flow) == ("approval", "ping")


async def test_repeated_resume_key_returns_the_first_answer(make_engine: MakeEngine):
    """The same resume key twice answers the pause once and returns the same state."""
    engine = await make_engine(two_pause_app())
    paused = await engine.invoke("purchase", body(item="desk"))
    first = await engine.resume("purchase", paused.execution_id, body(ok=True), "r-1")

    again = await engine.resume("purchase", paused.execution_id, body(ok=False), "r-1")

    assert again == first
    assert first.pause is not None and first.pause.name == "finance"
    assert types(await engine.history(paused.execution_id)).count("ExecutionResumed") == 1


async def test_repeated_resume_key_after_restart_returns_the_first_answer(
    make_engine: MakeEngine,
):
    """After a restart and a later resume, a repeated key still gets its first reply."""
    engine = await make_engine(two_pause_app())
    paused = await engine.invoke("purchase", body(item="desk"))
    first = await engine.resume("purchase", paused.execution_id, body(ok=True), "r-1")
    await engine.resume("purchase", paused.execution_id, body(ok=True), "r-2")

    restarted = await make_engine(two_pause_app())
    again = await restarted.resume("purchase", paused.execution_id, body(ok=True), "r-1")

    assert again == first and again.status is Status.PAUSED
    assert types(await restarted.history(paused.execution_id)).count("ExecutionResumed") == 2


async def test_concurrent_invokes_with_one_key_run_the_step_once(make_engine: MakeEngine):
    """Racing invokes with one key run the first step once: losers stop before side effects."""
    calls: list[str] = []
    engine = await make_engine(ordering_app(calls))

    states = await asyncio.gather(
        *(engine.invoke("order", body(item="vase"), "race") for _ in range(5))
    )

    assert calls == ["vase"]
    assert len({s.execution_id for s in states}) == 1
    assert types(await engine.store.read_all()).count("StepCompleted") == 1


async def test_repeated_resume_key_drives_on_a_resume_a_crash_cut_short(
    make_engine: MakeEngine,
):
    """A resume logged before a crash, then repeated with its key, runs on and answers."""
    engine = await make_engine(validated_app())
    pause = ExecutionPaused(1, "pause", {}, {"approved": "bool", "comment": "str"}, {})
    answer = ExecutionResumed(1, {"approved": True, "comment": "yes"}, "r-1")
    events = [approval_started(), pause, answer]
    await engine.store.append("e1", 0, [at_version("e1", v, e) for v, e in enumerate(events, 1)])

    state = await engine.resume("approval", "e1", body(approved=True, comment="yes"), "r-1")

    assert state.status is Status.COMPLETED
    assert state.result == {"approved": True, "comment": "yes", "note": "n"}
    assert types(await engine.history("e1")).count("ExecutionResumed") == 1


async def test_get_returns_the_state_at_a_version(make_engine: MakeEngine):
    """get(at_version=n) folds the first n events only."""
    engine = await make_engine(two_pause_app())
    paused = await engine.invoke("purchase", body(item="desk"))
    await engine.resume("purchase", paused.execution_id, body(ok=True))

    assert await engine.get(paused.execution_id, at_version=2) == paused
    assert (await engine.get(paused.execution_id)).version == 4


async def test_resumes_from_two_engines_on_one_file_let_exactly_one_win(tmp_path: Path):
    """Two engines (as two processes) resuming one pause: the log's version check decides."""
    stores = [SqliteStore(tmp_path / "shared.db") for _ in range(2)]
    for store in stores:
        await store.open()
    try:
        one, two = (Engine(two_pause_app(), store, clock=Ticker()) for store in stores)
        paused = await one.invoke("purchase", body(item="desk"))

        outcomes = await asyncio.gather(
            one.resume("purchase", paused.execution_id, body(ok=True)),
            two.resume("purchase", paused.execution_id, body(ok=False)),
            return_exceptions=True,
        )

        losers = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(losers) == 1 and isinstance(losers[0], AlreadyResumed)
        history = await one.history(paused.execution_id)
        assert types(history).count("ExecutionResumed") == 1
    finally:
        for store in stores:
            await store.close()


# Changed flow code met during recovery or a repeated command.


def changed_inputs_app() -> App:
    """validated_app's approval flow after a required parameter was added."""
    app = App()

    @app.flow("approval")
    async def approval(ctx: Context, amount: float, requester: str, team: str) -> dict:
        await ctx.pause(outputs={"approved": bool, "comment": str})
        return {}

    return app


def changed_outputs_app() -> App:
    """validated_app's approval flow after its pause gained a required output."""
    app = App()

    @app.flow("approval")
    async def approval(ctx: Context, amount: float, requester: str, note: str = "") -> dict:
        await ctx.pause(outputs={"approved": bool, "comment": str, "cost_center": str})
        return {}

    return app


async def test_recover_does_not_count_an_execution_whose_inputs_no_longer_fit(
    make_engine: MakeEngine,
):
    """Recorded inputs that the changed flow signature refuses leave the execution unrecovered.

    recover() must not report it as driven on while it is still running.
    """
    engine = await make_engine(changed_inputs_app())
    await engine.store.append("e1", 0, [at_version("e1", 1, approval_started())])

    recovered = await engine.recover()

    assert (await engine.get("e1")).status is Status.RUNNING
    assert recovered == 0


async def test_recover_does_not_fail_an_execution_whose_answer_no_longer_fits(
    make_engine: MakeEngine,
):
    """A recorded answer the changed pause refuses is a code change, not a flow failure.

    The log must stay as it is, so that restoring the old code can finish the execution.
    """
    engine = await make_engine(changed_outputs_app())
    pause = ExecutionPaused(1, "pause", {}, {"approved": "bool", "comment": "str"}, {})
    answer = ExecutionResumed(1, {"approved": True, "comment": "ok"})
    events = [approval_started(), pause, answer]
    await engine.store.append("e1", 0, [at_version("e1", v, e) for v, e in enumerate(events, 1)])

    await engine.recover()

    assert types(await engine.history("e1")) == [
        "ExecutionStarted",
        "ExecutionPaused",
        "ExecutionResumed",
    ]


class LookupLimit(dict):
    """A flow registry that stops an engine looking a flow up more than ``limit`` times.

    It turns a command that re-drives an execution without end into a prompt, readable
    failure instead of a RecursionError deep in asyncio.
    """

    def __init__(self, flows: dict, limit: int) -> None:
        super().__init__(flows)
        self.limit = limit
        self.lookups = 0

    def get(self, *args: Any) -> Any:
        self.lookups += 1
        if self.lookups > self.limit:
            raise RuntimeError(f"the engine looked the flow up {self.lookups} times")
        return super().get(*args)


async def test_repeated_invoke_key_of_an_execution_that_cannot_run_raises_an_evflow_error(
    make_engine: MakeEngine,
):
    """A repeat of an invoke whose execution cannot be driven on reports it at once.

    It must not drive the execution on again and again (unbounded, it ends in RecursionError).
    """
    app = changed_inputs_app()
    app.flows = LookupLimit(app.flows, limit=5)
    engine = await make_engine(app)
    await engine.store.append("e1", 0, [at_version("e1", 1, approval_started("k"))])
    raw = body(amount=3.0, requester="zoe", team="ops")

    with pytest.raises(Exception) as info:
        await engine.invoke("approval", raw, "k")

    assert isinstance(info.value, EvflowError), repr(info.value)
    assert types(await engine.history("e1")) == ["ExecutionStarted"]


async def test_repeated_resume_key_under_another_flow_is_unknown_execution(
    make_engine: MakeEngine,
):
    """A resume key does not make an execution answer under a flow it does not belong to."""
    engine = await make_engine(validated_app())
    paused = await engine.invoke("approval", body(amount=1.0, requester="ann"))
    await engine.resume("approval", paused.execution_id, body(approved=True, comment=""), "r")

    with pytest.raises(UnknownExecution):
        await engine.resume("ping", paused.execution_id, b"{}", "r")


def test_execution_ids_are_uuid7_in_the_order_they_were_made():
    """Time-ordered IDs keep the appends of new executions on the log index's last pages."""
    ids = []
    for _ in range(3):
        ids.append(new_execution_id())
        time.sleep(0.002)

    assert ids == sorted(ids) and len(set(ids)) == 3
    assert all(len(i) == 32 and uuid.UUID(i).version == 7 for i in ids)
    assert all(uuid.UUID(i).variant == uuid.RFC_4122 for i in ids)
