"""Hot executions: a resume answers the flow waiting in memory, and nothing depends on it.

A hot resume must read and replay nothing; a full cache lets its least recently used
execution go; and whatever changed an execution behind the cache's back (a cancel, an
expiry, another engine on the same log) is what the resume sees, with no step run twice.
"""

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from evflow import (
    AlreadyResumed,
    App,
    Context,
    Engine,
    Expired,
    Finished,
    InvalidInput,
    NotPaused,
    Status,
)
from evflow.events import StoredEvent
from evflow.store.sqlite import SqliteStore
from evflow.timers import ManualClock

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


class CountingStore(SqliteStore):
    """The real SQLite store, counting the histories read from it."""

    reads = 0

    async def read(self, execution_id: str, to_version: int | None = None) -> list[StoredEvent]:
        self.reads += 1
        return await super().read(execution_id, to_version)


def body(**values: Any) -> bytes:
    return json.dumps(values).encode()


def types(history: list[StoredEvent]) -> list[str]:
    return [type(stored.event).__name__ for stored in history]


def counting_app(runs: list[str]) -> App:
    """Two pauses with a step after each; ``runs`` logs each pass through the code."""
    app = App()

    @app.flow("purchase")
    async def purchase(ctx: Context, item: str) -> dict:
        runs.append("start")
        manager = await ctx.pause(name="manager", inputs={"item": item}, outputs={"ok": bool})
        await ctx.step("notify", runs.append, "notified")
        finance = await ctx.pause(name="finance", outputs={"ok": bool}, timeout=timedelta(hours=1))
        await ctx.step("charge", runs.append, "charged")
        return {"manager": manager["ok"], "finance": finance["ok"]}

    return app


Open = Callable[..., Any]


@pytest.fixture
async def engines(tmp_path: Path) -> AsyncIterator[Open]:
    """Opens engines on one SQLite file, as separate processes on one log would be."""
    opened: list[tuple[Engine, SqliteStore]] = []

    async def open_engine(app: App, clock: Any = None, hot: int = 16) -> Engine:
        store = CountingStore(tmp_path / "evflow.db")
        await store.open()
        engine = Engine(app, store, clock=clock or ManualClock(T0), hot_executions=hot)
        opened.append((engine, store))
        return engine

    yield open_engine
    for engine, store in opened:
        await engine.stop()
        await store.close()


async def test_a_hot_resume_reads_and_replays_nothing(engines: Open):
    runs: list[str] = []
    engine = await engines(counting_app(runs))
    paused = await engine.invoke("purchase", body(item="desk"))
    store = engine.store
    assert isinstance(store, CountingStore)
    reads = store.reads

    second = await engine.resume("purchase", paused.execution_id, body(ok=True))
    done = await engine.resume("purchase", paused.execution_id, body(ok=False))

    assert store.reads == reads
    assert runs == ["start", "notified", "charged"]
    assert (second.status, second.pause and second.pause.name) == (Status.PAUSED, "finance")
    assert done.result == {"manager": True, "finance": False}
    history = await engine.history(paused.execution_id)
    assert done == await engine.get(paused.execution_id)
    assert [stored.version for stored in history] == list(range(1, 9))


async def test_a_full_cache_lets_the_least_recent_go_and_it_resumes_from_the_log(
    engines: Open,
):
    runs: list[str] = []
    engine = await engines(counting_app(runs), hot=2)
    first, second, third = [
        await engine.invoke("purchase", body(item=item)) for item in ("a", "b", "c")
    ]
    runs.clear()

    for paused in (third, second, first):
        state = await engine.resume("purchase", paused.execution_id, body(ok=True))
        assert state.pause is not None and state.pause.name == "finance"

    assert runs == ["notified", "notified", "start", "notified"]  # only the first replayed
    assert len(engine._driver.hot) == 2


async def test_a_bad_resume_body_keeps_the_execution_hot(engines: Open):
    runs: list[str] = []
    engine = await engines(counting_app(runs))
    paused = await engine.invoke("purchase", body(item="desk"))

    with pytest.raises(InvalidInput, match="ok"):
        await engine.resume("purchase", paused.execution_id, body(ok="yes"))
    state = await engine.resume("purchase", paused.execution_id, body(ok=True))

    assert runs == ["start", "notified"]
    assert state.pause is not None and state.pause.name == "finance"


async def test_a_cancel_leaves_no_hot_execution_to_resume(engines: Open):
    runs: list[str] = []
    engine = await engines(counting_app(runs))
    paused = await engine.invoke("purchase", body(item="desk"))

    await engine.cancel("purchase", paused.execution_id)

    with pytest.raises(Finished):
        await engine.resume("purchase", paused.execution_id, body(ok=True))
    assert runs == ["start"]
    assert len(engine._driver.hot) == 0


async def test_a_hot_pause_past_its_deadline_is_expired_not_answered(engines: Open):
    runs: list[str] = []
    clock = ManualClock(T0)
    engine = await engines(counting_app(runs), clock)
    paused = await engine.invoke("purchase", body(item="desk"))
    await engine.resume("purchase", paused.execution_id, body(ok=True))

    clock.advance(timedelta(hours=2))  # the scheduler is not started: no firing yet

    with pytest.raises(Expired):
        await engine.resume("purchase", paused.execution_id, body(ok=True))
    history = await engine.history(paused.execution_id)
    assert types(history)[-2:] == ["PauseExpired", "ExecutionFailed"]
    assert runs.count("notified") == 1 and "charged" not in runs


