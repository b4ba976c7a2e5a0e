"""The facts evflow records: one frozen msgspec Struct per event type, one tagged union.

Events are stored as JSON, tagged by ``type``, so an audit trail can be read with sqlite3
and jq alone. Evolution rules: a new field gets a default; a field never changes type; a
tag is never renamed. ``kind`` names the notification an event is published as.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

import msgspec

SCHEMA_VERSION = 1
"""Schema version written with every stored event."""


class Event(msgspec.Struct, frozen=True, tag_field="type", tag=True, omit_defaults=True):
    """Base of every event."""

    kind: ClassVar[str] = "event"


class ExecutionStarted(Event, frozen=True):
    """An invoke was accepted: the execution exists from here on."""

    kind: ClassVar[str] = "started"
    flow: str
    """Name of the flow."""
    inputs: dict[str, Any]
    """The validated invoke body."""
    flow_version: int = 1
    """Version of the flow code the execution started on."""
    idempotency_key: str | None = None
    """The invoke's Idempotency-Key header, if any."""


class ExecutionPaused(Event, frozen=True):
    """The flow asked for outside input and stopped until a resume answers it."""

    kind: ClassVar[str] = "paused"
    sequence: int
    """Position of the pause among the flow's operations, from 1."""
    name: str
    """Name of the pause, given by the flow (``pause`` by default)."""
    inputs: dict[str, Any]
    """Values the flow shows to whoever answers."""
    outputs: dict[str, str]
    """Fields the resume must carry: name to type."""
    output_schema: dict[str, Any]
    """JSON Schema of the resume body."""
    deadline: datetime | None = None
    """When the pause expires unanswered (UTC); None when it waits for ever."""
    default: dict[str, Any] | None = None
    """Outputs the pause returns when it expires; None: the flow sees ``PauseTimedOut``."""


class PauseExpired(Event, frozen=True):
    """A pause's deadline passed before any resume answered it.

    The flow goes on: with the pause's ``default`` as its answer if it declared one, else
    with ``PauseTimedOut`` raised where it paused.
    """

    kind: ClassVar[str] = "expired"
    sequence: int
    """Sequence of the pause that expired."""


class ExecutionResumed(Event, frozen=True):
    """A resume answered the pending pause."""

    kind: ClassVar[str] = "resumed"
    sequence: int
    """Sequence of the pause answered."""
    outputs: dict[str, Any]
    """The validated resume body."""
    idempotency_key: str | None = None
    """The resume's Idempotency-Key header, if any."""


class StepCompleted(Event, frozen=True):
    """A side-effect step ran and returned; replays return ``result`` without running it."""

    kind: ClassVar[str] = "step_completed"
    sequence: int
    """Position of the step among the flow's operations."""
    name: str
    """Name of the step, given by the flow."""
    result: Any = None
    """What the step's function returned (JSON)."""


class StepFailed(Event, frozen=True):
    """A side-effect step raised; replays raise the same ``StepError``."""

    kind: ClassVar[str] = "step_failed"
    sequence: int
    """Position of the step among the flow's operations."""
    name: str
    """Name of the step, given by the flow."""
    error_type: str
    """Class name of the exception the step's function raised."""
    message: str
    """Its message."""


class TimerStarted(Event, frozen=True):
    """The flow waits until ``wake_at`` (UTC)."""

    kind: ClassVar[str] = "waiting"
    sequence: int
    """Position of the wait among the flow's operations."""
    wake_at: datetime
    """When the timer fires (UTC)."""


class TimerFired(Event, frozen=True):
    """A timer's due time arrived and the flow went on."""

    kind: ClassVar[str] = "woken"
    sequence: int
    """Sequence of the wait that ended."""


class ExecutionCompleted(Event, frozen=True):
    """The flow returned ``result``."""

    kind: ClassVar[str] = "completed"
    result: Any = None
    """What the flow returned (JSON)."""


class ExecutionFailed(Event, frozen=True):
    """The flow raised; the execution is over."""

    kind: ClassVar[str] = "failed"
    error_type: str
    """Class name of the exception the flow raised."""
    message: str
    """Its message."""


class ExecutionCancelled(Event, frozen=True):
    """Somebody cancelled the execution; the execution is over."""

    kind: ClassVar[str] = "cancelled"
    reason: str | None = None
    """Why, if the canceller said."""
    idempotency_key: str | None = None
    """The cancel's Idempotency-Key header, if any."""


AnyEvent = (
    ExecutionStarted
    | ExecutionPaused
    | ExecutionResumed
    | PauseExpired
    | StepCompleted
    | StepFailed
    | TimerStarted
    | TimerFired
    | ExecutionCompleted
    | ExecutionFailed
    | ExecutionCancelled
)

EVENT_TYPES: tuple[type[Event], ...] = AnyEvent.__args__  # type: ignore[attr-defined]

SETTLING = (ExecutionPaused, TimerStarted, ExecutionCompleted, ExecutionFailed, ExecutionCancelled)
"""Events after which an execution waits for the outside world, or is over."""

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AnyEvent)


def encode(event: Event) -> bytes:
    """The stored JSON of an event, with its ``type`` tag."""
    return _encoder.encode(event)


def decode(data: bytes | str) -> AnyEvent:
    """An event from its stored JSON."""
    return _decoder.decode(data)


class StoredEvent(msgspec.Struct, frozen=True):
    """An event as the log holds it: where it stands, when it happened, and what it says."""

    execution_id: str
    """The execution the event belongs to."""
    version: int
    """Position in the execution, 1, 2, 3 ... without gaps."""
    at: datetime
    """When the engine decided the event (UTC)."""
    event: AnyEvent
    """The event itself, tagged by ``type``."""
    position: int = 0
    """Position in the whole log, assigned by the store on append (0 before)."""
    schema_version: int = SCHEMA_VERSION
    """Shape version of ``event`` when it was stored."""
