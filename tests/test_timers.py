"""Time: durable waits, pause deadlines, cancellation, and the one scheduler that fires them.

The engine runs on a real SQLite log with a ``ManualClock``, so waits of hours take
milliseconds: a test moves the clock and watches the scheduler fire. A new engine on the
same file stands for a restart.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from evflow import (
    App,
    Context,
    Engine,
    Expired,
    Finished,
    NotPaused,
    PauseTimedOut,
    Status,
    UnknownExecution,
)
from evflow.events import (
    ExecutionCancelled,
    ExecutionPaused,
    PauseExpired,
    StoredEvent,
    TimerFired,
    TimerStarted,
)
from evflow.state import ExecutionState
from evflow.store.sqlite import SqliteStore
from evflow.timers import ManualClock, Timer

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
NEW_YORK = ZoneInfo("America/New_York")

MakeEngine = Callable[[App], Awaitable[Engine]]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
async def make_engine(tmp_path: Path, clock: ManualClock) -> AsyncIterator[MakeEngine]:
    """Starts an Engine (timers included) for an App on the test's SQLite file; a new one
    stops the previous one first, as a restart does."""
    running: list[tuple[Engine, SqliteStore]] = []

    async def make(app: App) -> Engine:
        for engine, store in running:
            await engine.stop()
            await store.close()
        running.clear()
        store = SqliteStore(tmp_path / "evflow.db")
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


async def until(engine: Engine, execution_id: str, *statuses: Status) -> ExecutionState:
    """The execution's state once it reaches one of ``statuses`` (the scheduler runs in the
    background); fails after 30 seconds."""
    deadline = time.monotonic() + 30
    while True:
        state = await engine.get(execution_id)
        if state.status in statuses:
            return state
        assert time.monotonic() < deadline, f"still {state.status.value}: {state}"
        await asyncio.sleep(0.01)


def types(history: list[StoredEvent]) -> list[str]:
    return [type(stored.event).__name__ for stored in history]


def body(**values: Any) -> bytes:
    import msgspec

    return msgspec.json.encode(values)


def sleeper_app() -> App:
    """A flow that waits for a number of hours, then says when it woke."""
    app = App()

    @app.flow("sleeper")
    async def sleeper(ctx: Context, hours: float) -> dict:
        before = ctx.now()
        await ctx.wait_for(timedelta(hours=hours))
        return {"slept_from": before.isoformat(), "woke": ctx.now().isoformat()}

    return app


def alarm_app(instant: Callable[[], datetime]) -> App:
    """A flow that waits until the instant ``instant()`` gives."""
    app = App()

    @app.flow("alarm")
    async def alarm(ctx: Context) -> dict:
        await ctx.wait_until(instant())
        return {"woke": ctx.now().isoformat()}

    return app


def offer_app() -> App:
    """Pauses that expire: one raising PauseTimedOut, one with a default, one uncaught."""
    app = App()

    @app.flow("offer")
    async def offer(ctx: Context, hours: float = 1) -> dict:
        try:
            answer = await ctx.pause(
                name="offer", outputs={"accepted": bool}, timeout=timedelta(hours=hours)
            )
        except PauseTimedOut as timed_out:
            return {"accepted": None, "why": timed_out.message}
        return {"accepted": answer["accepted"]}

    @app.flow("silence")
    async def silence(ctx: Context) -> dict:
        answer = await ctx.pause(
            outputs={"accepted": bool, "note": str},
            deadline=datetime(2026, 3, 1, 9, 0, tzinfo=UTC),
            default={"accepted": False, "note": "no answer"},
        )
        return answer

    @app.flow("strict")
    async def strict(ctx: Context) -> dict:
        return await ctx.pause(outputs={"ok": bool}, timeout=timedelta(minutes=5))

    return app


# Waits.


async def test_wait_for_settles_waiting_until_the_clock_reaches_wake_at(
    make_engine: MakeEngine, clock: ManualClock
) -> None:
    engine = await make_engine(sleeper_app())

    waiting = await engine.invoke("sleeper", body(hours=3))
    clock.advance(timedelta(hours=2, minutes=59))
    await asyncio.sleep(0.05)
    still = await engine.get(waiting.execution_id)
    clock.advance(timedelta(minutes=1))
    done = await until(engine, waiting.execution_id, Status.COMPLETED)

    assert waiting.status is Status.WAITING
    assert waiting.wake_at == T0 + timedelta(hours=3)
    assert still.status is Status.WAITING and still.version == waiting.version
    history = await engine.history(waiting.execution_id)
    assert types(history) == [
        "ExecutionStarted",
        "TimerStarted",
        "TimerFired",
        "ExecutionCompleted",
    ]
    assert history[1].event == TimerStarted(1, T0 + timedelta(hours=3))
    assert done.result == {
        "slept_from": T0.isoformat(),
        "woke": (T0 + timedelta(hours=3)).isoformat(),
    }


async def test_a_resume_of_a_waiting_execution_is_not_paused(make_engine: MakeEngine) -> None:
    engine = await make_engine(sleeper_app())
    waiting = await engine.invoke("sleeper", body(hours=1))

    with pytest.raises(NotPaused) as refused:
        await engine.resume("sleeper", waiting.execution_id, b"{}")

    assert refused.value.details == {"status": "waiting", "version": 2}
    assert len(await engine.history(waiting.execution_id)) == 2


async def test_wait_until_an_aware_instant_stores_it_in_utc(
    make_engine: MakeEngine, clock: ManualClock
) -> None:
    kolkata = datetime(2026, 3, 1, 18, 0, tzinfo=ZoneInfo("Asia/Kolkata"))  # 12:30 UTC
    engine = await make_engine(alarm_app(lambda: kolkata))

    waiting = await engine.invoke("alarm", b"")
    clock.set(datetime(2026, 3, 1, 12, 30, tzinfo=UTC))
    done = await until(engine, waiting.execution_id, Status.COMPLETED)

    assert waiting.wake_at == datetime(2026, 3, 1, 12, 30, tzinfo=UTC)
    assert waiting.wake_at.tzinfo is UTC
    assert done.result == {"woke": "2026-03-01T12:30:00+00:00"}


@pytest.mark.parametrize(
    ("local", "utc"),
    [
        # New York falls back on 2026-11-01: 01:30 happens twice, told apart by fold.
        (datetime(2026, 11, 1, 1, 30, tzinfo=NEW_YORK), datetime(2026, 11, 1, 5, 30, tzinfo=UTC)),
        (
            datetime(2026, 11, 1, 1, 30, fold=1, tzinfo=NEW_YORK),
            datetime(2026, 11, 1, 6, 30, tzinfo=UTC),
        ),
        # It springs forward on 2026-03-08: 02:30 never happens; fold=0 reads it with the
        # offset in force before the gap, as Python does.
        (datetime(2026, 3, 8, 2, 30, tzinfo=NEW_YORK), datetime(2026, 3, 8, 7, 30, tzinfo=UTC)),
        (datetime(2026, 3, 8, 3, 0, tzinfo=NEW_YORK), datetime(2026, 3, 8, 7, 0, tzinfo=UTC)),
        (
            datetime(2026, 6, 1, 12, 0, tzinfo=ZoneInfo("Australia/Lord_Howe")),
            datetime(2026, 6, 1, 1, 30, tzinfo=UTC),
        ),  # fmt: skip
    ],
)
async def test_wait_until_across_dst_edges_wakes_at_the_utc_instant(
    make_engine: MakeEngine, clock: ManualClock, local: datetime, utc: datetime
) -> None:
    engine = await make_engine(alarm_app(lambda: local))

    waiting = await engine.invoke("alarm", b"")
    clock.set(utc - timedelta(seconds=1))
    await asyncio.sleep(0.05)
    early = await engine.get(waiting.execution_id)
    clock.set(utc)
    await until(engine, waiting.execution_id, Status.COMPLETED)

    assert waiting.wake_at == utc
    assert early.status is Status.WAITING


async def test_wait_for_a_day_across_a_dst_change_is_24_real_hours(
    make_engine: MakeEngine, clock: ManualClock
) -> None:
    """A delay is elapsed time, not wall-clock time: 24 h over a 23-hour day ends at 01:00."""
    clock.set(datetime(2026, 3, 7, 12, 0, tzinfo=NEW_YORK))
    engine = await make_engine(sleeper_app())

    waiting = await engine.invoke("sleeper", body(hours=24))

    assert waiting.wake_at is not None
    assert waiting.wake_at.astimezone(NEW_YORK) == datetime(2026, 3, 8, 13, 0, tzinfo=NEW_YORK)


async def test_wait_until_a_naive_datetime_fails_the_execution_saying_why(
    make_engine: MakeEngine,
) -> None:
    engine = await make_engine(alarm_app(lambda: datetime(2026, 3, 2, 9, 0)))

    failed = await engine.invoke("alarm", b"")

    assert failed.status is Status.FAILED
    assert failed.error is not None and failed.error.type == "ValueError"
    assert failed.execution_id in failed.error.message
    assert "naive datetime (2026-03-02T09:00:00)" in failed.error.message
    assert "tzinfo=ZoneInfo" in failed.error.message
    assert types(await engine.history(failed.execution_id)) == [
        "ExecutionStarted",
        "ExecutionFailed",
    ]


async def test_wait_until_a_past_instant_fires_at_once(make_engine: MakeEngine) -> None:
    engine = await make_engine(alarm_app(lambda: T0 - timedelta(days=1)))

    done = await engine.invoke("alarm", b"")

    assert done.status is Status.COMPLETED
    history = await engine.history(done.execution_id)
    assert types(history) == [
        "ExecutionStarted",
        "TimerStarted",
        "TimerFired",
        "ExecutionCompleted",
    ]
    assert history[1].at == history[2].at == T0


async def test_wait_for_zero_returns_at_once_and_a_negative_delay_fails(
    make_engine: MakeEngine,
) -> None:
    engine = await make_engine(sleeper_app())

    zero = await engine.invoke("sleeper", body(hours=0))
    negative = await engine.invoke("sleeper", body(hours=-1))

    assert zero.status is Status.COMPLETED
    assert negative.status is Status.FAILED and negative.error is not None
    assert negative.error.type == "ValueError"
    assert "negative (-3600 s)" in negative.error.message


# Restarts.


async def test_a_restart_while_waiting_fires_the_timer_when_due(
    make_engine: MakeEngine, clock: ManualClock
) -> None:
    waiting = await (await make_engine(sleeper_app())).invoke("sleeper", body(hours=1))

    engine = await make_engine(sleeper_app())
    pending = len(engine.timers)
    clock.advance(timedelta(hours=1))
    done = await until(engine, waiting.execution_id, Status.COMPLETED)

    assert pending == 1
    assert done.version == 4


async def test_timers_overdue_at_start_fire_at_once_earliest_first(
    make_engine: MakeEngine, clock: ManualClock
) -> None:
    first = await make_engine(sleeper_app())
    hours = [5, 1, 4, 2, 3]
    ids = [(await first.invoke("sleeper", body(hours=h))).execution_id for h in hours]
    await first.stop()  # no firing before the restart
    clock.advance(timedelta(hours=6))

    engine = await make_engine(sleeper_app())
    for execution_id in ids:
        await until(engine, execution_id, Status.COMPLETED)

    fired = [
        stored for stored in await engine.store.read_all() if isinstance(stored.event, TimerFired)
    ]
    by_hours = dict(zip(ids, hours, strict=True))
    assert [by_hours[stored.execution_id] for stored in fired] == [1, 2, 3, 4, 5]
    assert all(stored.at == T0 + timedelta(hours=6) for stored in fired)


async def test_a_firing_recorded_before_a_crash_is_driven_on_at_restart(
    make_engine: MakeEngine, clock: ManualClock, tmp_path: Path
) -> None:
    """The crash fell between appending TimerFired and running the flow on from it."""
    engine = await make_engine(sleeper_app())
    waiting = await engine.invoke("sleeper", body(hours=1))
    await engine.stop()
    clock.advance(timedelta(hours=1))
    fired = StoredEvent(waiting.execution_id, 3, clock.now(), TimerFired(1))
    await engine.store.append(waiting.execution_id, 2, [fired])

    engine = await make_engine(sleeper_app())
    done = await until(engine, waiting.execution_id, Status.COMPLETED)

    assert types(await engine.history(done.execution_id)).count("TimerFired") == 1


async def test_a_timer_fired_twice_is_recorded_once(
    make_engine: MakeEngine, clock: ManualClock
) -> None:
    """Two firings of one timer (a second engine, a retry) race; the version check keeps one."""
    engine = await make_engine(sleeper_app())
    waiting = await engine.invoke("sleeper", body(hours=1))
    await engine.stop()
    clock.advance(timedelta(hours=1))
    timer = Timer(clock.now(), waiting.execution_id, "sleeper", 2, 1, "wait")

    await asyncio.gather(*(engine.fire(timer) for _ in range(5)))

    history = await engine.history(waiting.execution_id)
    assert types(history) == [
        "ExecutionStarted",
        "TimerStarted",
        "TimerFired",
        "ExecutionCompleted",
    ]


async def test_pending_timers_cost_heap_entries_not_tasks(
    make_engine: MakeEngine, clock: ManualClock
) -> None:
    engine = await make_engine(sleeper_app())
    tasks_before = len(asyncio.all_tasks())

    waiting = await asyncio.gather(
        *(engine.invoke("sleeper", body(hours=1 + n / 1000)) for n in range(1000))
    )
    tasks_while_waiting = len(asyncio.all_tasks())
    clock.advance(timedelta(hours=3))
    for state in waiting:
        await until(engine, state.execution_id, Status.COMPLETED)

    assert len(engine.timers) == 0
    assert engine.timers.fired == 1000
    assert tasks_while_waiting - tasks_before <= 2


# Pause deadlines.


async def test_a_pause_unanswered_by_its_timeout_raises_pause_timed_out_in_the_flow(
    make_engine: MakeEngine, clock: ManualClock
) -> None:
    engine = await make_engine(offer_app())

    paused = await engine.invoke("offer", body(hours=2))
    clock.advance(timedelta(hours=2))
    done = await until(engine, paused.execution_id, Status.COMPLETED)

    assert paused.pause is not None and paused.pause.deadline == T0 + timedelta(hours=2)
    history = await engine.history(paused.execution_id)
    assert types(history) == [
        "ExecutionStarted",
        "ExecutionPaused",
        "PauseExpired",
        "ExecutionCompleted",
    ]
    assert history[2].event == PauseExpired(1)
    assert history[2].at == T0 + timedelta(hours=2)
    assert done.expired == (1,)
    assert done.result == {
        "accepted": None,
        "why": f"pause 'offer' (operation 1) of execution {paused.execution_id} got no "
        "answer by its deadline 2026-03-01T10:00:00+00:00",
    }


async def test_a_resume_after_expiry_is_refused_as_expired(
    make_engine: MakeEngine, clock: ManualClock
) -> None:
    engine = await make_engine(offer_app())
    paused = await engine.invoke("offer", body(hours=1))
    clock.advance(timedelta(hours=1))
    done = await until(engine, paused.execution_id, Status.COMPLETED)

    with pytest.raises(Expired) as refused:
        await engine.resume("offer", paused.execution_id, body(accepted=True))
    with pytest.raises(Expired) as named:
        await engine.resume("offer", paused.execution_id, body(accepted=True), pause=1)

    assert refused.value.code == "expired" and refused.value.status == 409
    assert refused.value.details == {"status": "completed", "version": done.version}
    assert "pause 1" in refused.value.message and paused.execution_id in refused.value.message
    assert named.value.details == refused.value.details
    assert len(await engine.history(paused.execution_id)) == done.version


async def test_a_resume_before_the_deadline_wins_and_the_timer_changes_nothing(
    make_engine: MakeEngine, clock: ManualClock
) -> None:
    engine = await make_engine(offer_app())
    paused = await engine.invoke("offer", body(hours=1))

    done = await engine.resume("offer", paused.execution_id, body(accepted=True))
    clock.advance(timedelta(hours=2))
    await asyncio.sleep(0.05)

    assert done.result == {"accepted": True}
    assert types(await engine.history(paused.execution_id)) == [
        "ExecutionStarted",
        "ExecutionPaused",
        "ExecutionResumed",
        "ExecutionCompleted",
    ]
    assert len(engine.timers) == 0


async def test_an_expired_pause_with_a_default_returns_it(
    make_engine: MakeEngine, clock: ManualClock
) -> None:
    engine = await make_engine(offer_app())

    paused = await engine.invoke("silence", b"")
    clock.set(datetime(2026, 3, 1, 9, 0, tzinfo=UTC))
    done = await until(engine, paused.execution_id, Status.COMPLETED)

    history = await engine.history(paused.execution_id)
    assert isinstance(history[1].event, ExecutionPaused)
    assert history[1].event.default == {"accepted": False, "note": "no answer"}
    assert history[1].event.deadline == datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
    assert done.result == {"accepted": False, "note": "no answer"}


async def test_an_uncaught_pause_timed_out_fails_the_execution(
    make_engine: MakeEngine, clock: ManualClock
) -> None:
    engine = await make_engine(offer_app())

    paused = await engine.invoke("strict", b"")
    clock.advance(timedelta(minutes=5))
    failed = await until(engine, paused.execution_id, Status.FAILED)

    assert failed.error is not None and failed.error.type == "PauseTimedOut"
    assert "got no answer by its deadline 2026-03-01T08:05:00+00:00" in failed.error.message


async def test_a_resume_after_the_deadline_is_expired_even_before_the_timer_fires(
    make_engine: MakeEngine, clock: ManualClock
) -> None:
    """The deadline decides, not the scheduler's promptness: the resume records the expiry."""
    engine = await make_engine(offer_app())
    paused = await engine.invoke("offer", body(hours=1))
    await engine.timers.stop()  # a busy or stopped scheduler
    clock.advance(timedelta(hours=1))

    with pytest.raises(Expired) as refused:
        await engine.resume("offer", paused.execution_id, body(accepted=True))

    assert refused.value.details == {"status": "completed", "version": 4}
    assert types(await engine.history(paused.execution_id)) == [
        "ExecutionStarted",
        "ExecutionPaused",
        "PauseExpired",
        "ExecutionCompleted",
    ]


