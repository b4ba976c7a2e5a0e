"""Admission: whether a command may act on an execution in the state it arrives at.

A command is judged by the folded state it finds, never by a state it hopes for. Every
refusal names the execution, says where it stands (a 409 carries its ``status`` and
``version``) and what the caller can do instead.
"""

from __future__ import annotations

from .context import Suspended
from .errors import (
    AlreadyResumed,
    Expired,
    Finished,
    FlowVersionGone,
    NondeterminismError,
    NotPaused,
    UnknownExecution,
)
from .state import ExecutionState, Status
from .timers import Clock


def of_flow(state: ExecutionState | None, flow_name: str, execution_id: str) -> ExecutionState:
    """The state, if it is an execution of ``flow_name``: a subject names both, and both count."""
    if state is None or state.flow != flow_name:
        raise UnknownExecution(
            f"no execution {execution_id} of flow '{flow_name}'; check the execution ID "
            "and the flow name in the subject",
            execution_id=execution_id,
        )
    return state


def check_resumable(state: ExecutionState, pause: int | None) -> None:
    """Refuse a resume the execution cannot take, saying where it stands.

    ``pause`` is the pause the caller means to answer, when it says. Without it, a resume
    answers the pause pending when it arrives; if there is none and the latest pause
    expired, the caller was most likely answering that one, and hears that it expired.
    """
    where = {"status": state.status.value, "version": state.version}
    execution_id = state.execution_id
    if pause is not None and pause in state.answered:
        raise AlreadyResumed(
            f"pause {pause} of execution {execution_id} was already answered; the execution "
            f"is now {state.status.value}",
            execution_id=execution_id,
            **where,
        )
    if _expired(state, pause):
        raise Expired(
            f"pause {pause or max(state.expired)} of execution {execution_id} expired before "
            f"this resume arrived; the execution went on without it and is now "
            f"{state.status.value}",
            execution_id=execution_id,
            **where,
        )
    if state.status.finished:
        raise Finished(
            f"execution {execution_id} is {state.status.value}; nothing is left to resume",
            execution_id=execution_id,
            **where,
        )
    if state.status is not Status.PAUSED or state.pause is None:
        until = f" until {state.wake_at.isoformat()}" if state.wake_at is not None else ""
        raise NotPaused(
            f"execution {execution_id} is {state.status.value}{until}, not paused; resume it "
            "once it reports a pause",
            execution_id=execution_id,
            **where,
        )
    if pause is not None and pause != state.pause.sequence:
        raise NotPaused(
            f"execution {execution_id} waits at pause {state.pause.sequence}, not at pause "
            f"{pause}; answer pause {state.pause.sequence}",
            execution_id=execution_id,
            **where,
        )


def resumable(state: ExecutionState, flow_name: str, pause: int | None, clock: Clock) -> bool:
    """Whether a resume of ``flow_name`` naming ``pause`` (if it does) may answer the pause
    the execution waits at now: the quick yes of a hot execution, with no reasons."""
    waiting = state.pause
    return (
        state.flow == flow_name
        and state.status is Status.PAUSED
        and waiting is not None
        and pause in (None, waiting.sequence)
        and not past_deadline(state, clock)
    )


def _expired(state: ExecutionState, pause: int | None) -> bool:
    if pause is not None:
        return pause in state.expired
    latest_expired = max(state.expired, default=0) > max(state.answered, default=0)
    return state.status is not Status.PAUSED and latest_expired


def past_deadline(state: ExecutionState, clock: Clock) -> bool:
    """Whether the pending pause's deadline has come, though its expiry is not yet recorded.

    A resume arriving then is too late even if the scheduler has not fired yet (the engine
    was down, or busy): the deadline, not the scheduler's promptness, decides.
    """
    pause = state.pause
    return pause is not None and pause.deadline is not None and clock.now() >= pause.deadline


def check_cancellable(state: ExecutionState) -> None:
    """Refuse to cancel an execution that is already over."""
    if state.status.finished:
        raise Finished(
            f"execution {state.execution_id} is {state.status.value}; there is nothing left "
            "to cancel",
            execution_id=state.execution_id,
            status=state.status.value,
            version=state.version,
        )


def diverged(state: ExecutionState, outcome: object) -> NondeterminismError:
    """The fault of flow code that, replayed, did not reach the pause its history waits at."""
    assert state.pause is not None
    where = (
        f"pause '{outcome.name}' at {outcome.sequence}"
        if isinstance(outcome, Suspended)
        else "another operation or the end of the flow"
    )
    return NondeterminismError(
        f"execution {state.execution_id}: the history waits at pause '{state.pause.name}' "
        f"(operation {state.pause.sequence}) but the flow code reached {where}; the flow "
        "code changed since the execution started: restore the old code",
        execution_id=state.execution_id,
        sequence=state.pause.sequence,
    )


def version_gone(state: ExecutionState, registered: list[int]) -> FlowVersionGone:
    """The refusal of a command on an execution whose flow version the engine does not serve.

    Running it on another version's code would replay a history that code never wrote, so
    the execution is left as it is until an engine serves its version again.
    """
    served = ", ".join(f"v{version}" for version in registered)
    return FlowVersionGone(
        f"execution {state.execution_id} started on version {state.flow_version} of flow "
        f"'{state.flow}', but this engine serves only {served} of it; serve version "
        f"{state.flow_version} beside the new one (keep its function registered with "
        f"version={state.flow_version}) to finish the execution, which was left unchanged",
        execution_id=state.execution_id,
        status=state.status.value,
        version=state.version,
        flow=state.flow,
        flow_version=state.flow_version,
        registered=registered,
    )
