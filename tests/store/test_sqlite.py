"""The SQLite backend: the shared store contract, plus what only a SQLite file shows."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from evflow.audit import verify_store
from evflow.errors import ConcurrencyError, DuplicateCommand, StoreError
from evflow.store import migrations, open_store, sqlite_writer
from evflow.store.sqlite import SqliteStore
from evflow.store.sqlite_writer import Append
from evflow.store.writer_thread import WriterThread

from .contract import StoreContract, pause, resume, start

DB_NAME = "evflow.db"


class TestSqliteStore(StoreContract):
    """The contract on a real SQLite file in the test's temp folder."""

    async def open_store(self, where: Path) -> SqliteStore:
        store = SqliteStore(where / DB_NAME)
        await store.open()
        return store

    async def test_data_column_is_plain_json_with_a_type_tag(self, store: SqliteStore):
        """sqlite3 and json alone read an audit trail: data is JSON tagged with its type."""
        await store.append("a", 0, [start("a", key="k1"), pause("a", 2)])

        with sqlite3.connect(store.path) as db:
            rows = db.execute(
                "SELECT execution_id, version, type, data FROM events ORDER BY position"
            ).fetchall()
        db.close()

        decoded = [(e, v, t, json.loads(d)) for e, v, t, d in rows]
        assert [(e, v, t, d["type"]) for e, v, t, d in decoded] == [
            ("a", 1, "ExecutionStarted", "ExecutionStarted"),
            ("a", 2, "ExecutionPaused", "ExecutionPaused"),
        ]
        assert decoded[0][3]["flow"] == "approval"
        assert decoded[0][3]["idempotency_key"] == "k1"
        assert decoded[1][3]["outputs"] == {"approved": "bool"}

    async def test_log_is_in_wal_mode(self, store: SqliteStore):
        """The file is in WAL mode, so reads run beside the writer."""
        with sqlite3.connect(store.path) as db:
            (mode,) = db.execute("PRAGMA journal_mode").fetchone()
        db.close()

        assert mode == "wal"

    async def test_schema_version_records_the_applied_migrations(self, tmp_path: Path):
        """A new file gets a schema_version table holding the number of migrations applied."""
        store = await self.open_store(tmp_path)
        await store.close()

        assert _schema_versions(tmp_path / DB_NAME) == [len(migrations.MIGRATIONS)]

    async def test_reopen_applies_only_new_migrations(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ):
        """Reopening skips applied migrations and runs only the ones added since."""
        store = await self.open_store(tmp_path)
        await store.append("a", 0, [start("a")])
        await store.close()
        added = (*migrations.MIGRATIONS, "CREATE TABLE added_later (x INTEGER)")
        monkeypatch.setattr(migrations, "MIGRATIONS", added)

        for _ in range(2):  # a re-run of any migration would fail: its tables exist
            store = await self.open_store(tmp_path)
            events = await store.read("a")
            await store.close()

        assert [e.version for e in events] == [1]
        assert _schema_versions(tmp_path / DB_NAME) == [len(added)]
        assert _tables(tmp_path / DB_NAME) >= {"events", "schema_version", "added_later"}

    async def test_append_to_a_closed_store_raises_store_error(self, tmp_path: Path):
        """A closed log refuses appends with a StoreError naming the file."""
        store = await self.open_store(tmp_path)
        await store.close()

        with pytest.raises(StoreError) as info:
            await store.append("a", 0, [start("a")])

        assert str(tmp_path / DB_NAME) in info.value.message

    async def test_open_store_url_opens_the_sqlite_file(self, tmp_path: Path):
        """open_store('sqlite:///PATH') opens a SqliteStore on PATH."""
        store = await open_store(f"sqlite:///{tmp_path / 'by-url.db'}")
        try:
            await store.append("a", 0, [start("a")])
            assert [e.version for e in await store.read("a")] == [1]
        finally:
            await store.close()

        assert (tmp_path / "by-url.db").exists()

    async def test_open_store_refuses_other_urls(self):
        """A URL of an unsupported backend is refused with a StoreError saying what works."""
        with pytest.raises(StoreError) as info:
            await open_store("postgres://localhost/evflow")

        assert "sqlite:///" in info.value.message


class TestReadOnlySqliteStore:
    """Opened read-only, the store reads a log, even one an engine writes, and changes nothing."""

    async def test_reads_what_a_writer_appends_and_refuses_to_write(self, tmp_path: Path):
        """It sees the writer's appends; its own appends and checkpoints are refused, and
        neither the file nor its WAL changes."""
        path = tmp_path / DB_NAME
        writer = await open_store(f"sqlite:///{path}")
        await writer.append("a", 0, [start("a")])
        reader = await open_store(f"sqlite:///{path}", read_only=True)
        try:
            await writer.append("a", 1, [pause("a", 2)])
            assert [e.version for e in await reader.read("a")] == [1, 2]
            before = _file_and_wal(path)

            with pytest.raises(StoreError) as appending:
                await reader.append("a", 2, [pause("a", 3)])
            with pytest.raises(StoreError) as moving:
                await reader.save_checkpoint("outbox", 2)

            assert _file_and_wal(path) == before
            assert [e.version for e in await writer.read("a")] == [1, 2]
            assert await writer.load_checkpoint("outbox") == 0
        finally:
            await reader.close()
            await writer.close()

        assert "read-only" in appending.value.message and "appending" in appending.value.message
        assert "read-only" in moving.value.message

    async def test_a_missing_file_is_refused_and_not_created(self, tmp_path: Path):
        """No log at the path: a StoreError naming it, and no file or folder is made."""
        path = tmp_path / "nowhere" / DB_NAME

        with pytest.raises(StoreError) as info:
            await open_store(f"sqlite:///{path}", read_only=True)

        assert str(path) in info.value.message
        assert not path.parent.exists()

    async def test_a_file_that_is_no_evflow_log_is_refused(self, tmp_path: Path):
        """A SQLite file without evflow's schema is refused, named, and left unchanged."""
        path = tmp_path / "other.db"
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE things (x INTEGER)")
        db.close()
        before = path.read_bytes()

        with pytest.raises(StoreError) as info:
            await open_store(f"sqlite:///{path}", read_only=True)

        assert "not an evflow log" in info.value.message and str(path) in info.value.message
        assert path.read_bytes() == before