async def test_a_timeout_racing_a_resume_lets_exactly_one_win(
    make_engine: MakeEngine, clock: ManualClock
) -> None:
    engine = await make_engine(offer_app())
    outcomes: dict[str, int] = {"resumed": 0, "expired": 0}

    for n in range(40):
        paused = await engine.invoke("offer", body(hours=1))
        late = paused.pause.deadline if paused.pause else None
        assert late is not None

        async def answer(execution_id: str = paused.execution_id, n: int = n) -> str:
            await asyncio.sleep(0.001 * (n % 5))
            try:
                await engine.resume("offer", execution_id, body(accepted=True))
            except Expired:
                return "expired"
            return "resumed"

        async def tick(deadline: datetime = late, n: int = n) -> None:
            await asyncio.sleep(0.001 * (n % 3))
            clock.set(deadline)

        said, _ = await asyncio.gather(answer(), tick())
        state = await until(engine, paused.execution_id, Status.COMPLETED)
        kinds = types(await engine.history(paused.execution_id))

        assert kinds.count("ExecutionResumed") + kinds.count("PauseExpired") == 1, kinds
        won = "resumed" if "ExecutionResumed" in kinds else "expired"
        assert said == won
        assert state.result["accepted"] is (True if won == "resumed" else None)
        outcomes[won] += 1

    assert outcomes["resumed"] > 0 and outcomes["expired"] > 0, outcomes  # both sides raced


