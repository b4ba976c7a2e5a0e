"""The facts evflow records: one frozen msgspec Struct per event type, one tagged union.

Events are stored as JSON, tagged by ``type``, so an audit trail can be read with sqlite3
and jq alone. Evolution rules: a new field gets a default; a field never changes type; a
tag is never renamed. ``kind`` names the notification an event is published as.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
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

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
"""Turns an event object of one schema version into the next version's shape."""


class Upcasters:
    """How each event type's stored shape changed, one schema version at a time.

    When a change cannot be made by adding a field with a default (a rename, a field that
    moves or changes type), ``SCHEMA_VERSION`` goes up and an upcaster from the old version
    is registered here. Reads turn every stored event into the current types, so neither the
    fold nor flow code ever sees an old shape, while the log keeps what was written (and its
    hash chain stays valid).
    """

    def __init__(self, current: int = SCHEMA_VERSION) -> None:
        self.current = current
        self._steps: dict[tuple[str, int], Upcaster] = {}

    def register(self, type_name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Register the function that lifts ``type_name`` from ``from_version`` to the next."""

        def add(step: Upcaster) -> Upcaster:
            if (type_name, from_version) in self._steps:
                raise ValueError(
                    f"{type_name} already has an upcaster from schema version {from_version}; "
                    "register one function per type and version, chaining versions in order"
                )
            self._steps[type_name, from_version] = step
            return step

        return add

    def decode(self, data: bytes | str, schema_version: int) -> AnyEvent:
        """An event of the current types from JSON stored at ``schema_version``."""
        if schema_version == self.current:
            return _decoder.decode(data)
        if schema_version > self.current:
            raise msgspec.ValidationError(
                f"the event was stored at schema version {schema_version}, newer than this "
                f"evflow's {self.current}: upgrade evflow to read it"
            )

        obj = msgspec.json.decode(data)
        if not isinstance(obj, dict):
            raise msgspec.ValidationError(f"a stored event must be a JSON object, not {obj!r}")
        for version in range(schema_version, self.current):
            step = self._steps.get((obj.get("type", ""), version))
            if step is not None:
                obj = step(obj)
        return _decoder.decode(msgspec.json.encode(obj))


UPCASTERS = Upcasters()
"""The upcasters of evflow's own event types; empty until a stored shape first changes."""


def encode(event: Event) -> bytes:
    """The stored JSON of an event, with its ``type`` tag."""
    return _encoder.encode(event)


def decode(data: bytes | str, schema_version: int = SCHEMA_VERSION) -> AnyEvent:
    """An event from its stored JSON, upcast from an older schema version if need be."""
    return UPCASTERS.decode(data, schema_version)


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
    prev_hash: str | None = None
    """Hash of the execution's previous event (None for version 1); see ``chain``."""
    hash: str | None = None
    """sha256 of this event's canonical stored form, set by the store on append."""


def new_execution_id() -> str:
    """A new execution ID: a UUIDv7 (RFC 9562), written as 32 hex digits.

    Its first 48 bits are the time in milliseconds, so executions started together sit
    together in the log's index, and an append touches the index's newest pages rather
    than a random page per execution (the writer alone appended half again as fast). Its
    74 random bits keep it unguessable.
    """
    random = int.from_bytes(os.urandom(10), "big")
    millis = time.time_ns() // 1_000_000 & (1 << 48) - 1
    rand_a, rand_b = random >> 68, random & (1 << 62) - 1
    return f"{millis << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b:032x}"