def _file_and_wal(path: Path) -> tuple[bytes, bytes]:
    """The bytes of a log file and of its WAL (empty when there is none)."""
    wal = path.with_name(path.name + "-wal")
    return path.read_bytes(), wal.read_bytes() if wal.exists() else b""


def _schema_versions(path: Path) -> list[int]:
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT version FROM schema_version").fetchall()
    db.close()
    return [row[0] for row in rows]


def _tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    db.close()
    return {row[0] for row in rows}


async def test_a_row_the_batch_checks_did_not_foresee_fails_its_append_alone(tmp_path: Path):
    """The writer judges a batch's appends together and inserts them in one statement; if
    the database still refuses a row, the batch is written again one append at a time, and
    only the append at fault fails. (The store refuses such a stray event before the writer;
    here the writer gets it directly.)"""
    path = tmp_path / DB_NAME
    store = SqliteStore(path)
    await store.open()
    await store.append("x", 0, [start("x")])
    await store.close()
    db = sqlite_writer.connect(path, "FULL")

    try:
        stray = Append("y", 0, [start("x")])  # x's version 1, which the log holds
        batch = [Append("a", 0, [start("a")]), stray, Append("b", 0, [start("b")])]
        before, outcomes = sqlite_writer.commit(db, batch)
    finally:
        db.close()

    assert before == 1
    assert isinstance(outcomes[1], ConcurrencyError)
    store = SqliteStore(path, read_only=True)
    await store.open()
    try:
        landed = [*outcomes[0], *outcomes[2]]  # type: ignore[misc]
        assert await store.read_all(1, 10) == landed
        assert [(s.execution_id, s.version) for s in landed] == [("a", 1), ("b", 1)]
    finally:
        await store.close()


async def test_a_refusal_in_a_later_insert_undoes_the_rows_of_those_before(tmp_path: Path):
    """A batch of more rows than one INSERT takes is several statements. When a later one is
    refused, the rows of those before it must not stay in the transaction: each append then
    either lands and is told so, or does not land."""
    path = tmp_path / DB_NAME
    store = SqliteStore(path)
    await store.open()
    await store.append("first", 0, [start("first", key="k")])
    await store.close()
    db = sqlite_writer.connect(path, "FULL")

    try:
        size = sqlite_writer._ROWS_PER_INSERT
        batch = [Append(f"e{i}", 0, [start(f"e{i}")]) for i in range(size)]
        batch.append(Append("twin", 0, [start("twin", key="k")]))  # in the second INSERT
        _, outcomes = sqlite_writer.commit(db, batch)
    finally:
        db.close()

    assert all(isinstance(outcome, list) for outcome in outcomes[:size])
    assert isinstance(outcomes[size], DuplicateCommand)
    with sqlite3.connect(path) as check:
        (rows,) = check.execute(
            "SELECT count(*) FROM events WHERE execution_id LIKE 'e%'"
        ).fetchone()
    assert rows == size


async def test_heads_another_writer_moved_are_read_from_the_log(tmp_path: Path):
    """The writer remembers the heads of executions it appended to. When another writer on
    the file moves one on, an append that expects the old head is refused by the log, and
    one that expects the new head is chained to it."""
    path = tmp_path / DB_NAME
    one, two = SqliteStore(path), SqliteStore(path)
    await one.open()
    await two.open()
    try:
        await one.append("a", 0, [start("a")])
        theirs = await two.append("a", 1, [pause("a", 2)])

        with pytest.raises(ConcurrencyError):
            await one.append("a", 1, [pause("a", 2)])
        mine = await one.append("a", 2, [resume("a", 3)])

        assert mine[0].prev_hash == theirs[0].hash
        assert [s.version for s in await one.read("a")] == [1, 2, 3]
        assert (await verify_store(one)).intact
    finally:
        await one.close()
        await two.close()


async def test_an_append_during_close_is_refused_not_left_hanging(tmp_path: Path):
    """An append that arrives while the store closes (a command that outlived the shutdown,
    a timer firing) is refused at once: no caller waits on it forever."""
    store = SqliteStore(tmp_path / DB_NAME)
    await store.open()
    closing = asyncio.create_task(store.close())
    await asyncio.sleep(0)  # close has begun: the writer is stopping

    with pytest.raises(StoreError, match="closed"):
        await asyncio.wait_for(store.append("late", 0, [start("late")]), 5)
    await closing


async def test_what_reaches_the_writer_after_its_stop_is_refused(tmp_path: Path):
    """A request queued behind the writer's stop is answered with a refusal when the thread
    ends, and one submitted after that is refused at once."""
    writer = WriterThread(tmp_path / DB_NAME, "FULL", lambda *_: None)
    await writer.start()
    stopping = asyncio.create_task(writer.stop())
    await asyncio.sleep(0)  # the stop is queued
    late = Append("late", 0, [start("late")])

    writer.submit(late)
    await stopping

    with pytest.raises(StoreError, match="nothing was written"):
        await asyncio.wait_for(late.done, 5)
    with pytest.raises(StoreError, match="closed"):
        writer.submit(Append("later", 0, [start("later")]))
