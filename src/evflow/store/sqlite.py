"""The SQLite log: one file, WAL, every append durable before it is acknowledged.

Appends go through one writer task. It takes every append waiting when it becomes free and
commits them in one transaction (group commit), each inside its own savepoint so that one
append's version clash does not undo the others. A lone append is committed at once: a
batch closes when the writer is free, never after a sleep. Reads use a second connection,
which WAL lets run beside the writer.

Opened ``read_only``, the store has only the reader, through SQLite's read-only mode: an
auditor's replay or export can read a log, served or not, with no way to change it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

import aiosqlite

from ..errors import ConcurrencyError, DuplicateCommand, StoreError
from ..events import SETTLING, StoredEvent, decode, encode
from ..timers import Timer
from . import check_append, idempotency_scope

logger = logging.getLogger(__name__)

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE events (
        position INTEGER PRIMARY KEY AUTOINCREMENT,
        execution_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        type TEXT NOT NULL,
        schema_version INTEGER NOT NULL,
        at TEXT NOT NULL,
        data TEXT NOT NULL,
        idempotency_scope TEXT,
        UNIQUE (execution_id, version)
    );
    CREATE UNIQUE INDEX events_idempotency ON events (idempotency_scope)
        WHERE idempotency_scope IS NOT NULL;
    """,
    """
    CREATE TABLE checkpoints (
        name TEXT PRIMARY KEY,
        position INTEGER NOT NULL
    );
    """,
)
"""Schema changes in order; ``schema_version`` holds how many have been applied."""

_SETTLING_TYPES = tuple(cls.__name__ for cls in SETTLING)
_COLUMNS = "position, execution_id, version, type, schema_version, at, data"


class _Append:
    """One append waiting for the writer."""

    __slots__ = ("execution_id", "expected_version", "events", "done")

    def __init__(self, execution_id: str, expected_version: int, events: Sequence[StoredEvent]):
        self.execution_id = execution_id
        self.expected_version = expected_version
        self.events = events
        self.done: asyncio.Future[list[StoredEvent]] = asyncio.get_running_loop().create_future()