def pausing_with(arguments: dict[str, Any]) -> Callable[..., Awaitable[Any]]:
    """A flow that pauses with ``arguments``."""

    async def flow(ctx: Context) -> Any:
        return await ctx.pause(outputs={"ok": bool}, **arguments)

    return flow


async def test_pause_deadline_arguments_are_checked(make_engine: MakeEngine) -> None:
    app = App()
    cases: dict[str, dict[str, Any]] = {
        "both": {"timeout": timedelta(hours=1), "deadline": T0},
        "naive": {"deadline": datetime(2026, 3, 1, 9, 0)},
        "stray_default": {"default": {"ok": True}},
        "bad_default": {"timeout": timedelta(hours=1), "default": {"ok": "yes"}},
        "negative": {"timeout": timedelta(hours=-1)},
    }
    for name, arguments in cases.items():
        app.flow(name)(pausing_with(arguments))

    engine = await make_engine(app)
    messages = {}
    for name in cases:
        failed = await engine.invoke(name, b"")
        assert failed.status is Status.FAILED and failed.error is not None
        assert failed.execution_id in failed.error.message
        messages[name] = failed.error.message

    assert "give a timeout or a deadline, not both" in messages["both"]
    assert "naive datetime" in messages["naive"]
    assert "a default is only used when the pause expires" in messages["stray_default"]
    assert "does not fit its outputs" in messages["bad_default"]
    assert "field 'ok'" in messages["bad_default"]
    assert "negative" in messages["negative"]


