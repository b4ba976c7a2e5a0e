"""fold: the pure function from an execution's events to its state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from evflow.events import (
    Event,
    ExecutionCancelled,
    ExecutionCompleted,
    ExecutionFailed,
    ExecutionPaused,
    ExecutionResumed,
    ExecutionStarted,
    StepCompleted,
    StepFailed,
    StoredEvent,
    TimerFired,
    TimerStarted,
)
from evflow.state import ErrorInfo, ExecutionState, PendingPause, Status, fold

T0 = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
SCHEMA = {"type": "object", "properties": {"approved": {"type": "boolean"}}}


def history(*events: Event) -> list[StoredEvent]:
    """Events of execution ``e1`` at versions 1, 2, ..., one minute apart."""
    return [
        StoredEvent("e1", version, T0 + timedelta(minutes=version), event)
        for version, event in enumerate(events, start=1)
    ]


def at(version: int) -> datetime:
    """The time ``history`` gives the event at ``version``."""
    return T0 + timedelta(minutes=version)


STARTED = ExecutionStarted("approval", {"amount": 12.5}, flow_version=3, idempotency_key="k")
PAUSED = ExecutionPaused(1, "manager", {"amount": 12.5}, {"approved": "bool"}, SCHEMA)
RESUMED = ExecutionResumed(1, {"approved": True})


def test_started_execution_is_running():
    """One ExecutionStarted gives a running execution at version 1 with its inputs."""
    state = fold(history(STARTED))

    assert state == ExecutionState(
        execution_id="e1",
        flow="approval",
        status=Status.RUNNING,
        version=1,
        inputs={"amount": 12.5},
        started_at=at(1),
        updated_at=at(1),
        flow_version=3,
    )


def test_paused_execution_carries_its_pending_pause():
    """A pause makes the execution paused and exposes the pause's fields and time."""
    state = fold(history(STARTED, PAUSED))

    assert state is not None
    assert (state.status, state.version, state.updated_at) == (Status.PAUSED, 2, at(2))
    assert state.pause == PendingPause(
        sequence=1,
        name="manager",
        inputs={"amount": 12.5},
        outputs={"approved": "bool"},
        output_schema=SCHEMA,
        paused_at=at(2),
    )
    assert state.started_at == at(1)


def test_resumed_execution_runs_and_remembers_answered_pauses():
    """A resume clears the pause, runs on, and adds the pause's sequence to ``answered``."""
    second = ExecutionPaused(3, "finance", {}, {"ok": "bool"}, {})
    once = fold(history(STARTED, PAUSED, RESUMED))
    twice = fold(history(STARTED, PAUSED, RESUMED, second, ExecutionResumed(3, {"ok": False})))

    assert once is not None and twice is not None
    assert (once.status, once.pause, once.answered, once.version) == (
        Status.RUNNING,
        None,
        (1,),
        3,
    )
    assert (twice.status, twice.pause, twice.answered) == (Status.RUNNING, None, (1, 3))


def test_second_pause_replaces_the_answered_one():
    """After one pause is answered, the next pause is the pending one."""
    second = ExecutionPaused(2, "finance", {"x": 1}, {"ok": "bool"}, {})

    state = fold(history(STARTED, PAUSED, RESUMED, second))

    assert state is not None and state.pause is not None
    assert (state.status, state.pause.name, state.pause.sequence) == (Status.PAUSED, "finance", 2)
    assert state.answered == (1,)


def test_steps_are_counted_whether_they_completed_or_failed():
    """Every recorded step, completed or failed, counts once in ``steps``."""
    events = history(
        STARTED,
        StepCompleted(1, "reserve", {"id": 7}),
        StepFailed(2, "charge", "ValueError", "card declined"),
        StepCompleted(3, "notify"),
    )

    state = fold(events)

    assert state is not None
    assert (state.steps, state.status, state.version) == (3, Status.RUNNING, 4)


def test_completed_execution_holds_its_result():
    """ExecutionCompleted finishes the execution with the flow's result."""
    done = ExecutionCompleted({"approved": True, "note": "ok"})

    state = fold(history(STARTED, PAUSED, RESUMED, done))

    assert state is not None
    assert (state.status, state.result, state.error) == (
        Status.COMPLETED,
        {"approved": True, "note": "ok"},
        None,
    )
    assert state.status.finished


