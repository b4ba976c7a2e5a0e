"""Reading the log's tail from memory: the same events the file holds, and never fewer.

The SQLite store answers ``read_all`` from its latest commits when it can. These tests hold
it to the file: what memory gives equals what a fresh reader of the file gives, and a write
by another process, between this one's commits or after them, is never skipped.
"""

from __future__ import annotations

from pathlib import Path

from evflow.events import ExecutionCompleted, ExecutionFailed, ExecutionStarted, StoredEvent
from evflow.store.recent import RecentEvents
from evflow.store.sqlite import SqliteStore

from .contract import pause, resume, start, step, stored


async def opened(path: Path, read_only: bool = False) -> SqliteStore:
    store = SqliteStore(path, read_only=read_only)
    await store.open()
    return store


async def from_file(path: Path, after: int = 0) -> list[StoredEvent]:
    """The log after ``after`` as a new reader of the file sees it."""
    reader = await opened(path, read_only=True)
    try:
        return await reader.read_all(after, 10_000)
    finally:
        await reader.close()


async def test_events_read_from_memory_equal_those_read_from_the_file(tmp_path: Path):
    path = tmp_path / "evflow.db"
    store = await opened(path)
    odd = {"big": 1e16, "name": "zoë", "nested": [1, {"none": None}], "empty": {}}
    try:
        await store.append("a", 0, [stored("a", 1, ExecutionStarted("f", odd, 2, "key"))])
        await store.append("b", 0, [start("b"), pause("b", 2)])
        await store.append("a", 1, [step("a", 2, 1, odd), pause("a", 3, 2)])
        await store.append("a", 3, [resume("a", 4, 2), stored("a", 5, ExecutionCompleted(odd))])
        await store.append("b", 2, [stored("b", 3, ExecutionFailed("KeyError", "'x' ✗"))])

        assert store._recent is not None and store._recent.after(0, 100) is not None
        kept = await store.read_all(0, 100)
        assert kept == await from_file(path)
        assert len(kept) == 8
        assert await store.read_all(kept[2].position, 3) == kept[3:6]
    finally:
        await store.close()


async def test_a_write_by_another_process_between_commits_is_not_skipped(tmp_path: Path):
    path = tmp_path / "evflow.db"
    one, two = await opened(path), await opened(path)
    try:
        await one.append("a", 0, [start("a")])
        await two.append("b", 0, [start("b"), pause("b", 2)])
        await one.append("a", 1, [pause("a", 2)])

        everything = await one.read_all(0, 100)

        assert [(s.execution_id, s.version) for s in everything] == [
            ("a", 1),
            ("b", 1),
            ("b", 2),
            ("a", 2),
        ]
        assert everything == await from_file(path)
    finally:
        await one.close()
        await two.close()


async def test_a_write_by_another_process_after_the_last_commit_is_seen(tmp_path: Path):
    path = tmp_path / "evflow.db"
    one, two = await opened(path), await opened(path)
    try:
        mine = await one.append("a", 0, [start("a")])
        theirs = await two.append("b", 0, [start("b")])

        assert await one.read_all(mine[-1].position, 100) == theirs
    finally:
        await one.close()
        await two.close()


async def test_events_written_before_the_store_opened_come_from_the_file(tmp_path: Path):
    path = tmp_path / "evflow.db"
    earlier = await opened(path)
    await earlier.append("a", 0, [start("a"), pause("a", 2)])
    await earlier.close()

    store = await opened(path)
    try:
        await store.append("b", 0, [start("b")])

        assert [(s.execution_id, s.version) for s in await store.read_all(0, 100)] == [
            ("a", 1),
            ("a", 2),
            ("b", 1),
        ]
    finally:
        await store.close()


def test_the_oldest_events_leave_memory_and_are_then_read_from_the_file():
    def at(position: int) -> StoredEvent:
        return StoredEvent("a", position, start("a").at, start("a").event, position)

    recent = RecentEvents(end=10, size=2)
    for position in range(11, 16):
        recent.committed(position - 1, [at(position)])

    assert recent.after(10, 10) is None  # trimmed: the file answers
    assert recent.start == 13 and recent.end == 15  # past twice the size, trimmed to it
    assert [s.position for s in recent.after(13, 10) or []] == [14, 15]
    assert recent.after(15, 10) is None  # nothing newer known: the file answers
    recent.committed(20, [at(21)])  # another process wrote 16 to 20
    assert recent.after(15, 10) is None  # 16 to 20 are not kept: the file answers
    assert [s.position for s in recent.after(20, 10) or []] == [21]