async def test_a_deadline_already_past_expires_the_pause_at_once(
    make_engine: MakeEngine, clock: ManualClock
) -> None:
    clock.set(datetime(2026, 3, 1, 10, 0, tzinfo=UTC))  # after silence's 09:00 deadline
    engine = await make_engine(offer_app())

    done = await engine.invoke("silence", b"")

    assert done.status is Status.COMPLETED
    assert done.result == {"accepted": False, "note": "no answer"}
    assert types(await engine.history(done.execution_id))[1:3] == [
        "ExecutionPaused",
        "PauseExpired",
    ]


# Cancellation.


async def test_cancel_ends_a_paused_execution_with_its_reason(make_engine: MakeEngine) -> None:
    engine = await make_engine(offer_app())
    paused = await engine.invoke("offer", b"")

    cancelled = await engine.cancel("offer", paused.execution_id, "customer left")

    assert cancelled.status is Status.CANCELLED
    assert cancelled.cancel_reason == "customer left"
    assert cancelled.pause is None
    history = await engine.history(paused.execution_id)
    assert history[-1].event == ExecutionCancelled("customer left")
    assert len(engine.timers) == 0


async def test_cancel_of_a_waiting_execution_stops_its_timer(
    make_engine: MakeEngine, clock: ManualClock
) -> None:
    engine = await make_engine(sleeper_app())
    waiting = await engine.invoke("sleeper", body(hours=1))

    cancelled = await engine.cancel("sleeper", waiting.execution_id)
    clock.advance(timedelta(hours=2))
    await asyncio.sleep(0.05)

    assert cancelled.status is Status.CANCELLED and cancelled.wake_at is None
    assert types(await engine.history(waiting.execution_id)) == [
        "ExecutionStarted",
        "TimerStarted",
        "ExecutionCancelled",
    ]