class _Checkpoint:
    """One checkpoint move waiting for the writer; it rides in the next append batch."""

    __slots__ = ("name", "position", "done")

    def __init__(self, name: str, position: int):
        self.name = name
        self.position = position
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class SqliteStore:
    """The ``EventStore`` on one SQLite file.

    Args:
        path: the database file; its folder is created if missing.
        synchronous: SQLite's ``synchronous`` pragma. ``FULL`` (the default) makes every
            acknowledged append survive a power cut; ``NORMAL`` may lose the last
            transactions on power loss (not on a process crash) and is faster.
        read_only: open only for reading: the file must exist and hold an evflow log; no
            schema migration runs and every append or checkpoint move is refused.
    """

    def __init__(
        self, path: str | os.PathLike[str], synchronous: str = "FULL", read_only: bool = False
    ):
        self.path = Path(path)
        self.synchronous = synchronous
        self.read_only = read_only
        self._writer_db: aiosqlite.Connection | None = None
        self._reader_db: aiosqlite.Connection | None = None
        self._queue: asyncio.Queue[_Append | _Checkpoint] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Open both connections, migrate the schema and start the writer."""
        if self.read_only:
            await self._open_read_only()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._writer_db = await self._connect()
            await self._migrate(self._writer_db)
            self._reader_db = await self._connect()
        except sqlite3.Error as error:
            raise StoreError(f"cannot open the SQLite log at {self.path}: {error}") from error
        self._writer = asyncio.create_task(self._write_loop(), name="evflow-sqlite-writer")
        logger.info("opened the SQLite log at %s", self.path)

    async def _open_read_only(self) -> None:
        """Open the reader alone, in SQLite's read-only mode, on a log that must exist.

        SQLite may create the empty ``-wal`` and ``-shm`` companions of a WAL file beside
        it, to share its lock with a writer; the log itself is never written.
        """
        if not self.path.is_file():
            raise StoreError(f"there is no SQLite log at {self.path}; check the store URL")
        uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
        try:
            self._reader_db = await aiosqlite.connect(uri, uri=True, isolation_level=None)
            await self._reader_db.execute("PRAGMA busy_timeout=10000")
            await self._check_schema()
        except BaseException as error:
            await self.close()  # else the connection's thread keeps the process alive
            if isinstance(error, sqlite3.Error):
                raise StoreError(f"cannot read the SQLite log at {self.path}: {error}") from error
            raise
        logger.info("opened the SQLite log at %s read-only", self.path)

    async def _check_schema(self) -> None:
        """Refuse a file that is no evflow log, or one a newer evflow wrote."""
        rows = await self._query(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        )
        if not rows:
            raise StoreError(f"{self.path} is not an evflow log: it has no schema_version table")
        rows = await self._query("SELECT version FROM schema_version")
        version = rows[0][0] if rows else 0
        if version > len(MIGRATIONS):
            raise StoreError(
                f"the SQLite log at {self.path} has schema version {version}, newer than the "
                f"{len(MIGRATIONS)} this evflow reads; use the evflow that wrote it"
            )

    async def _connect(self) -> aiosqlite.Connection:
        db = await aiosqlite.connect(self.path, isolation_level=None)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute(f"PRAGMA synchronous={self.synchronous}")
        await db.execute("PRAGMA busy_timeout=10000")
        return db

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        await db.execute("BEGIN IMMEDIATE")
        await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        async with db.execute("SELECT version FROM schema_version") as cursor:
            row = await cursor.fetchone()
        applied = row[0] if row else 0
        for script in MIGRATIONS[applied:]:
            for statement in filter(str.strip, script.split(";")):
                await db.execute(statement)
        if row is None:
            await db.execute("INSERT INTO schema_version VALUES (?)", (len(MIGRATIONS),))
        else:
            await db.execute("UPDATE schema_version SET version = ?", (len(MIGRATIONS),))
        await db.execute("COMMIT")

    async def close(self) -> None:
        """Let queued appends finish, then close both connections."""
        if self._writer is not None:
            await self._queue.join()
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
            self._writer = None
        for db in (self._writer_db, self._reader_db):
            if db is not None:
                await db.close()
        self._writer_db = self._reader_db = None

    async def append(
        self, execution_id: str, expected_version: int, events: Sequence[StoredEvent]
    ) -> list[StoredEvent]:
        """Durably append ``events`` after ``expected_version``; see ``EventStore``."""
        self._check_open("appending")
        check_append(execution_id, expected_version, events)
        request = _Append(execution_id, expected_version, events)
        await self._queue.put(request)
        return await request.done

    async def save_checkpoint(self, name: str, position: int) -> None:
        """Durably move checkpoint ``name`` forward to ``position``; see ``EventStore``."""
        self._check_open("saving a checkpoint")
        request = _Checkpoint(name, position)
        await self._queue.put(request)
        await request.done

    async def load_checkpoint(self, name: str) -> int:
        """The position checkpoint ``name`` was saved at, 0 if never; see ``EventStore``."""
        rows = await self._query("SELECT position FROM checkpoints WHERE name = ?", (name,))
        return rows[0][0] if rows else 0

    def _check_open(self, doing: str) -> None:
        if self.read_only:
            raise StoreError(
                f"the SQLite log at {self.path} was opened read-only; {doing} is refused"
            )
        if self._writer is None:
            raise StoreError(f"the SQLite log at {self.path} is closed; open it before {doing}")

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._commit(batch)
            except Exception as error:  # the whole transaction failed: fail every append
                logger.exception("the SQLite log at %s failed to commit a batch", self.path)
                failure = StoreError(f"appending to the SQLite log at {self.path} failed: {error}")
                for request in batch:
                    if not request.done.done():
                        request.done.set_exception(failure)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _commit(self, batch: list[_Append | _Checkpoint]) -> None:
        db = self._writer_db
        assert db is not None
        outcomes: list[list[StoredEvent] | Exception | None] = []

        # Each append in its own savepoint, so one clash leaves the others in the batch.
        await db.execute("BEGIN IMMEDIATE")
        try:
            for request in batch:
                if isinstance(request, _Checkpoint):
                    outcomes.append(await self._move_checkpoint(db, request))
                    continue
                await db.execute("SAVEPOINT one_append")
                try:
                    outcomes.append(await self._insert(db, request))
                    await db.execute("RELEASE one_append")
                except (ConcurrencyError, DuplicateCommand) as refused:
                    await db.execute("ROLLBACK TO one_append")
                    await db.execute("RELEASE one_append")
                    outcomes.append(refused)
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise

        # Only now, with the transaction durable, does anyone hear about it.
        for request, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Exception):
                request.done.set_exception(outcome)
            else:
                request.done.set_result(outcome)
        logger.debug("committed %d appends in one transaction", len(batch))

    async def _move_checkpoint(self, db: aiosqlite.Connection, request: _Checkpoint) -> None:
        """Move a checkpoint forward; it never moves back, whoever writes it."""
        await db.execute(
            "INSERT INTO checkpoints (name, position) VALUES (?, ?) ON CONFLICT (name)"
            " DO UPDATE SET position = max(position, excluded.position)",
            (request.name, request.position),
        )

    async def _insert(self, db: aiosqlite.Connection, request: _Append) -> list[StoredEvent]:
        execution_id = request.execution_id
        async with db.execute(
            "SELECT coalesce(max(version), 0) FROM events WHERE execution_id = ?",
            (execution_id,),
        ) as cursor:
            (current,) = await cursor.fetchone()  # type: ignore[misc]
        if current != request.expected_version:
            raise ConcurrencyError(
                f"execution {execution_id} is at version {current}, not "
                f"{request.expected_version}: another writer appended first; re-read it",
                execution_id=execution_id,
                version=current,
            )

        return [await self._insert_one(db, item) for item in request.events]

    async def _insert_one(self, db: aiosqlite.Connection, item: StoredEvent) -> StoredEvent:
        scope = idempotency_scope(item)
        try:
            cursor = await db.execute(
                "INSERT INTO events (execution_id, version, type, schema_version, at, data,"
                " idempotency_scope) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    item.execution_id,
                    item.version,
                    type(item.event).__name__,
                    item.schema_version,
                    item.at.isoformat(),
                    encode(item.event).decode(),
                    scope,
                ),
            )
        except sqlite3.IntegrityError as error:
            if scope is not None and "idempotency" in str(error):
                raise DuplicateCommand(
                    f"idempotency scope {scope} was already claimed",
                    execution_id=item.execution_id,
                    scope=scope,
                ) from error
            raise ConcurrencyError(
                f"execution {item.execution_id} already has version {item.version}; re-read it",
                execution_id=item.execution_id,
            ) from error
        position = cursor.lastrowid
        await cursor.close()
        return StoredEvent(
            execution_id=item.execution_id,
            version=item.version,
            at=item.at,
            event=item.event,
            position=position or 0,
            schema_version=item.schema_version,
        )

    async def read(self, execution_id: str, to_version: int | None = None) -> list[StoredEvent]:
        """One execution's events in version order, up to ``to_version`` if given."""
        limit = to_version if to_version is not None else -1
        return await self._select(
            f"SELECT {_COLUMNS} FROM events WHERE execution_id = ? ORDER BY version LIMIT ?",
            (execution_id, limit),
        )

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """Events of all executions in global order, after ``after_position``."""
        return await self._select(
            f"SELECT {_COLUMNS} FROM events WHERE position > ? ORDER BY position LIMIT ?",
            (after_position, limit),
        )

    async def find_command(self, scope: str) -> StoredEvent | None:
        """The event that claimed an idempotency scope, if any."""
        rows = await self._select(
            f"SELECT {_COLUMNS} FROM events WHERE idempotency_scope = ?", (scope,)
        )
        return rows[0] if rows else None

    async def unsettled(self) -> list[str]:
        """Executions whose last event leaves them running.

        This scans the latest event of every execution: start-up cost grows with the number
        of executions in the log (to be bounded by issue 6).
        """
        marks = ",".join("?" * len(_SETTLING_TYPES))
        rows = await self._query(
            "SELECT e.execution_id FROM events e"
            " JOIN (SELECT execution_id, max(version) AS v FROM events GROUP BY execution_id) m"
            " ON e.execution_id = m.execution_id AND e.version = m.v"
            f" WHERE e.type NOT IN ({marks}) ORDER BY e.position",
            _SETTLING_TYPES,
        )
        return [row[0] for row in rows]

    async def pending_timers(self) -> list[Timer]:
        """The timers of executions whose latest event starts one; see ``EventStore``.

        Like ``unsettled``, this scans the latest event of every execution once, at start.
        Only the fields a timer needs are read, so a hundred thousand of them load in well
        under a second and leave little garbage behind.
        """
        rows = await self._query(
            "SELECT e.execution_id, e.version, e.type, json_extract(e.data, '$.sequence'),"
            " coalesce(json_extract(e.data, '$.wake_at'), json_extract(e.data, '$.deadline')),"
            " json_extract(s.data, '$.flow')"
            " FROM events e"
            " JOIN (SELECT execution_id, max(version) AS v FROM events GROUP BY execution_id) m"
            " ON e.execution_id = m.execution_id AND e.version = m.v"
            " JOIN events s ON s.execution_id = e.execution_id AND s.version = 1"
            " WHERE e.type = 'TimerStarted' OR (e.type = 'ExecutionPaused'"
            " AND json_extract(e.data, '$.deadline') IS NOT NULL)",
        )
        flows: dict[str, str] = {}
        return [
            Timer(
                due=datetime.fromisoformat(due),
                execution_id=execution_id,
                flow=flows.setdefault(flow, flow),
                version=version,
                sequence=sequence,
                kind="wait" if kind == "TimerStarted" else "deadline",
            )
            for execution_id, version, kind, sequence, due, flow in rows
        ]

    def _reader(self) -> aiosqlite.Connection:
        if self._reader_db is None:
            raise StoreError(f"the SQLite log at {self.path} is closed; open it before reading")
        return self._reader_db

    async def _query(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        """Rows of one read, run and fetched whole in one call on the reader's thread.

        A statement left open between awaits would hold the reader connection in its read
        transaction, so every other read on it would keep seeing that old snapshot of the
        WAL, missing appends committed since (a timer's firing, say). One call per read
        ends each read transaction before the next begins.
        """
        return list(await self._reader().execute_fetchall(sql, params))

    async def _select(self, sql: str, params: tuple[object, ...]) -> list[StoredEvent]:
        rows = await self._query(sql, params)
        return [
            StoredEvent(
                execution_id=execution_id,
                version=version,
                at=datetime.fromisoformat(at),
                event=decode(data),
                position=position,
                schema_version=schema_version,
            )
            for position, execution_id, version, _type, schema_version, at, data in rows
        ]
