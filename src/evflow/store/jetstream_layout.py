"""How the JetStream log lays out its stream: the subjects, and the message bodies on them.

In the stream ``<NAME>_LOG`` of a log named ``NAME`` (subjects in lower case):

- ``<name>.log.ex.<partition>.<execution_id>``: the execution's events, one message each,
  in version order; ``partition`` is ``partitions.partition_of(execution_id)``, so the
  executions of one partition are one subject filter (what a partition's start-up scan
  reads). A message's stream sequence is the event's position in the log.
- ``<name>.log.key.<sha256 of scope>``: an idempotency scope's claim, naming the execution
  and version of the event that claimed it.
- ``<name>.log.gap``: empty messages that keep an import's positions where its source had
  none.

An event's body is the event as the SQLite log stores it, with its hash chain, so an
export of either log is verified the same way; and, beside it, the execution's origin
(flow, flow version, start time, copied from its ``ExecutionStarted``), so that a scan
reading only each execution's latest event can still name its flow.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime

import msgspec
from msgspec import Raw
from nats.aio.msg import Msg

from ..chain import Record
from ..errors import EvflowError, StoreError
from ..events import ExecutionStarted, StoredEvent
from ..partitions import PARTITIONS, partition_of
from ..subjects import token
from .jetstream_requests import sequence_of
from .rows import chained_row, record, stored_event


class Origin(msgspec.Struct, array_like=True, frozen=True):
    """Where an execution comes from: what its ``ExecutionStarted`` says, and when."""

    flow: str
    flow_version: int
    started_at: str


class Entry(msgspec.Struct, array_like=True, frozen=True):
    """An event's message body: the columns the SQLite log stores for it (hashed), then the
    execution's origin (not hashed: it repeats what version 1 says)."""

    execution_id: str
    version: int
    type: str
    schema_version: int
    at: str
    data: Raw
    prev_hash: str | None
    hash: str | None
    scope: str | None
    origin: Origin | None = None


class Claim(msgspec.Struct, frozen=True):
    """A scope claim's message body: which event claimed it."""

    execution_id: str
    version: int


decode_entry = msgspec.json.Decoder(Entry).decode
decode_claim = msgspec.json.Decoder(Claim).decode


class Layout:
    """The subjects of one log's stream.

    Args:
        name: the log's name (``EVFLOW`` for the stream ``EVFLOW_LOG``).
    """

    def __init__(self, name: str):
        prefix = f"{name.lower()}.log"
        self._events = f"{prefix}.ex"
        self._claims = f"{prefix}.key"
        self.gaps = f"{prefix}.gap"
        self.events = f"{self._events}.*.*"
        """The filter of every event in the log."""
        self.old_events = f"{self._events}.*"
        """The event subjects of the layout before partitions, one token per execution."""

    def subjects(self) -> list[str]:
        """The subjects the stream captures."""
        return [self.events, f"{self._claims}.*", self.gaps]

    def execution(self, execution_id: str) -> str:
        """The subject of an execution's events."""
        try:
            checked = token(execution_id, "execution_id")
        except EvflowError as error:
            raise StoreError(error.message, execution_id=execution_id) from None
        return f"{self._events}.{partition_of(checked)}.{checked}"

    def partition(self, partition: int) -> str:
        """The filter of the events of one partition's executions."""
        if not 0 <= partition < PARTITIONS:
            raise StoreError(f"partition {partition} does not exist; use 0 to {PARTITIONS - 1}")
        return f"{self._events}.{partition}.*"

    def partition_of_subject(self, subject: str) -> int | None:
        """The partition of an event subject; None for a claim or a gap."""
        head, _, rest = subject.partition(f"{self._events}.")
        return None if head or not rest else int(rest.split(".", 1)[0])

    def claim(self, scope: str) -> str:
        """The subject of a scope's claim: any scope text becomes one token."""
        return f"{self._claims}.{hashlib.sha256(scope.encode()).hexdigest()}"


def origin_of(item: StoredEvent) -> Origin | None:
    """The origin an execution's first event gives it; None if it is no ``ExecutionStarted``."""
    event = item.event
    if not isinstance(event, ExecutionStarted):
        return None
    return Origin(event.flow, event.flow_version, item.at.isoformat())


def first_origin(item: Record) -> Origin | None:
    """The origin an execution's first imported record gives it: its ``ExecutionStarted``.
    None for a record after version 1 (an export that began part way through an
    execution): the scans then refuse that execution, naming it."""
    if item.version != 1:
        return None
    return origin_of(as_stored(item.position, imported(item, None)))


def chained(
    events: Sequence[StoredEvent], prev_hash: str | None, origin: Origin | None
) -> list[Entry]:
    """The message bodies of an append's events, each hash chained to the one before."""
    entries = []
    for item in events:
        values = chained_row(item, prev_hash)  # the SQLite log's columns, in its order
        entry = Entry(*values[:5], Raw(values[5]), *values[6:], origin)  # type: ignore[arg-type]
        entries.append(entry)
        prev_hash = entry.hash
    return entries


def imported(item: Record, origin: Origin | None) -> Entry:
    """The message body of an imported record."""
    return Entry(
        item.execution_id, item.version, item.type, item.schema_version, item.at,
        item.data, item.prev_hash, item.hash, item.scope, origin,
    )  # fmt: skip


def as_stored(sequence: int, entry: Entry) -> StoredEvent:
    """The stored event a message body at ``sequence`` holds."""
    return stored_event(
        sequence, entry.execution_id, entry.version, entry.type, entry.schema_version,
        entry.at, bytes(entry.data).decode(), entry.prev_hash, entry.hash,
    )  # fmt: skip


def stored(msg: Msg) -> StoredEvent:
    """The stored event a direct get answered with."""
    return as_stored(sequence_of(msg), decode_entry(msg.data))


def as_record(msg: Msg) -> Record:
    """The record, exactly as stored, a direct get answered with."""
    entry = decode_entry(msg.data)
    return record(
        sequence_of(msg), entry.execution_id, entry.version, entry.type, entry.schema_version,
        entry.at, bytes(entry.data).decode(), entry.prev_hash, entry.hash, entry.scope,
    )  # fmt: skip


def moment(at: str, execution_id: str) -> datetime:
    """The time an event's body states."""
    try:
        return datetime.fromisoformat(at)
    except ValueError as error:
        raise StoreError(
            f"execution {execution_id} has an event stamped {at!r}, not a time; the log was "
            "damaged or edited: run evflow verify to see where",
            execution_id=execution_id,
        ) from error
