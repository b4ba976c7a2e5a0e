"""Rows of the SQLite log turned into the engine's types: stored events and records."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from datetime import datetime

import msgspec
from msgspec import Raw

from ..chain import Record, link_hash
from ..errors import StoreError
from ..events import StoredEvent, decode, encode
from . import idempotency_scope

Query = Callable[..., Awaitable[list[sqlite3.Row]]]
"""Runs one read (SQL and its parameters) on the reader connection and returns its rows."""


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
    try:
        stamp, event = datetime.fromisoformat(at), decode(data, schema_version)
    except (ValueError, msgspec.DecodeError) as error:  # msgspec's errors are ValueErrors
        raise StoreError(
            f"execution {execution_id} version {version} cannot be read from the log "
            f"({error}); the log was damaged or edited: run evflow verify to see where",
            execution_id=execution_id,
        ) from error
    return StoredEvent(
        execution_id=execution_id,
        version=version,
        at=stamp,
        event=event,
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
    scope: str | None,
) -> Record:
    """A record, exactly as stored, from a row of the events table's columns."""
    return Record(
        position,
        execution_id,
        version,
        type_,
        schema_version,
        at,
        Raw(data),
        prev_hash,
        digest,
        scope,
    )


def chained_row(item: StoredEvent, prev_hash: str | None) -> tuple[object, ...]:
    """The values an append inserts for ``item`` after ``prev_hash``: execution_id, version,
    type, schema_version, at, data, prev_hash, hash and idempotency_scope, in that order."""
    type_, at, data = type(item.event).__name__, item.at.isoformat(), encode(item.event)
    digest = link_hash(
        item.execution_id, item.version, type_, item.schema_version, at, data, prev_hash
    )
    return (
        item.execution_id, item.version, type_, item.schema_version, at, data.decode(),
        prev_hash, digest, idempotency_scope(item),
    )  # fmt: skip
