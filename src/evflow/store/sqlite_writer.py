"""The SQLite log's writes, each run whole on the writer's own thread.

A batch of appends and checkpoint moves is one transaction, and one call into the writer's
thread: every statement in it runs there back to back, with no hop to the event loop in
between. (Through aiosqlite, each statement was a round trip between threads, and those
round trips, not the disk, bounded appends at about a thousand a second.)
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgspec
from msgspec.structs import replace

from ..errors import ConcurrencyError, DuplicateCommand, StoreError
from ..events import StoredEvent
from . import version_clash
from .rows import chained_row

Outcome = list[StoredEvent] | ConcurrencyError | DuplicateCommand | None
"""What one request of a batch came to: the stored events of an append, its refusal, or
None for a checkpoint move."""

_COLUMNS = (
    "execution_id, version, type, schema_version, at, data, prev_hash, hash, idempotency_scope"
)
_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, ?)"
_INSERT = f"INSERT INTO events ({_COLUMNS}) VALUES {_ROW}"
_ROWS_PER_INSERT = 1000
"""Rows per INSERT statement: 9,000 values, within SQLite's limit of 32,766."""


@functools.lru_cache(maxsize=_ROWS_PER_INSERT)
def _insert_sql(rows: int) -> str:
    """An INSERT of ``rows`` rows; the connection keeps each such statement prepared."""
    return f"INSERT INTO events ({_COLUMNS}) VALUES " + ", ".join([_ROW] * rows)


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


_PREPARED = 512
"""Statements the write connection keeps prepared: among them an INSERT per batch size."""


def connect(path: Path, synchronous: str) -> sqlite3.Connection:
    """The writer's connection; call it on the thread that will use it."""
    db = sqlite3.connect(path, isolation_level=None, cached_statements=_PREPARED)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.execute("PRAGMA busy_timeout=10000")
    except BaseException:
        db.close()  # a file that is no database fails here, after connecting
        raise
    return db


class Heads:
    """The latest version and hash of executions this connection appended to, so that a
    batch need not read them: a bounded cache, least recently used out.

    It is never trusted blindly. An append whose expected version disagrees with it reads
    the head from the log. One that agrees but was overtaken by another writer on the file
    inserts a version that exists, which the log's unique index refuses; the batch then
    runs one append at a time against the log itself.
    """

    def __init__(self, size: int = 65_536):
        self._heads: OrderedDict[str, tuple[int, str | None]] = OrderedDict()
        self._size = size

    def agreeing(self, execution_id: str, version: int) -> tuple[int, str | None] | None:
        """The head of an execution if it is known to be at ``version``."""
        head = self._heads.get(execution_id)
        return head if head is not None and head[0] == version else None

    def update(self, stored: list[StoredEvent]) -> None:
        """Remember where appended events leave their executions."""
        for item in stored:
            self._heads[item.execution_id] = (item.version, item.hash)
            self._heads.move_to_end(item.execution_id)
        while len(self._heads) > self._size:
            self._heads.popitem(last=False)

    def forget(self, execution_ids: Iterable[str] | None = None) -> None:
        """Forget some executions' heads, or all."""
        if execution_ids is None:
            self._heads.clear()
        for execution_id in execution_ids or ():
            self._heads.pop(execution_id, None)


def commit(
    db: sqlite3.Connection, batch: Sequence[Append | Checkpoint], known: Heads | None = None
) -> tuple[int | None, list[Outcome]]:
    """Run a batch as one transaction; returns the log's last position before the batch's
    rows (None if it wrote none), and each request's outcome.

    Every statement releases the GIL and must take it back from the event loop's thread,
    which holds it most of the time under load: a trivial statement then takes about 0.3 ms
    instead of 5 µs. So a batch is as few statements as can be, whatever its size: a read
    of the heads ``known`` does not hold (usually none: a new execution has none, and the
    connection remembers those it appended to), one INSERT of every row (prepared once per
    batch size), the COMMIT. A claimed idempotency scope, or a version another writer took,
    is refused by the log's unique indexes; the batch is then undone and runs again one
    append at a time, each in its own savepoint, so that a refusal leaves the others.
    """
    known = known if known is not None else Heads()
    appends = [request for request in batch if isinstance(request, Append)]
    db.execute("BEGIN IMMEDIATE")
    try:
        try:
            outcomes = _commit_together(db, batch, _heads(db, appends, known))
        except sqlite3.IntegrityError:
            # Undo the whole batch, not only the refused statement: a batch of more than
            # one INSERT would keep the rows of those before it.
            known.forget(request.execution_id for request in appends)
            db.execute("ROLLBACK")
            db.execute("BEGIN IMMEDIATE")
            outcomes = [_commit_alone(db, request) for request in batch]
        db.execute("COMMIT")
    except BaseException:
        known.forget(request.execution_id for request in appends)
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise

    stored = [item for outcome in outcomes if isinstance(outcome, list) for item in outcome]
    known.update(stored)
    return (stored[0].position - 1 if stored else None), outcomes


