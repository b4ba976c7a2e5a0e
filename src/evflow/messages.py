"""What travels on the wire besides events: replies, errors, notifications, query answers.

A reply to invoke or resume is a settle point, tagged by ``status``: where the execution
stopped and what it needs next. It is computed from the folded state alone, so the same
log always gives the same bytes (which makes idempotent repeats byte-for-byte equal).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec

from .events import AnyEvent, ExecutionPaused, StoredEvent
from .state import ErrorInfo, ExecutionState, Status
from .store import ExecutionSummary
from .subjects import Subjects

MAX_LIST_LIMIT = 1000
"""Most executions one listing page holds: a full page stays far below NATS's 1 MiB."""


class _FlowVersioned(msgspec.Struct, frozen=True, kw_only=True):
    """The field every reply ends with (keyword-only, so it follows each reply's own)."""

    flow_version: int = 1
    """Version of the flow code the execution runs on: the one it started on."""


class Reply(_FlowVersioned, frozen=True, tag_field="status"):
    """Where an execution settled after a command."""

    execution_id: str
    """The execution."""
    flow: str
    """Its flow."""
    version: int
    """Version of its latest event."""


class Paused(Reply, frozen=True, tag="paused"):
    """The flow waits for a resume carrying ``outputs``."""

    pause: str
    """Name the flow gave the pause."""
    sequence: int
    """Which pause of the execution this is (send it as ``Evflow-Pause`` to be exact)."""
    inputs: dict[str, Any]
    """Values the flow shows to whoever answers."""
    outputs: list[str]
    """Names of the fields the resume body must carry."""
    output_schema: dict[str, Any]
    """JSON Schema of the resume body."""
    resume_subject: str
    """Where to send the resume."""
    deadline: datetime | None = None
    """When the pause expires unanswered (RFC 3339, UTC); null when it never does."""


class Completed(Reply, frozen=True, tag="completed"):
    """The flow returned."""

    result: Any
    """What it returned."""


class Failed(Reply, frozen=True, tag="failed"):
    """The flow raised."""

    error: ErrorInfo
    """The exception's type and message."""


class Waiting(Reply, frozen=True, tag="waiting"):
    """The flow waits on a durable timer."""

    wake_at: datetime
    """When the timer fires (RFC 3339, UTC)."""


class Cancelled(Reply, frozen=True, tag="cancelled"):
    """The execution was cancelled."""

    reason: str | None = None
    """Why, if the canceller said."""


Settled = Paused | Completed | Failed | Waiting | Cancelled


class ErrorReply(msgspec.Struct, frozen=True):
    """The body of an error reply; its headers carry the status and the message too."""

    error: dict[str, Any]
    """``code``, ``message`` and the fields the error names (``field``, ``status``, ...)."""


class History(msgspec.Struct, frozen=True):
    """The answer to a history query."""

    execution_id: str
    """The execution."""
    events: list[StoredEvent]
    """Its events in version order."""


class GetQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The body of a get query; empty (or ``{}``) asks for the latest state."""

    at_version: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """Fold the events up to this version only, to see the execution as it was then."""


class ListQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The body of a listing query; every field is optional."""

    flow: str | None = None
    """Only executions of this flow."""
    status: Status | None = None
    """Only executions in this status."""
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_LIST_LIMIT)] = 100
    """Most executions in the page."""
    after: str | None = None
    """The ``next`` token of the previous page; absent for the most recently changed."""


class ExecutionList(msgspec.Struct, frozen=True):
    """One page of the listing: the most recently changed executions first."""

    executions: list[ExecutionSummary]
    """The executions of the page."""
    next: str | None
    """Send as ``after`` for the next page; null when this page is the last."""