async def test_cancel_of_a_finished_execution_is_finished_and_appends_nothing(
    make_engine: MakeEngine,
) -> None:
    engine = await make_engine(offer_app())
    paused = await engine.invoke("offer", b"")
    done = await engine.resume("offer", paused.execution_id, body(accepted=False))
    cancelled = await engine.invoke("offer", b"")
    await engine.cancel("offer", cancelled.execution_id)

    with pytest.raises(Finished) as completed:
        await engine.cancel("offer", paused.execution_id, "too late")
    with pytest.raises(Finished) as twice:
        await engine.cancel("offer", cancelled.execution_id)

    assert completed.value.details == {"status": "completed", "version": done.version}
    assert "nothing left to cancel" in completed.value.message
    assert twice.value.details == {"status": "cancelled", "version": 3}
    assert len(await engine.history(paused.execution_id)) == done.version


async def test_a_resume_of_a_cancelled_execution_is_finished(make_engine: MakeEngine) -> None:
    engine = await make_engine(offer_app())
    paused = await engine.invoke("offer", b"")
    await engine.cancel("offer", paused.execution_id)

    with pytest.raises(Finished) as refused:
        await engine.resume("offer", paused.execution_id, body(accepted=True))

    assert refused.value.details == {"status": "cancelled", "version": 3}


