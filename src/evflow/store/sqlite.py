"""The SQLite log: one file, WAL, every append durable before it is acknowledged.

Appends go through one writer thread (``writer_thread``). It takes every append waiting
when it becomes free and commits them in one transaction (group commit, ``sqlite_writer``);
a version clash refuses only the append at fault. A lone append is committed at once: a
batch closes when the writer is free, never after a sleep. Reads use a second connection,
which WAL lets run beside the writer.

Opened ``read_only``, the store has only the reader, through SQLite's read-only mode: an
auditor's replay or export can read a log, served or not, with no way to change it.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Collection, Sequence
from pathlib import Path
from urllib.parse import quote

import aiosqlite

from ..chain import Record
from ..errors import StoreError
from ..events import StoredEvent
from ..partitions import partition_of
from ..state import Status
from ..timers import Timer
from . import (
    MAX_POSITION,
    ExecutionSummary,
    check_append,
    sqlite_listing,
    sqlite_startup,
    sqlite_writer,
)
from .migrations import check_readable, migrate
from .recent import RecentEvents
from .rows import record, stored_event
from .sqlite_writer import Append, Checkpoint, Outcome
from .writer_thread import WriterThread

logger = logging.getLogger(__name__)


_COLUMNS = "position, execution_id, version, type, schema_version, at, data, prev_hash, hash"


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
        self._reader_db: aiosqlite.Connection | None = None
        self._writer: WriterThread | None = None
        self._recent: RecentEvents | None = None

    async def open(self) -> None:
        """Open both connections, migrate the schema and start the writer."""
        if self.read_only:
            await self._open_read_only()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._reader_db = await self._connect()
            await migrate(self._reader_db, self.path)
            self._recent = RecentEvents(await self.last_position())
            self._writer = WriterThread(self.path, self.synchronous, self._committed)
            await self._writer.start()
        except BaseException as error:
            await self.close()  # else a connection's thread keeps the process alive
            if isinstance(error, sqlite3.Error):
                raise StoreError(f"cannot open the SQLite log at {self.path}: {error}") from error
            raise
        logger.info("opened the SQLite log at %s", self.path)

    async def _open_read_only(self) -> None:
        """Open the reader alone, in SQLite's read-only mode, on a log that must exist.

        SQLite may create the empty ``-wal`` and ``-shm`` companions of a WAL file beside
        it, to share its lock with a writer; the log itself is never written.
        """
        if not self.path.is_file():
            raise StoreError(
                f"there is no SQLite log at {self.path}; check the --store URL (or EVFLOW_STORE)"
            )
        uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
        try:
            self._reader_db = await aiosqlite.connect(uri, uri=True, isolation_level=None)
            await self._reader_db.execute("PRAGMA busy_timeout=10000")
            await check_readable(self._query, self.path)
        except BaseException as error:
            await self.close()  # else the connection's thread keeps the process alive
            if isinstance(error, sqlite3.Error):
                raise StoreError(f"cannot read the SQLite log at {self.path}: {error}") from error
            raise
        logger.info("opened the SQLite log at %s read-only", self.path)

    async def _connect(self) -> aiosqlite.Connection:
        db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute(f"PRAGMA synchronous={self.synchronous}")
            await db.execute("PRAGMA busy_timeout=10000")
        except BaseException:
            await db.close()  # a file that is no database fails here, after connecting
            raise
        return db

    async def close(self) -> None:
        """Let queued appends finish, then close both connections."""
        if self._writer is not None:
            writer, self._writer = self._writer, None  # later appends are refused at once
            await writer.stop()
        if self._reader_db is not None:
            await self._reader_db.close()
            self._reader_db = None

    async def append(
        self, execution_id: str, expected_version: int, events: Sequence[StoredEvent]
    ) -> list[StoredEvent]:
        """Durably append ``events`` after ``expected_version``; see ``EventStore``."""
        writer = self._writing("appending")
        check_append(execution_id, expected_version, events)
        request = Append(execution_id, expected_version, events)
        writer.submit(request)
        return await request.done

    async def save_checkpoint(self, name: str, position: int) -> None:
        """Durably move checkpoint ``name`` forward to ``position``; see ``EventStore``."""
        writer = self._writing("saving a checkpoint")
        request = Checkpoint(name, position)
        writer.submit(request)
        await request.done

    async def load_checkpoint(self, name: str) -> int:
        """The position checkpoint ``name`` was saved at, 0 if never; see ``EventStore``."""
        rows = await self._query("SELECT position FROM checkpoints WHERE name = ?", (name,))
        return rows[0][0] if rows else 0

    def _writing(self, doing: str) -> WriterThread:
        """The writer, for ``doing``; refused on a read-only or closed store."""
        if self.read_only:
            raise StoreError(
                f"the SQLite log at {self.path} was opened read-only; {doing} is refused"
            )
        if self._writer is None:
            raise StoreError(f"the SQLite log at {self.path} is closed; open it before {doing}")
        return self._writer

    def _committed(
        self, before: int | None, batch: list[Append | Checkpoint], outcomes: list[Outcome]
    ) -> None:
        """On the event loop, after a commit: keep its events for readers, then answer."""
        assert self._recent is not None
        self._recent.committed(before, [e for o in outcomes if isinstance(o, list) for e in o])

        # Only now, with the transaction durable, does anyone hear about it.
        for request, outcome in zip(batch, outcomes, strict=True):
            if request.done.done():
                continue
            if isinstance(outcome, Exception):
                request.done.set_exception(outcome)
            else:
                request.done.set_result(outcome)  # type: ignore[arg-type]
        logger.debug("committed %d appends in one transaction", len(batch))

    async def read(self, execution_id: str, to_version: int | None = None) -> list[StoredEvent]:
        """One execution's events in version order, up to ``to_version`` if given."""
        limit = min(to_version, MAX_POSITION) if to_version is not None else -1
        return await self._select(
            f"SELECT {_COLUMNS} FROM events WHERE execution_id = ? ORDER BY version LIMIT ?",
            (execution_id, limit),
        )

    async def read_many(self, execution_ids: Sequence[str]) -> dict[str, list[StoredEvent]]:
        """Several executions' events at once; see ``EventStore``."""
        found: dict[str, list[StoredEvent]] = {}
        ids = list(dict.fromkeys(execution_ids))
        for start in range(0, len(ids), 500):  # within SQLite's limit of bound values
            chunk = ids[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            for stored in await self._select(
                f"SELECT {_COLUMNS} FROM events WHERE execution_id IN ({marks}) "
                "ORDER BY execution_id, version",
                tuple(chunk),
            ):
                found.setdefault(stored.execution_id, []).append(stored)
        return found

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """Events of all executions in global order, after ``after_position``; served from
        memory when they are this process's latest commits (``recent``)."""
        kept = self._recent.after(after_position, limit) if self._recent else None
        if kept is not None:
            return kept
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

    async def unsettled(self, partitions: Collection[int] | None = None) -> list[str]:
        """Executions whose last event leaves them running; see ``sqlite_startup``."""
        found = await sqlite_startup.unsettled(self._query)
        return found if partitions is None else [e for e in found if partition_of(e) in partitions]

    async def pending_timers(self, partitions: Collection[int] | None = None) -> list[Timer]:
        """The timers of executions whose latest event starts one; see ``EventStore``."""
        found = await sqlite_startup.pending_timers(self._query)
        if partitions is None:
            return found
        return [timer for timer in found if partition_of(timer.execution_id) in partitions]

    async def records(
        self, after_position: int = 0, limit: int = 1000, execution_id: str | None = None
    ) -> list[Record]:
        """Events exactly as stored, in log order after ``after_position``; see ``EventStore``."""
        where = "position > ?" + (" AND execution_id = ?" if execution_id is not None else "")
        params = (after_position,) + ((execution_id,) if execution_id is not None else ())
        rows = await self._query(
            f"SELECT {_COLUMNS}, idempotency_scope FROM events WHERE {where}"
            " ORDER BY position LIMIT ?",
            (*params, limit),
        )
        return [record(*row) for row in rows]

    async def import_records(self, records: Sequence[Record]) -> None:
        """Write ``records`` as they are, positions, hashes and scopes kept, into an empty
        log; see ``EventStore``."""
        writer = self._writing("importing")
        rows = [
            (r.position, r.execution_id, r.version, r.type, r.schema_version, r.at,
             bytes(r.data).decode(), r.prev_hash, r.hash, r.scope)
            for r in records
        ]  # fmt: skip
        columns = f"{_COLUMNS}, idempotency_scope"
        try:
            await writer.call(sqlite_writer.import_rows, columns, rows)
        except sqlite3.Error as error:
            raise StoreError(
                f"importing into the SQLite log at {self.path} failed: {error}"
            ) from error
        except StoreError as error:
            raise StoreError(f"the SQLite log at {self.path}: {error.message}") from error

    async def is_empty(self) -> bool:
        """True when the log holds no event."""
        return not await self._query("SELECT 1 FROM events LIMIT 1")

    async def list_executions(
        self,
        flow: str | None = None,
        status: Status | None = None,
        limit: int = 100,
        before_position: int | None = None,
        as_of_position: int | None = None,
    ) -> list[ExecutionSummary]:
        """The most recently changed executions first; see ``EventStore`` and
        ``sqlite_listing`` for how, and what it costs."""
        return await sqlite_listing.list_executions(
            self._query, flow, status, limit, before_position, as_of_position
        )

    async def last_position(self) -> int:
        """The position of the latest event in the log; 0 when it is empty."""
        rows = await self._query("SELECT coalesce(max(position), 0) FROM events")
        return rows[0][0]

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
        try:
            return list(await self._reader().execute_fetchall(sql, params))
        except sqlite3.Error as error:
            raise StoreError(f"reading the SQLite log at {self.path} failed: {error}") from error

    async def _select(self, sql: str, params: tuple[object, ...]) -> list[StoredEvent]:
        return [stored_event(*row) for row in await self._query(sql, params)]
