"""The SQLite log's writes, each run whole on the writer's own thread.

A batch of appends and checkpoint moves is one transaction, and one call into the writer's
thread: every statement in it runs there back to back, with no hop to the event loop in
between. (Through aiosqlite, each statement was a round trip between threads, and those
round trips, not the disk, bounded appends at about a thousand a second.)
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from msgspec.structs import replace

from ..errors import ConcurrencyError, DuplicateCommand, StoreError
from ..events import StoredEvent
from .rows import chained_row

Outcome = list[StoredEvent] | ConcurrencyError | DuplicateCommand | None
"""What one request of a batch came to: the stored events of an append, its refusal, or
None for a checkpoint move."""

_INSERT = (
    "INSERT INTO events (execution_id, version, type, schema_version, at, data, prev_hash,"
    " hash, idempotency_scope) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


class Append:
    """One append waiting for the writer; the writer's thread reads only its fields."""

    __slots__ = ("execution_id", "expected_version", "events", "done")

    def __init__(self, execution_id: str, expected_version: int, events: Sequence[StoredEvent]):
        self.execution_id = execution_id
        self.expected_version = expected_version
        self.events = events
        self.done: asyncio.Future[list[StoredEvent]] = asyncio.get_running_loop().create_future()


class Checkpoint:
    """One checkpoint move waiting for the writer; it rides in the next append batch."""

    __slots__ = ("name", "position", "done")

    def __init__(self, name: str, position: int):
        self.name = name
        self.position = position
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()


def connect(path: Path, synchronous: str) -> sqlite3.Connection:
    """The writer's connection; call it on the thread that will use it."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.execute("PRAGMA busy_timeout=10000")
    except BaseException:
        db.close()  # a file that is no database fails here, after connecting
        raise
    return db


def commit(
    db: sqlite3.Connection, batch: Sequence[Append | Checkpoint]
) -> tuple[int, list[Outcome]]:
    """Run a batch as one transaction, each append in its own savepoint so that one clash
    or duplicate leaves the others in the batch.

    Returns the log's last position before the batch, read inside the transaction (so no
    other writer comes between it and the batch's rows), and each request's outcome.
    """
    outcomes: list[Outcome] = []
    db.execute("BEGIN IMMEDIATE")
    try:
        before = db.execute("SELECT coalesce(max(position), 0) FROM events").fetchone()[0]
        for request in batch:
            if isinstance(request, Append):
                outcomes.append(_append(db, request))
            else:
                _move_checkpoint(db, request)
                outcomes.append(None)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return before, outcomes


def _append(db: sqlite3.Connection, request: Append) -> Outcome:
    db.execute("SAVEPOINT one_append")
    try:
        stored = _insert(db, request)
    except (ConcurrencyError, DuplicateCommand) as refused:
        db.execute("ROLLBACK TO one_append")
        db.execute("RELEASE one_append")
        return refused
    db.execute("RELEASE one_append")
    return stored


def _move_checkpoint(db: sqlite3.Connection, request: Checkpoint) -> None:
    """Move a checkpoint forward; it never moves back, whoever writes it."""
    db.execute(
        "INSERT INTO checkpoints (name, position) VALUES (?, ?) ON CONFLICT (name)"
        " DO UPDATE SET position = max(position, excluded.position)",
        (request.name, request.position),
    )


def _insert(db: sqlite3.Connection, request: Append) -> list[StoredEvent]:
    execution_id = request.execution_id
    row = db.execute(
        "SELECT version, hash FROM events WHERE execution_id = ? ORDER BY version DESC LIMIT 1",
        (execution_id,),
    ).fetchone()
    current, prev_hash = row or (0, None)
    if current != request.expected_version:
        raise ConcurrencyError(
            f"execution {execution_id} is at version {current}, not "
            f"{request.expected_version}: another writer appended first; re-read it",
            execution_id=execution_id,
            version=current,
        )

    stored = []
    for item in request.events:
        values = chained_row(item, prev_hash)
        try:
            position = db.execute(_INSERT, values).lastrowid or 0
        except sqlite3.IntegrityError as error:
            raise _refusal(item, values[-1], error) from error  # type: ignore[arg-type]
        digest = values[-2]
        stored.append(replace(item, position=position, prev_hash=prev_hash, hash=digest))
        prev_hash = digest  # type: ignore[assignment]
    return stored


def _refusal(item: StoredEvent, scope: str | None, error: sqlite3.IntegrityError) -> Exception:
    """What a refused insert means: a claimed idempotency scope, or a version taken."""
    if scope is not None and "idempotency" in str(error):
        return DuplicateCommand(
            f"idempotency scope {scope} was already claimed",
            execution_id=item.execution_id,
            scope=scope,
        )
    return ConcurrencyError(
        f"execution {item.execution_id} already has version {item.version}; re-read it",
        execution_id=item.execution_id,
    )


def import_rows(db: sqlite3.Connection, columns: str, rows: list[tuple[object, ...]]) -> None:
    """Insert exported rows as they are, in one transaction, into a log with no events."""
    db.execute("BEGIN IMMEDIATE")
    try:
        if db.execute("SELECT 1 FROM events LIMIT 1").fetchone() is not None:
            raise StoreError(
                "the log already holds events; import into a new file, for example "
                "--store sqlite:///copy.db"
            )
        if rows:
            marks = ", ".join("?" * len(rows[0]))
            db.executemany(f"INSERT INTO events ({columns}) VALUES ({marks})", rows)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