async def test_cancel_of_an_unknown_execution_or_through_another_flow_is_unknown(
    make_engine: MakeEngine,
) -> None:
    engine = await make_engine(offer_app())
    paused = await engine.invoke("offer", b"")

    with pytest.raises(UnknownExecution):
        await engine.cancel("offer", "0" * 32)
    with pytest.raises(UnknownExecution):
        await engine.cancel("strict", paused.execution_id)

    assert (await engine.get(paused.execution_id)).status is Status.PAUSED


async def test_a_repeated_cancel_key_returns_the_first_reply(make_engine: MakeEngine) -> None:
    engine = await make_engine(offer_app())
    paused = await engine.invoke("offer", b"")

    first = await engine.cancel("offer", paused.execution_id, "once", idempotency_key="c-1")
    again = await engine.cancel("offer", paused.execution_id, "twice", idempotency_key="c-1")

    assert again == first
    assert types(await engine.history(paused.execution_id)).count("ExecutionCancelled") == 1


async def test_cancel_racing_a_deadline_lands_once(
    make_engine: MakeEngine, clock: ManualClock
) -> None:
    engine = await make_engine(offer_app())
    for _ in range(20):
        paused = await engine.invoke("strict", b"")
        deadline = paused.pause.deadline if paused.pause else None
        assert deadline is not None

        async def cancel(execution_id: str = paused.execution_id) -> str:
            try:
                await engine.cancel("strict", execution_id)
            except Finished:
                return "finished"
            return "cancelled"

        async def tick(at: datetime = deadline) -> None:
            clock.set(at)

        said, _ = await asyncio.gather(cancel(), tick())
        state = await until(engine, paused.execution_id, Status.CANCELLED, Status.FAILED)
        kinds = types(await engine.history(paused.execution_id))

        assert kinds[-1] in ("ExecutionCancelled", "ExecutionFailed")
        assert kinds.count("ExecutionCancelled") <= 1
        assert (said == "cancelled") == (state.status is Status.CANCELLED)


async def test_a_wait_past_the_year_9999_fails_the_flow_saying_why(make_engine: MakeEngine) -> None:
    engine = await make_engine(sleeper_app())

    failed = await engine.invoke("sleeper", body(hours=24 * 365 * 9000))

    assert failed.status is Status.FAILED and failed.error is not None
    assert failed.error.type == "ValueError"
    assert failed.execution_id in failed.error.message
    assert "ends after the year 9999; give a shorter delay" in failed.error.message
