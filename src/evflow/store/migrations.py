"""The SQLite log's schema: its migrations, applied in order when the file is opened.

``schema_version`` holds how many migrations a file has had. A migration is never edited
once released; a change is a new migration at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiosqlite

from ..chain import link_hash
from ..errors import StoreError
from .rows import Query

logger = logging.getLogger(__name__)


Step = Callable[[aiosqlite.Connection], Awaitable[None]]
"""A migration that needs more than SQL statements."""


async def _chain_events(db: aiosqlite.Connection) -> None:
    """Add the hash chain's columns if missing, and chain every event that has no hash.

    A log written before the chain existed is chained whole, once; a log that an older
    evflow wrote to after a newer one had chained it (a rollback of a deploy) gets its
    unhashed events chained after the hashed ones it finds, which are kept as they are.
    This reads the whole log, inside the migration's transaction: a large log takes a while
    to open the first time.
    """
    async with db.execute("PRAGMA table_info(events)") as cursor:
        columns = {row[1] for row in await cursor.fetchall()}
    for column in ("prev_hash", "hash"):
        if column not in columns:
            await db.execute(f"ALTER TABLE events ADD COLUMN {column} TEXT")

    async with db.execute(
        "SELECT position, execution_id, version, type, schema_version, at, data, hash"
        " FROM events ORDER BY execution_id, version"
    ) as cursor:
        rows = await cursor.fetchall()
    previous: tuple[str, str | None] = ("", None)
    chained = 0
    for position, execution_id, version, type_, schema_version, at, data, digest in rows:
        prev = previous[1] if previous[0] == execution_id else None
        if digest is None:
            digest = link_hash(execution_id, version, type_, schema_version, at, data, prev)
            await db.execute(
                "UPDATE events SET prev_hash = ?, hash = ? WHERE position = ?",
                (prev, digest, position),
            )
            chained += 1
        previous = (execution_id, digest)
    if chained:
        logger.warning("hash-chained %d events that were written without a hash", chained)


MIGRATIONS: tuple[str | Step, ...] = (
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
    _chain_events,
)
"""Schema changes in order; ``schema_version`` holds how many have been applied. A step
that an older evflow may have undone in part (by writing the old version number back)
must be safe to run again."""


async def migrate(db: aiosqlite.Connection, path: Path) -> None:
    """Bring the schema up to date in one transaction; a new file gets every migration."""
    await db.execute("BEGIN IMMEDIATE")
    try:
        await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        async with db.execute("SELECT version FROM schema_version") as cursor:
            row = await cursor.fetchone()
        applied = row[0] if row else 0
        _check_not_newer(applied, path)
        for step in MIGRATIONS[applied:]:
            await _apply(db, step)
        if row is None:
            await db.execute("INSERT INTO schema_version VALUES (?)", (len(MIGRATIONS),))
        else:
            await db.execute("UPDATE schema_version SET version = ?", (len(MIGRATIONS),))
        await db.execute("COMMIT")
    except BaseException:
        await db.execute("ROLLBACK")
        raise


async def _apply(db: aiosqlite.Connection, step: str | Step) -> None:
    if isinstance(step, str):
        for statement in filter(str.strip, step.split(";")):
            await db.execute(statement)
    else:
        await step(db)


def _check_not_newer(version: int, path: Path) -> None:
    if version > len(MIGRATIONS):
        raise StoreError(
            f"the SQLite log at {path} has schema version {version}, newer than the "
            f"{len(MIGRATIONS)} this evflow knows; use the evflow that wrote it, or a newer one"
        )


async def check_readable(query: Query, path: Path) -> None:
    """Refuse a file that is no evflow log, or one a newer evflow wrote."""
    rows = await query(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    )
    if not rows:
        raise StoreError(f"{path} is not an evflow log: it has no schema_version table")
    rows = await query("SELECT version FROM schema_version")
    version = rows[0][0] if rows else 0
    if version < len(MIGRATIONS):
        raise StoreError(
            f"the SQLite log at {path} has schema version {version}, older than this "
            f"evflow's {len(MIGRATIONS)}, and cannot be read without changing it; start "
            "`evflow serve` on it once, which migrates it (and hash-chains its events)"
        )
    _check_not_newer(version, path)