def test_failed_execution_holds_the_error_type_and_message():
    """ExecutionFailed finishes the execution with the exception's type and message."""
    state = fold(history(STARTED, ExecutionFailed("KeyError", "'note'")))

    assert state is not None
    assert (state.status, state.error) == (Status.FAILED, ErrorInfo("KeyError", "'note'"))
    assert state.status.finished


def test_cancelled_execution_drops_its_pause_and_keeps_the_reason():
    """Cancelling a paused execution finishes it, clears the pause and keeps the reason."""
    state = fold(history(STARTED, PAUSED, ExecutionCancelled("duplicate order")))

    assert state is not None
    assert (state.status, state.pause, state.cancel_reason) == (
        Status.CANCELLED,
        None,
        "duplicate order",
    )
    assert state.status.finished


def test_timer_started_waits_until_wake_at():
    """TimerStarted makes the execution waiting, with the timer's wake_at."""
    wake = T0 + timedelta(days=2)

    state = fold(history(STARTED, TimerStarted(1, wake)))

    assert state is not None
    assert (state.status, state.wake_at) == (Status.WAITING, wake)
    assert not state.status.finished


def test_timer_fired_runs_on_without_wake_at():
    """TimerFired makes a waiting execution running again and clears wake_at."""
    wake = T0 + timedelta(days=2)

    state = fold(history(STARTED, TimerStarted(1, wake), TimerFired(1)))

    assert state is not None
    assert (state.status, state.wake_at, state.version) == (Status.RUNNING, None, 3)


def test_cancelled_while_waiting_clears_wake_at():
    """Cancelling a waiting execution leaves no timer behind."""
    wake = T0 + timedelta(days=2)

    state = fold(history(STARTED, TimerStarted(1, wake), ExecutionCancelled()))

    assert state is not None
    assert (state.status, state.wake_at, state.cancel_reason) == (Status.CANCELLED, None, None)


def test_no_events_fold_to_none():
    """An execution without events has no state."""
    assert fold([]) is None
    assert fold(iter(())) is None


def test_history_must_begin_with_execution_started():
    """A history whose first event is not ExecutionStarted is refused with ValueError."""
    with pytest.raises(ValueError) as info:
        fold(history(PAUSED))

    assert "ExecutionStarted" in str(info.value) and "e1" in str(info.value)


def test_a_second_start_is_refused():
    """ExecutionStarted may only come first."""
    with pytest.raises(ValueError) as info:
        fold(history(STARTED, PAUSED, STARTED))

    assert "version 3" in str(info.value)


def test_version_gap_is_refused():
    """A history that skips a version is refused with ValueError naming both versions."""
    events = history(STARTED, PAUSED, RESUMED)
    gapped = [events[0], events[2]]

    with pytest.raises(ValueError) as info:
        fold(gapped)

    assert "version 3 follows 1" in str(info.value)


def test_repeated_version_is_refused():
    """A history that holds one version twice is refused with ValueError."""
    events = history(STARTED, PAUSED)

    with pytest.raises(ValueError):
        fold([events[0], events[1], events[1]])


def test_fold_is_pure():
    """The same events always fold to the same state, and the events are left untouched."""
    events = history(STARTED, PAUSED, RESUMED, StepCompleted(2, "s", [1, 2]))
    copy = list(events)

    first = fold(events)
    second = fold(iter(events))

    assert first == second
    assert events == copy


def test_fold_of_a_prefix_is_the_state_at_that_version():
    """Folding the first n events gives the state the execution had at version n."""
    events = history(STARTED, PAUSED, RESUMED, ExecutionCompleted(1))

    states = [fold(events[:n]) for n in range(1, 5)]

    assert [s.status for s in states if s is not None] == [
        Status.RUNNING,
        Status.PAUSED,
        Status.RUNNING,
        Status.COMPLETED,
    ]
    assert [s.updated_at for s in states if s is not None] == [at(1), at(2), at(3), at(4)]


def test_state_round_trips_through_json():
    """A folded state encodes to JSON and decodes back to an equal state."""
    state = fold(history(STARTED, PAUSED))

    encoded = msgspec.json.encode(state)

    assert msgspec.json.decode(encoded, type=ExecutionState) == state
    assert msgspec.json.decode(encoded)["status"] == "paused"