_HEADS = """
SELECT json_group_array(json_array(execution_id, version, hash)) FROM (
    -- SQLite takes a bare column from the row that holds the max(): the latest hash.
    SELECT execution_id, max(version) AS version, hash FROM events
    WHERE execution_id IN (SELECT value FROM json_each(?)) GROUP BY execution_id)
"""


def _heads(
    db: sqlite3.Connection, appends: list[Append], known: Heads
) -> dict[str, tuple[int, str | None]]:
    """The head each append is judged against: none for a new execution, else the known
    one if it agrees with the append, else the log's, read for all of those as one row."""
    heads: dict[str, tuple[int, str | None]] = {}
    unknown = []
    for request in appends:
        expected = request.expected_version
        head = (0, None) if expected == 0 else known.agreeing(request.execution_id, expected)
        if head is None:
            unknown.append(request.execution_id)
        else:
            heads.setdefault(request.execution_id, head)
    if unknown:
        (found,) = db.execute(_HEADS, (msgspec.json.encode(unknown),)).fetchone()
        heads.update({e: (v, digest) for e, v, digest in msgspec.json.decode(found)})
    return heads


def _commit_together(
    db: sqlite3.Connection,
    batch: Sequence[Append | Checkpoint],
    heads: dict[str, tuple[int, str | None]],
) -> list[Outcome]:
    outcomes: list[Outcome] = []
    rows: list[tuple[object, ...]] = []
    for request in batch:
        if isinstance(request, Checkpoint):
            _move_checkpoint(db, request)
            outcomes.append(None)
            continue
        refusal = _judge(request, heads)
        if refusal is not None:
            outcomes.append(refusal)
            continue
        rows += _chain(request, heads)
        outcomes.append([])

    positions = _insert_rows(db, rows)
    return _placed(batch, outcomes, rows, positions)


def _judge(request: Append, heads: dict[str, tuple[int, str | None]]) -> ConcurrencyError | None:
    """Why an append cannot land after the head it is judged against, if it cannot."""
    execution_id = request.execution_id
    current = heads.get(execution_id, (0, None))[0]
    if current != request.expected_version:
        return version_clash(execution_id, current, request.expected_version)
    return None


def _chain(request: Append, heads: dict[str, tuple[int, str | None]]) -> list[tuple[object, ...]]:
    """The rows of an append, each hash chained to the one before; moves the head on."""
    execution_id = request.execution_id
    prev_hash = heads.get(execution_id, (0, None))[1]
    rows = []
    for item in request.events:
        row = chained_row(item, prev_hash)
        rows.append(row)
        prev_hash = row[-2]  # type: ignore[assignment]
    heads[execution_id] = (request.events[-1].version, prev_hash)
    return rows


def _insert_rows(db: sqlite3.Connection, rows: list[tuple[object, ...]]) -> list[int]:
    """Insert ``rows`` in order; returns their positions.

    One INSERT gives its rows one position after another (this transaction holds the write
    lock), so each statement's rows end at its last row's position.
    """
    positions: list[int] = []
    for i in range(0, len(rows), _ROWS_PER_INSERT):
        chunk = rows[i : i + _ROWS_PER_INSERT]
        values = [value for row in chunk for value in row]
        last = db.execute(_insert_sql(len(chunk)), values).lastrowid or 0
        positions += range(last - len(chunk) + 1, last + 1)
    return positions


def _placed(
    batch: Sequence[Append | Checkpoint],
    outcomes: list[Outcome],
    rows: list[tuple[object, ...]],
    positions: list[int],
) -> list[Outcome]:
    """The outcomes, with each landed append's events as stored: position and hashes."""
    row = 0
    for index, request in enumerate(batch):
        if not isinstance(request, Append) or outcomes[index] != []:
            continue
        stored = []
        for item in request.events:
            values = rows[row]
            stored.append(
                replace(item, position=positions[row], prev_hash=values[6], hash=values[7])
            )
            row += 1
        outcomes[index] = stored
    return outcomes


def _commit_alone(db: sqlite3.Connection, request: Append | Checkpoint) -> Outcome:
    if isinstance(request, Checkpoint):
        _move_checkpoint(db, request)
        return None
    return _append(db, request)


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
        raise version_clash(execution_id, current, request.expected_version)

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
        return _duplicate(item, scope)
    return ConcurrencyError(
        f"execution {item.execution_id} already has version {item.version}; re-read it",
        execution_id=item.execution_id,
    )


def _duplicate(item: StoredEvent, scope: str) -> DuplicateCommand:
    return DuplicateCommand(
        f"idempotency scope {scope} was already claimed",
        execution_id=item.execution_id,
        scope=scope,
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
