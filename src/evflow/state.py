"""An execution's state, folded from its events: a pure function, the same for everyone.

The engine, the queries and an auditor's replay all call ``fold``; nothing here reads a
clock, a file or the network, so the same events always give the same state.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from enum import StrEnum
from typing import Any

import msgspec

from .events import (
    EVENT_TYPES,
    ExecutionCancelled,
    ExecutionCompleted,
    ExecutionFailed,
    ExecutionPaused,
    ExecutionResumed,
    ExecutionStarted,
    PauseExpired,
    StepCompleted,
    StepFailed,
    StoredEvent,
    TimerFired,
    TimerStarted,
)


class Status(StrEnum):
    """Where an execution stands."""

    RUNNING = "running"
    PAUSED = "paused"
    WAITING = "waiting"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """Whether the execution is over."""
        return self in (Status.COMPLETED, Status.FAILED, Status.CANCELLED)


class PendingPause(msgspec.Struct, frozen=True, omit_defaults=True):
    """The pause an execution waits on."""

    sequence: int
    """Position of the pause among the flow's operations."""
    name: str
    """Name the flow gave the pause."""
    inputs: dict[str, Any]
    """Values shown to whoever answers."""
    outputs: dict[str, str]
    """Fields the resume must carry: name to type."""
    output_schema: dict[str, Any]
    """JSON Schema of the resume body."""
    paused_at: datetime
    """When the flow paused."""
    deadline: datetime | None = None
    """When the pause expires unanswered, if it ever does."""


class ErrorInfo(msgspec.Struct, frozen=True):
    """Why an execution failed."""

    type: str
    """Class name of the exception the flow raised."""
    message: str
    """Its message."""


class ExecutionState(msgspec.Struct, frozen=True, omit_defaults=True):
    """An execution as its events describe it."""

    execution_id: str
    """The execution."""
    flow: str
    """Name of its flow."""
    status: Status
    """Where it stands."""
    version: int
    """Version of its latest event."""
    inputs: dict[str, Any]
    """The invoke body."""
    started_at: datetime
    """When it was invoked."""
    updated_at: datetime
    """When its latest event happened."""
    flow_version: int
    """Version of the flow code it started on, and runs on to its end (always sent)."""
    pause: PendingPause | None = None
    """The pause it waits on, while paused."""
    wake_at: datetime | None = None
    """When its timer fires, while waiting."""
    result: Any = None
    """What the flow returned, once completed."""
    error: ErrorInfo | None = None
    """Why it failed, once failed."""
    cancel_reason: str | None = None
    """Why it was cancelled, once cancelled."""
    answered: tuple[int, ...] = ()
    """Sequences of the pauses already answered."""
    expired: tuple[int, ...] = ()
    """Sequences of the pauses that expired unanswered."""
    steps: int = 0
    """Number of steps recorded."""


def fold(events: Iterable[StoredEvent]) -> ExecutionState | None:
    """The state after ``events`` (one execution, in version order); None when empty."""
    state: ExecutionState | None = None
    for stored in events:
        state = apply(state, stored)
    return state


def apply(state: ExecutionState | None, stored: StoredEvent) -> ExecutionState:
    """The state after one more event."""
    event = stored.event

    # The first event must start the execution, and it is the only one that may.
    if state is None:
        if not isinstance(event, ExecutionStarted):
            raise ValueError(
                f"execution {stored.execution_id}: history must begin with ExecutionStarted, "
                f"found {type(event).__name__} at version {stored.version}"
            )
        return ExecutionState(
            execution_id=stored.execution_id,
            flow=event.flow,
            status=Status.RUNNING,
            version=stored.version,
            inputs=event.inputs,
            started_at=stored.at,
            updated_at=stored.at,
            flow_version=event.flow_version,
        )

    # Every later event must follow the previous one without a gap.
    if stored.version != state.version + 1:
        raise ValueError(
            f"execution {state.execution_id}: version {stored.version} follows "
            f"{state.version}; the history has a gap or a duplicate"
        )
    moved = msgspec.structs.replace(state, version=stored.version, updated_at=stored.at)
    return _transition(moved, stored)


def _transition(state: ExecutionState, stored: StoredEvent) -> ExecutionState:
    replace = msgspec.structs.replace
    match stored.event:
        case ExecutionPaused() as paused:
            pause = PendingPause(
                sequence=paused.sequence,
                name=paused.name,
                inputs=paused.inputs,
                outputs=paused.outputs,
                output_schema=paused.output_schema,
                paused_at=stored.at,
                deadline=paused.deadline,
            )
            return replace(state, status=Status.PAUSED, pause=pause)
        case ExecutionResumed() as resumed:
            answered = (*state.answered, resumed.sequence)
            return replace(state, status=Status.RUNNING, pause=None, answered=answered)
        case PauseExpired() as expired:
            ended = (*state.expired, expired.sequence)
            return replace(state, status=Status.RUNNING, pause=None, expired=ended)
        case StepCompleted() | StepFailed():
            return replace(state, steps=state.steps + 1)
        case TimerStarted() as timer:
            return replace(state, status=Status.WAITING, wake_at=timer.wake_at)
        case TimerFired():
            return replace(state, status=Status.RUNNING, wake_at=None)
        case ExecutionCompleted() as completed:
            return replace(state, status=Status.COMPLETED, result=completed.result)
        case ExecutionFailed() as failed:
            error = ErrorInfo(type=failed.error_type, message=failed.message)
            return replace(state, status=Status.FAILED, error=error)
        case ExecutionCancelled() as cancelled:
            return replace(
                state,
                status=Status.CANCELLED,
                pause=None,
                wake_at=None,
                cancel_reason=cancelled.reason,
            )
        case other:
            raise ValueError(
                f"execution {state.execution_id}: {type(other).__name__} at version "
                f"{stored.version} cannot follow the start"
            )


_STATUS_AFTER: dict[str, Status] = {
    ExecutionPaused.__name__: Status.PAUSED,
    TimerStarted.__name__: Status.WAITING,
    ExecutionCompleted.__name__: Status.COMPLETED,
    ExecutionFailed.__name__: Status.FAILED,
    ExecutionCancelled.__name__: Status.CANCELLED,
}


def status_after(event_type: str) -> Status:
    """The status of an execution whose latest event is of type ``event_type`` (its tag).

    The fold reaches the same status: only a settling event moves an execution off
    ``running``, and every other event leaves it running. A store that lists executions
    derives their status from their latest event alone with this, without folding.
    """
    return _STATUS_AFTER.get(event_type, Status.RUNNING)


def event_types_of(status: Status) -> tuple[str, ...]:
    """The event types (tags) after which an execution has ``status``: ``status_after``
    turned around, for a store that filters its listing by status."""
    return tuple(cls.__name__ for cls in EVENT_TYPES if status_after(cls.__name__) is status)