class Notification(msgspec.Struct, frozen=True, omit_defaults=True):
    """Published after an event is durably appended.

    Pause notifications also carry what a subscriber needs to answer the pause without
    another request: ``inputs``, ``outputs``, ``output_schema`` and ``resume_subject``.
    """

    kind: str
    """What happened: started, paused, resumed, completed, failed, ..."""
    execution_id: str
    """The execution."""
    flow: str
    """Its flow."""
    version: int
    """Version of the event."""
    at: datetime
    """When it happened."""
    event: AnyEvent | None
    """The event itself; null when it was too large to publish (see ``oversized``)."""
    inputs: dict[str, Any] | None = None
    """A pause's values shown to whoever answers."""
    outputs: list[str] | None = None
    """A pause's output field names."""
    output_schema: dict[str, Any] | None = None
    """JSON Schema of the resume body that answers a pause."""
    resume_subject: str | None = None
    """Where to send that resume."""
    deadline: datetime | None = None
    """When a pause expires unanswered, if it does."""
    oversized: bool = False
    """The event did not fit in one NATS message and is left out; the log holds it."""


class Rejection(msgspec.Struct, frozen=True, omit_defaults=True):
    """Published on ``<prefix>.events.rejected`` when a durable command is refused.

    The command is acknowledged and never retried: it would be refused again. Nothing was
    appended for it.
    """

    subject: str
    """The subject the command was published on."""
    stream_sequence: int
    """Its sequence in the commands stream."""
    error: dict[str, Any]
    """Why it was refused: the same ``code`` and ``message`` a request would get."""
    at: datetime
    """When it was refused."""
    idempotency_key: str | None = None
    """The key the command was deduplicated by."""
    execution_id: str | None = None
    """The execution the command named, if any."""


def settle_reply(state: ExecutionState, subjects: Subjects) -> Settled:
    """The reply for an execution at a settle point."""
    common = {
        "execution_id": state.execution_id,
        "flow": state.flow,
        "version": state.version,
        "flow_version": state.flow_version,
    }
    match state.status:
        case Status.PAUSED:
            pause = state.pause
            assert pause is not None
            return Paused(
                **common,
                pause=pause.name,
                sequence=pause.sequence,
                inputs=pause.inputs,
                outputs=list(pause.outputs),
                output_schema=pause.output_schema,
                resume_subject=subjects.resume(state.flow, state.execution_id),
                deadline=pause.deadline,
            )
        case Status.COMPLETED:
            return Completed(**common, result=state.result)
        case Status.FAILED:
            assert state.error is not None
            return Failed(**common, error=state.error)
        case Status.WAITING:
            assert state.wake_at is not None
            return Waiting(**common, wake_at=state.wake_at)
        case Status.CANCELLED:
            return Cancelled(**common, reason=state.cancel_reason)
    raise ValueError(f"execution {state.execution_id} is {state.status.value}, not settled")


def slim(note: Notification) -> Notification:
    """A notification without its event and pause details, for one too large to publish."""
    return msgspec.structs.replace(
        note, event=None, inputs=None, output_schema=None, oversized=True
    )


def notification(flow: str, stored: StoredEvent, subjects: Subjects) -> Notification:
    """The notification of one appended event."""
    event = stored.event
    extra: dict[str, Any] = {}
    if isinstance(event, ExecutionPaused):
        extra = {
            "inputs": event.inputs,
            "outputs": list(event.outputs),
            "output_schema": event.output_schema,
            "resume_subject": subjects.resume(flow, stored.execution_id),
            "deadline": event.deadline,
        }
    return Notification(
        kind=event.kind,
        execution_id=stored.execution_id,
        flow=flow,
        version=stored.version,
        at=stored.at,
        event=event,
        **extra,
    )


reply_decoder = msgspec.json.Decoder(Settled)
notification_decoder = msgspec.json.Decoder(Notification)
history_decoder = msgspec.json.Decoder(History)
state_decoder = msgspec.json.Decoder(ExecutionState)
list_decoder = msgspec.json.Decoder(ExecutionList)
error_decoder = msgspec.json.Decoder(ErrorReply)
encoder = msgspec.json.Encoder()
