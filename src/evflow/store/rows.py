"""Rows of the SQLite log turned into the engine's types: stored events and the idempotency
scope of an imported record."""

from __future__ import annotations

from datetime import datetime

from msgspec import Raw

from ..chain import Record
from ..events import StoredEvent, decode
from . import idempotency_scope


def scope_of(record: Record) -> str | None:
    """The idempotency scope an imported event claims, as its append would have."""
    stored = StoredEvent(
        record.execution_id, record.version, datetime.fromisoformat(record.at),
        decode(bytes(record.data), record.schema_version),
    )  # fmt: skip
    return idempotency_scope(stored)


def stored_event(
    position: int,
    execution_id: str,
    version: int,
    _type: str,
    schema_version: int,
    at: str,
    data: str,
    prev_hash: str | None,
    digest: str | None,
) -> StoredEvent:
    """A stored event from a row of ``_COLUMNS``, its event upcast to the current types."""
    return StoredEvent(
        execution_id=execution_id,
        version=version,
        at=datetime.fromisoformat(at),
        event=decode(data, schema_version),
        position=position,
        schema_version=schema_version,
        prev_hash=prev_hash,
        hash=digest,
    )


def record(
    position: int,
    execution_id: str,
    version: int,
    type_: str,
    schema_version: int,
    at: str,
    data: str,
    prev_hash: str | None,
    digest: str | None,
) -> Record:
    """A record, exactly as stored, from a row of the events table's columns."""
    return Record(
        position, execution_id, version, type_, schema_version, at, Raw(data), prev_hash, digest
    )
