"""The SQLite log's schema: its migrations, applied in order when the file is opened.

``schema_version`` holds how many migrations a file has had. A migration is never edited
once released; a change is a new migration at the end.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiosqlite

from ..chain import link_hash
from ..errors import StoreError

logger = logging.getLogger(__name__)

Query = Callable[..., Awaitable[list[sqlite3.Row]]]
"""Runs one read and returns its rows."""

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
    """
    ALTER TABLE events ADD COLUMN prev_hash TEXT;
    ALTER TABLE events ADD COLUMN hash TEXT;
    """,
)
"""Schema changes in order; ``schema_version`` holds how many have been applied."""

CHAINED_FROM = 3
"""The migration after which events carry hashes; older rows are chained when it runs."""


async def migrate(db: aiosqlite.Connection) -> None:
    """Bring the schema up to date in one transaction; a new file gets every migration."""
    await db.execute("BEGIN IMMEDIATE")
    await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    async with db.execute("SELECT version FROM schema_version") as cursor:
        row = await cursor.fetchone()
    applied = row[0] if row else 0
    for script in MIGRATIONS[applied:]:
        for statement in filter(str.strip, script.split(";")):
            await db.execute(statement)
    if 0 < applied < CHAINED_FROM <= len(MIGRATIONS):
        await _chain_existing(db)
    if row is None:
        await db.execute("INSERT INTO schema_version VALUES (?)", (len(MIGRATIONS),))
    else:
        await db.execute("UPDATE schema_version SET version = ?", (len(MIGRATIONS),))
    await db.execute("COMMIT")


async def _chain_existing(db: aiosqlite.Connection) -> None:
    """Hash the events written before the log was chained, in one pass per execution.

    This runs once, inside the migration's transaction, and reads the whole log: a large
    log written by an older evflow takes a while to open the first time.
    """
    previous: tuple[str, str | None] = ("", None)
    async with db.execute(
        "SELECT position, execution_id, version, type, schema_version, at, data FROM events"
        " ORDER BY execution_id, version"
    ) as cursor:
        rows = await cursor.fetchall()
    for position, execution_id, version, type_, schema_version, at, data in rows:
        prev = previous[1] if previous[0] == execution_id else None
        digest = link_hash(execution_id, version, type_, schema_version, at, data, prev)
        await db.execute(
            "UPDATE events SET prev_hash = ?, hash = ? WHERE position = ?",
            (prev, digest, position),
        )
        previous = (execution_id, digest)
    logger.info("chained %d events written before the log was hash-chained", len(rows))


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
    if version > len(MIGRATIONS):
        raise StoreError(
            f"the SQLite log at {path} has schema version {version}, newer than the "
            f"{len(MIGRATIONS)} this evflow reads; use the evflow that wrote it"
        )