async def test_a_hot_execution_another_engine_answered_is_judged_from_the_log(
    engines: Open,
):
    """Engine one keeps the execution hot at its first pause; engine two answers that pause
    on the same log. One's resume then answers the pause the execution waits at now."""
    runs: list[str] = []
    one = await engines(counting_app(runs))
    two = await engines(counting_app(runs))
    paused = await one.invoke("purchase", body(item="desk"))
    await two.resume("purchase", paused.execution_id, body(ok=True))

    done = await one.resume("purchase", paused.execution_id, body(ok=False))

    assert done.result == {"manager": True, "finance": False}
    history = await one.history(paused.execution_id)
    assert types(history).count("StepCompleted") == 2
    assert runs.count("notified") == 1 and runs.count("charged") == 1


async def test_a_stale_hot_execution_runs_no_step_twice(engines: Open):
    """Engine two took the execution past the pause and its step; engine one's stale copy
    is answered for that same pause, and the log's version check refuses it before the
    step can run again."""
    runs: list[str] = []
    one = await engines(counting_app(runs))
    two = await engines(counting_app(runs))
    paused = await one.invoke("purchase", body(item="desk"))
    await two.resume("purchase", paused.execution_id, body(ok=True), pause=1)

    with pytest.raises(AlreadyResumed):
        await one.resume("purchase", paused.execution_id, body(ok=True), pause=1)

    assert runs.count("notified") == 1
    history = await one.history(paused.execution_id)
    assert types(history).count("ExecutionResumed") == 1


async def test_concurrent_resumes_of_one_hot_execution_answer_it_once(engines: Open):
    runs: list[str] = []
    engine = await engines(counting_app(runs))
    paused = await engine.invoke("purchase", body(item="desk"))

    outcomes = await asyncio.gather(
        *(engine.resume("purchase", paused.execution_id, body(ok=True)) for _ in range(5)),
        return_exceptions=True,
    )

    answered = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(answered) == 1
    assert all(isinstance(o, AlreadyResumed | NotPaused) for o in refused), refused
    assert runs.count("notified") == 1


async def test_stopping_the_engine_lets_every_hot_flow_go(engines: Open):
    runs: list[str] = []
    engine = await engines(counting_app(runs))
    for item in "abc":
        await engine.invoke("purchase", body(item=item))
    flows = {t for t in asyncio.all_tasks() if "Runner._main" in repr(t.get_coro())}
    assert len(flows) == 3

    await engine.stop()
    await asyncio.sleep(0)

    assert all(task.done() for task in flows)
    assert len(engine._driver.hot) == 0


def restless_app(runs: list[str]) -> App:
    """Flow code that would go on while it waits at a pause: its own timer ends the wait,
    or a branch beside the pause issues a step."""
    app = App()

    @app.flow("bounded")
    async def bounded(ctx: Context) -> str:
        try:
            async with asyncio.timeout(0.1):
                await ctx.pause(name="approve", outputs={"ok": bool})
        except TimeoutError:
            await ctx.step("fallback", runs.append, "fallback")
            return "timed out"
        return "answered"

    @app.flow("beside")
    async def beside(ctx: Context) -> str:
        async def later() -> None:
            await asyncio.sleep(0.1)
            await ctx.step("later", runs.append, "later")

        await asyncio.gather(ctx.pause(name="approve", outputs={"ok": bool}), later())
        return "both"

    return app


@pytest.mark.parametrize("flow, result", [("bounded", "answered"), ("beside", "both")])
async def test_a_hot_flow_does_nothing_until_a_command_comes(engines: Open, flow: str, result: str):
    """A hot flow's code stays where it waits: what it would do there by itself (its own
    timer firing, a branch beside the pause) is stopped before any side effect, nothing is
    appended, and the next resume replays it from the log."""
    runs: list[str] = []
    engine = await engines(restless_app(runs))
    paused = await engine.invoke(flow, b"{}")
    before = await engine.history(paused.execution_id)

    await asyncio.sleep(0.4)

    assert runs == []
    assert await engine.history(paused.execution_id) == before
    done = await engine.resume(flow, paused.execution_id, body(ok=True))
    assert (done.status, done.result) == (Status.COMPLETED, result)
    assert runs == (["later"] if flow == "beside" else [])


async def test_a_command_that_settles_after_the_engine_stopped_keeps_nothing_hot(engines: Open):
    """A command still in flight when the engine stops lets its flow go when it settles:
    no flow is left waiting in memory with nobody to let it go."""
    runs: list[str] = []
    engine = await engines(counting_app(runs))
    await engine.stop()

    await engine.invoke("purchase", body(item="late"))
    await asyncio.sleep(0)

    flows = [t for t in asyncio.all_tasks() if "Runner._main" in repr(t.get_coro())]
    assert all(task.done() for task in flows)
    assert len(engine._driver.hot) == 0
