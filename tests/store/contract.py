"""The contract every ``EventStore`` backend passes, whatever it keeps its log in.

``StoreContract`` does not start with ``Test``, so pytest does not collect it on its own;
each backend module subclasses it as ``Test<Backend>Store`` and says how to open a store.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from evflow.chain import Record, record_hash, verify
from evflow.errors import ConcurrencyError, DuplicateCommand, EvflowError
from evflow.events import (
    Event,
    ExecutionCancelled,
    ExecutionCompleted,
    ExecutionFailed,
    ExecutionPaused,
    ExecutionResumed,
    ExecutionStarted,
    PauseExpired,
    StepCompleted,
    StepFailed,
    StoredEvent,
    TimerFired,
    TimerStarted,
)
from evflow.partitions import partition_of
from evflow.state import Status, fold
from evflow.store import EventStore, ExecutionSummary, invoke_scope, resume_scope
from evflow.timers import Timer

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def stored(execution_id: str, version: int, event: Event) -> StoredEvent:
    """An event ready to append at ``version``, stamped ``version`` seconds after T0."""
    return StoredEvent(execution_id, version, T0 + timedelta(seconds=version), event)


def start(execution_id: str, flow: str = "approval", key: str | None = None) -> StoredEvent:
    """The ExecutionStarted of an execution, with an optional invoke idempotency key."""
    return stored(execution_id, 1, ExecutionStarted(flow, {"amount": 5.0}, idempotency_key=key))


def pause(execution_id: str, version: int, sequence: int = 1) -> StoredEvent:
    """A pause asking for ``approved``."""
    event = ExecutionPaused(sequence, "pause", {"n": sequence}, {"approved": "bool"}, {})
    return stored(execution_id, version, event)


def resume(
    execution_id: str, version: int, sequence: int = 1, key: str | None = None
) -> StoredEvent:
    """The answer to pause ``sequence``, with an optional resume idempotency key."""
    event = ExecutionResumed(sequence, {"approved": True}, idempotency_key=key)
    return stored(execution_id, version, event)


def step(execution_id: str, version: int, sequence: int, result: Any = None) -> StoredEvent:
    """A completed step."""
    return stored(execution_id, version, StepCompleted(sequence, f"step{sequence}", result))


def shape(events: list[StoredEvent]) -> list[tuple[str, int, Event]]:
    """What an event says and where it stands in its execution, without position or time."""
    return [(e.execution_id, e.version, e.event) for e in events]


class StoreContract(abc.ABC):
    """Behaviour shared by every backend; subclasses implement ``open_store``."""

    @abc.abstractmethod
    async def open_store(self, where: Path) -> EventStore:
        """Open (creating if needed) a store of this backend that keeps its data in ``where``.

        Opening again on the same ``where`` after ``close`` must find the same log.
        """

    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[EventStore]:
        """A fresh, open store; closed after the test."""
        store = await self.open_store(tmp_path)
        yield store
        await store.close()

    async def test_read_returns_appended_events_in_version_order(self, store: EventStore):
        """Events read back in version order, with global positions that increase."""
        first = await store.append("a", 0, [start("a"), pause("a", 2)])
        second = await store.append("a", 2, [resume("a", 3), step("a", 4, 2, {"x": 1})])

        events = await store.read("a")

        assert shape(events) == shape([start("a"), pause("a", 2), resume("a", 3)]) + [
            ("a", 4, StepCompleted(2, "step2", {"x": 1}))
        ]
        positions = [e.position for e in events]
        assert positions == sorted(positions) and len(set(positions)) == 4
        assert positions[0] > 0
        assert [e.position for e in first + second] == positions

    async def test_append_returns_events_as_stored(self, store: EventStore):
        """append hands back what read later returns: same events, times and positions."""
        appended = await store.append("a", 0, [start("a"), pause("a", 2)])

        assert appended == await store.read("a")
        assert [e.at for e in appended] == [T0 + timedelta(seconds=1), T0 + timedelta(seconds=2)]

    async def test_read_stops_at_to_version(self, store: EventStore):
        """read(to_version=n) returns versions 1..n only."""
        await store.append("a", 0, [start("a"), pause("a", 2), resume("a", 3)])

        assert [e.version for e in await store.read("a", to_version=2)] == [1, 2]
        assert [e.version for e in await store.read("a", to_version=3)] == [1, 2, 3]

    async def test_read_of_unknown_execution_is_empty(self, store: EventStore):
        """An execution that was never appended to has no events."""
        await store.append("a", 0, [start("a")])

        assert await store.read("missing") == []

    async def test_read_many_gives_each_execution_in_version_order(self, store: EventStore):
        """Several histories in one read; an execution the log lacks is left out."""
        await store.append("a", 0, [start("a")])
        await store.append("b", 0, [start("b"), pause("b", 2)])
        await store.append("a", 1, [pause("a", 2), resume("a", 3)])

        found = await store.read_many(["b", "nobody", "a", "b"])

        assert sorted(found) == ["a", "b"]
        assert found["a"] == await store.read("a") and found["b"] == await store.read("b")
        assert [s.version for s in found["a"]] == [1, 2, 3]
        assert await store.read_many([]) == {}

    async def test_read_all_follows_global_order_after_a_position(self, store: EventStore):
        """read_all interleaves executions in append order and starts after a position."""
        await store.append("a", 0, [start("a")])
        await store.append("b", 0, [start("b")])
        await store.append("a", 1, [pause("a", 2)])

        everything = await store.read_all()
        after_first = await store.read_all(after_position=everything[0].position)

        assert [(e.execution_id, e.version) for e in everything] == [("a", 1), ("b", 1), ("a", 2)]
        assert after_first == everything[1:]
        assert await store.read_all(after_position=everything[-1].position) == []

    async def test_read_all_honours_the_limit(self, store: EventStore):
        """read_all returns at most ``limit`` events, the oldest first, and pages on."""
        for name in "abcde":
            await store.append(name, 0, [start(name)])

        page = await store.read_all(limit=2)
        rest = await store.read_all(after_position=page[-1].position, limit=10)

        assert [e.execution_id for e in page] == ["a", "b"]
        assert [e.execution_id for e in rest] == ["c", "d", "e"]

    async def test_wrong_expected_version_raises_and_appends_nothing(self, store: EventStore):
        """An append expecting a stale version raises ConcurrencyError and writes nothing."""
        await store.append("a", 0, [start("a"), pause("a", 2)])
        before = await store.read_all()

        with pytest.raises(ConcurrencyError) as info:
            await store.append("a", 1, [stored("a", 2, ExecutionCompleted("late"))])

        assert info.value.execution_id == "a"
        assert await store.read_all() == before

    async def test_expecting_a_future_version_raises(self, store: EventStore):
        """An append expecting a version the execution has not reached is refused too."""
        await store.append("a", 0, [start("a")])

        with pytest.raises(ConcurrencyError):
            await store.append("a", 3, [pause("a", 4)])

        assert [e.version for e in await store.read("a")] == [1]

    async def test_appending_a_first_event_twice_raises(self, store: EventStore):
        """Two starts of one execution: the second finds version 1 taken."""
        await store.append("a", 0, [start("a")])

        with pytest.raises(ConcurrencyError):
            await store.append("a", 0, [start("a")])

        assert len(await store.read("a")) == 1

    @pytest.mark.parametrize("versions", [(2,), (1, 3), (1, 1)])
    async def test_version_gaps_are_rejected(self, store: EventStore, versions: tuple[int, ...]):
        """Events whose versions do not follow the expected one without a gap are refused."""
        events = [stored("a", v, ExecutionStarted("approval", {})) for v in versions]

        with pytest.raises(EvflowError):
            await store.append("a", 0, events)

        assert await store.read_all() == []

    async def test_events_of_another_execution_are_rejected(self, store: EventStore):
        """An append for one execution cannot slip in events that name another one.

        Otherwise the version check runs on one execution while the events land in another
        whose version nobody checked.
        """
        await store.append("a", 0, [start("a")])

        with pytest.raises(EvflowError):
            await store.append("a", 1, [pause("b", 2)])

        assert await store.read("b") == []
        assert [e.version for e in await store.read("a")] == [1]

    async def test_concurrent_appends_at_one_version_let_exactly_one_win(self, store: EventStore):
        """Two writers expecting the same version: one lands, the other gets ConcurrencyError."""
        await store.append("a", 0, [start("a")])
        done = stored("a", 2, ExecutionCompleted("first"))
        other = stored("a", 2, ExecutionCompleted("second"))

        outcomes = await asyncio.gather(
            store.append("a", 1, [done]), store.append("a", 1, [other]), return_exceptions=True
        )

        failures = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(failures) == 1 and isinstance(failures[0], ConcurrencyError)
        winner = next(o for o in outcomes if not isinstance(o, BaseException))
        events = await store.read("a")
        assert len(events) == 2 and events[1:] == winner

    async def test_invoke_key_claimed_twice_raises_duplicate(self, store: EventStore):
        """A second start with the same flow and invoke key is refused; the first is found."""
        await store.append("a", 0, [start("a", key="k1")])
        before = await store.read_all()

        with pytest.raises(DuplicateCommand):
            await store.append("b", 0, [start("b", key="k1")])

        assert await store.read_all() == before
        first = await store.find_command(invoke_scope("approval", "k1"))
        assert first is not None and first == before[0]

    async def test_invoke_keys_are_scoped_to_their_flow(self, store: EventStore):
        """The same invoke key on two different flows claims two different scopes."""
        await store.append("a", 0, [start("a", flow="approval", key="k1")])
        await store.append("b", 0, [start("b", flow="purchase", key="k1")])

        found_a = await store.find_command(invoke_scope("approval", "k1"))
        found_b = await store.find_command(invoke_scope("purchase", "k1"))
        assert found_a is not None and found_a.execution_id == "a"
        assert found_b is not None and found_b.execution_id == "b"

    async def test_resume_key_claimed_twice_raises_duplicate(self, store: EventStore):
        """A resume key used twice on one execution is refused and nothing is appended."""
        await store.append("a", 0, [start("a"), pause("a", 2), resume("a", 3, key="r")])
        await store.append("a", 3, [pause("a", 4, sequence=2)])
        before = await store.read_all()

        with pytest.raises(DuplicateCommand):
            await store.append("a", 4, [resume("a", 5, sequence=2, key="r")])

        assert await store.read_all() == before
        first = await store.find_command(resume_scope("a", "r"))
        assert first is not None and (first.version, first.event) == (3, before[2].event)

    async def test_resume_keys_are_scoped_to_their_execution(self, store: EventStore):
        """The same resume key on two executions does not collide."""
        for name in "ab":
            await store.append(name, 0, [start(name), pause(name, 2), resume(name, 3, key="r")])

        found = [await store.find_command(resume_scope(name, "r")) for name in "ab"]
        assert [f.execution_id for f in found if f is not None] == ["a", "b"]

    async def test_a_duplicate_later_in_an_append_refuses_all_of_it(self, store: EventStore):
        """An append whose last event reuses a key lands none of its events."""
        await store.append("a", 0, [start("a"), pause("a", 2), resume("a", 3, key="r")])
        await store.append("a", 3, [pause("a", 4, sequence=2)])

        with pytest.raises(DuplicateCommand):
            await store.append(
                "a", 4, [resume("a", 5, sequence=2), pause("a", 6, 3), resume("a", 7, 3, "r")]
            )

        assert [e.version for e in await store.read("a")] == [1, 2, 3, 4]

    async def test_find_command_of_an_unclaimed_scope_is_none(self, store: EventStore):
        """An idempotency scope nobody claimed is not found."""
        await store.append("a", 0, [start("a", key="k1")])

        assert await store.find_command(invoke_scope("approval", "other")) is None
        assert await store.find_command(resume_scope("a", "k1")) is None

    async def test_unsettled_lists_executions_left_running(self, store: EventStore):
        """unsettled names executions whose last event is not a settle point, oldest first."""
        await store.append("started", 0, [start("started")])
        await store.append("paused", 0, [start("paused"), pause("paused", 2)])
        await store.append("resumed", 0, [start("resumed"), pause("resumed", 2)])
        await store.append("resumed", 2, [resume("resumed", 3)])
        await store.append("stepped", 0, [start("stepped"), step("stepped", 2, 1)])
        await store.append("done", 0, [start("done"), stored("done", 2, ExecutionCompleted())])
        timer = TimerStarted(1, T0 + timedelta(hours=1))
        await store.append("waiting", 0, [start("waiting"), stored("waiting", 2, timer)])

        assert await store.unsettled() == ["started", "resumed", "stepped"]

    async def test_the_start_up_scans_keep_to_the_partitions_asked(self, store: EventStore):
        """unsettled and pending_timers name only executions of the partitions given: an
        engine that takes over a partition reads that partition's share."""
        wake = T0 + timedelta(hours=1)
        ids = [f"ex{n}" for n in range(12)]
        for execution_id in ids:
            await store.append(execution_id, 0, [start(execution_id)])
            if execution_id[-1] in "02468":
                await store.append(
                    execution_id, 1, [stored(execution_id, 2, TimerStarted(1, wake))]
                )
        asked = {partition_of(ids[0]), partition_of(ids[1]), partition_of(ids[4])}
        mine = [e for e in ids if partition_of(e) in asked]

        unsettled = await store.unsettled(asked)
        timers = await store.pending_timers(asked)

        assert unsettled == [e for e in mine if e[-1] not in "02468"]
        assert sorted(t.execution_id for t in timers) == sorted(e for e in mine if e[-1] in "02468")
        assert await store.unsettled(set()) == [] and await store.pending_timers(set()) == []

    async def test_unsettled_is_empty_for_an_empty_log(self, store: EventStore):
        """A new log has nothing to drive on."""
        assert await store.unsettled() == []

    async def test_data_survives_close_and_reopen(self, tmp_path: Path):
        """A closed and reopened store holds the same events, keys and positions."""
        store = await self.open_store(tmp_path)
        await store.append("a", 0, [start("a", key="k1"), pause("a", 2)])
        await store.append("b", 0, [start("b")])
        before = await store.read_all()
        await store.close()

        reopened = await self.open_store(tmp_path)
        try:
            assert await reopened.read_all() == before
            assert await reopened.find_command(invoke_scope("approval", "k1")) == before[0]
            appended = await reopened.append("a", 2, [resume("a", 3)])
            assert appended[0].position > before[-1].position
        finally:
            await reopened.close()

    async def test_close_lets_queued_appends_finish(self, tmp_path: Path):
        """Appends already submitted when close is called are durable after reopen."""
        store = await self.open_store(tmp_path)
        appends = [
            asyncio.ensure_future(store.append(f"x{i}", 0, [start(f"x{i}")])) for i in range(20)
        ]
        await asyncio.sleep(0)
        await store.close()
        await asyncio.gather(*appends)

        reopened = await self.open_store(tmp_path)
        try:
            assert len(await reopened.read_all()) == 20
        finally:
            await reopened.close()

    async def test_many_concurrent_appends_all_land(self, store: EventStore):
        """200 concurrent appends for different executions are all durable, one each."""
        names = [f"x{i:03}" for i in range(200)]

        results = await asyncio.gather(*(store.append(n, 0, [start(n)]) for n in names))

        assert [r[0].execution_id for r in results] == names
        everything = await store.read_all(limit=1000)
        assert sorted(e.execution_id for e in everything) == names
        assert len({e.position for e in everything}) == 200

    async def test_a_read_after_an_append_sees_it_while_other_reads_run(self, store: EventStore):
        """Every read starts from what is durable now, however many reads overlap it: a
        reader must never serve an older snapshot of the log."""
        names = [f"r{i:03}" for i in range(100)]
        await asyncio.gather(*(store.append(n, 0, [start(n)]) for n in names))
        stop = asyncio.Event()

        async def keep_reading(name: str) -> None:
            while not stop.is_set():
                await store.read(name)

        readers = [asyncio.create_task(keep_reading(n)) for n in names[:50]]
        try:
            for n in names[50:]:
                await store.append(n, 1, [pause(n, 2)])
                assert len(await store.read(n)) == 2, f"a read of {n} missed its append"
        finally:
            stop.set()
            await asyncio.gather(*readers)

    async def test_pending_timers_are_the_waits_and_deadlines_not_yet_fired(
        self, store: EventStore
    ):
        """A timer is pending while the event that started it is its execution's latest."""
        wake = T0 + timedelta(hours=1)
        deadline = T0 + timedelta(hours=2)
        timed_pause = ExecutionPaused(1, "offer", {}, {"ok": "bool"}, {}, deadline=deadline)
        await store.append(
            "waits", 0, [start("waits", "nap"), stored("waits", 2, TimerStarted(1, wake))]
        )
        await store.append("expires", 0, [start("expires"), stored("expires", 2, timed_pause)])
        await store.append("forever", 0, [start("forever"), pause("forever", 2)])
        await store.append("woke", 0, [start("woke"), stored("woke", 2, TimerStarted(1, wake))])
        await store.append("woke", 2, [stored("woke", 3, TimerFired(1))])
        await store.append("answered", 0, [start("answered"), stored("answered", 2, timed_pause)])
        await store.append("answered", 2, [resume("answered", 3)])

        timers = sorted(await store.pending_timers(), key=lambda t: t.execution_id)

        assert timers == [
            Timer(deadline, "expires", "approval", 2, 1, "deadline"),
            Timer(wake, "waits", "nap", 2, 1, "wait"),
        ]

    async def test_no_timers_are_pending_in_an_empty_log(self, store: EventStore):
        assert await store.pending_timers() == []

    async def test_one_clash_in_a_batch_does_not_undo_the_others(self, store: EventStore):
        """Among concurrent appends, a version clash fails alone; the rest land."""
        await store.append("clash", 0, [start("clash")])
        names = [f"x{i:03}" for i in range(100)]
        good = [store.append(n, 0, [start(n)]) for n in names]
        bad = store.append("clash", 0, [start("clash")])

        outcomes = await asyncio.gather(*good[:50], bad, *good[50:], return_exceptions=True)

        assert isinstance(outcomes[50], ConcurrencyError)
        assert not [o for o in outcomes[:50] + outcomes[51:] if isinstance(o, BaseException)]
        assert len(await store.read_all(limit=1000)) == 101

    async def test_one_duplicate_key_in_a_batch_does_not_undo_the_others(self, store: EventStore):
        """Among concurrent appends, a reused idempotency key fails alone; the rest land."""
        await store.append("first", 0, [start("first", key="k")])
        names = [f"x{i:03}" for i in range(100)]
        good = [store.append(n, 0, [start(n)]) for n in names]
        bad = store.append("second", 0, [start("second", key="k")])

        outcomes = await asyncio.gather(*good[:50], bad, *good[50:], return_exceptions=True)

        assert isinstance(outcomes[50], DuplicateCommand)
        assert not [o for o in outcomes[:50] + outcomes[51:] if isinstance(o, BaseException)]
        assert await store.read("second") == []
        assert len(await store.read_all(limit=1000)) == 101

    async def test_a_malformed_append_in_a_batch_does_not_undo_the_others(self, store: EventStore):
        """Among concurrent appends, one with a version gap fails alone; the rest land."""
        names = [f"x{i:03}" for i in range(100)]
        good = [store.append(n, 0, [start(n)]) for n in names]
        gap = store.append("gap", 0, [stored("gap", 2, ExecutionStarted("approval", {}))])

        outcomes = await asyncio.gather(*good[:50], gap, *good[50:], return_exceptions=True)

        assert isinstance(outcomes[50], EvflowError)
        assert not [o for o in outcomes[:50] + outcomes[51:] if isinstance(o, BaseException)]
        assert len(await store.read_all(limit=1000)) == 100

    async def test_a_checkpoint_never_saved_is_at_zero(self, store: EventStore):
        """The outbox of a new log starts from the beginning."""
        assert await store.load_checkpoint("outbox") == 0

    async def test_a_checkpoint_moves_forward_only(self, store: EventStore):
        """A saved position is loaded back; saving a lower one later leaves it where it is."""
        await store.save_checkpoint("outbox", 7)
        await store.save_checkpoint("outbox", 3)
        await store.save_checkpoint("other", 2)

        assert await store.load_checkpoint("outbox") == 7
        assert await store.load_checkpoint("other") == 2

    async def test_a_checkpoint_survives_close_and_reopen(self, tmp_path: Path):
        """A restarted engine finds its outbox where the last run left it."""
        store = await self.open_store(tmp_path)
        await store.append("a", 0, [start("a")])
        await store.save_checkpoint("outbox", 1)
        await store.close()

        reopened = await self.open_store(tmp_path)
        try:
            assert await reopened.load_checkpoint("outbox") == 1
        finally:
            await reopened.close()

    async def test_checkpoints_and_appends_share_a_batch(self, store: EventStore):
        """Checkpoint moves queued among concurrent appends land with them, in one piece."""
        names = [f"x{i:03}" for i in range(50)]
        appends = [store.append(n, 0, [start(n)]) for n in names]
        moves = [store.save_checkpoint("outbox", i) for i in range(10)]

        await asyncio.gather(*appends[:25], *moves, *appends[25:])

        assert len(await store.read_all(limit=1000)) == 50
        assert await store.load_checkpoint("outbox") == 9

    # The hash chain, export and import (see evflow.chain and evflow.audit).

    async def test_records_are_hash_chained_per_execution(self, store: EventStore):
        """Each record names its predecessor's hash and its own recomputes, across appends."""
        await store.append("a", 0, [start("a"), pause("a", 2)])
        await store.append("b", 0, [start("b")])
        await asyncio.gather(
            store.append("a", 2, [resume("a", 3)]), store.append("b", 1, [pause("b", 2)])
        )

        records = await store.records()

        assert [(r.execution_id, r.version) for r in records] == [
            (e.execution_id, e.version) for e in await store.read_all()
        ]
        chains: dict[str, list[Record]] = {}
        for record in records:
            chains.setdefault(record.execution_id, []).append(record)
        for chain in chains.values():
            assert chain[0].prev_hash is None
            assert [r.prev_hash for r in chain[1:]] == [r.hash for r in chain[:-1]]
            assert all(record_hash(r) == r.hash for r in chain)
        assert len({r.hash for r in records}) == len(records)
        assert verify(records).intact

    async def test_read_events_carry_the_hashes_of_their_records(self, store: EventStore):
        """What read returns carries the same hashes as the stored records."""
        appended = await store.append("a", 0, [start("a"), pause("a", 2)])

        records = await store.records(execution_id="a")

        assert [(e.prev_hash, e.hash) for e in await store.read("a")] == [
            (r.prev_hash, r.hash) for r in records
        ]
        assert [e.hash for e in appended] == [r.hash for r in records]

    async def test_records_page_after_a_position_and_filter_by_execution(self, store: EventStore):
        """records(after, limit, execution_id) pages in log order, of one execution if given."""
        for name in "abc":
            await store.append(name, 0, [start(name)])
        await store.append("b", 1, [pause("b", 2)])

        first = await store.records(limit=2)
        rest = await store.records(after_position=first[-1].position)
        only_b = await store.records(execution_id="b")

        assert [(r.execution_id, r.version) for r in first + rest] == [
            ("a", 1), ("b", 1), ("c", 1), ("b", 2)
        ]  # fmt: skip
        assert [(r.execution_id, r.version) for r in only_b] == [("b", 1), ("b", 2)]

    async def test_import_keeps_positions_hashes_and_keys(self, store: EventStore, tmp_path: Path):
        """Records imported into an empty store read back the same, and claim the same keys."""
        await store.append("a", 0, [start("a", key="k"), pause("a", 2)])
        await store.append("b", 0, [start("b")])
        await store.append("a", 2, [resume("a", 3, key="r")])
        records = await store.records()
        copy = await self.open_store(tmp_path / "copy")
        try:
            assert await copy.is_empty()
            await copy.import_records(records)

            assert await copy.records() == records
            assert await copy.read_all() == await store.read_all()
            assert await copy.find_command(invoke_scope("approval", "k")) is not None
            assert await copy.find_command(resume_scope("a", "r")) is not None
            appended = await copy.append("b", 1, [pause("b", 2)])
            assert appended[0].prev_hash == records[2].hash
            assert appended[0].position > records[-1].position
        finally:
            await copy.close()
        assert not await store.is_empty()

    # listing executions

    async def test_listing_describes_each_execution_by_its_first_and_latest_events(
        self, store: EventStore
    ):
        """A row carries the flow and flow version of the start, and the version, status,
        time and position of the latest event."""
        first = stored("a", 1, ExecutionStarted("purchase", {}, flow_version=3))
        await store.append("a", 0, [first, pause("a", 2)])
        await store.append("a", 2, [resume("a", 3)])
        await store.append("b", 0, [start("b")])

        rows = await store.list_executions()

        latest = (await store.read("a"))[-1]
        assert rows[1] == ExecutionSummary(
            execution_id="a",
            flow="purchase",
            flow_version=3,
            status=Status.RUNNING,
            version=3,
            started_at=T0 + timedelta(seconds=1),
            updated_at=T0 + timedelta(seconds=3),
            position=latest.position,
        )
        assert (rows[0].execution_id, rows[0].flow, rows[0].flow_version) == ("b", "approval", 1)

    async def test_listing_puts_the_most_recently_changed_first(self, store: EventStore):
        """The order follows each execution's latest event, not its start."""
        for name in "abc":
            await store.append(name, 0, [start(name)])
        await store.append("a", 1, [pause("a", 2)])

        rows = await store.list_executions()

        assert [row.execution_id for row in rows] == ["a", "c", "b"]
        positions = [row.position for row in rows]
        assert positions == sorted(positions, reverse=True)

    async def test_listing_derives_each_status_from_the_latest_event_as_the_fold_does(
        self, store: EventStore
    ):
        """Every status, reached by every kind of latest event, is listed as the fold of
        that execution's history says, and the status filter keeps exactly those."""
        histories = _histories_in_every_status()
        for name, events in histories.items():
            await store.append(name, 0, events)

        everything = await store.list_executions(limit=100)
        by_status = {
            status: {row.execution_id for row in await store.list_executions(status=status)}
            for status in Status
        }

        folded = {name: fold(events) for name, events in histories.items()}
        assert {row.execution_id: row.status for row in everything} == {
            name: state.status for name, state in folded.items() if state is not None
        }
        for status in Status:
            expected = {name for name, state in folded.items() if state and state.status is status}
            assert by_status[status] == expected, status
        assert {status for status in Status if by_status[status]} == set(Status)

    async def test_listing_filters_by_flow_and_by_flow_and_status(self, store: EventStore):
        """Only executions of the flow named, exactly, and in the status named if any."""
        await store.append("a", 0, [start("a", "approval"), pause("a", 2)])
        await store.append("b", 0, [start("b", "approval")])
        await store.append("c", 0, [start("c", "purchase"), pause("c", 2)])

        approvals = await store.list_executions(flow="approval")
        paused = await store.list_executions(flow="approval", status=Status.PAUSED)

        assert [row.execution_id for row in approvals] == ["b", "a"]
        assert [row.execution_id for row in paused] == ["a"]
        assert await store.list_executions(flow="approv") == []
        assert await store.list_executions(flow="nope", status=Status.PAUSED) == []

    async def test_listing_pages_with_the_position_of_the_last_row(self, store: EventStore):
        """Pages of ``limit`` rows, each starting before the last row of the one before,
        list every execution once, in order, and end with an empty page."""
        names = [f"x{i}" for i in range(7)]
        for name in names:
            await store.append(name, 0, [start(name)])

        pages = await _all_pages(store, limit=3)

        assert [len(page) for page in pages] == [3, 3, 1, 0]
        assert [row.execution_id for page in pages for row in page] == names[::-1]

    async def test_paging_a_snapshot_lists_each_execution_once_however_the_log_grows(
        self, store: EventStore
    ):
        """After every page, an execution already listed and one not yet listed change, and
        a new one starts. Pages of one snapshot (the log's end when paging began) list every
        execution that existed then exactly once, in its state then, and none started
        after."""
        names = [f"x{i:02}" for i in range(30)]
        for name in names:
            await store.append(name, 0, [start(name)])
        as_of = await store.last_position()
        changed: set[str] = set()
        listed: list[ExecutionSummary] = []
        before: int | None = None

        for _ in range(30):
            page = await store.list_executions(
                limit=4, before_position=before, as_of_position=as_of
            )
            if not page:
                break
            listed += page
            before = page[-1].position
            ahead = names[29 - len(listed) - 3] if len(listed) + 3 < 30 else None
            for name in filter(None, (page[0].execution_id, ahead)):
                if name not in changed:
                    await store.append(name, 1, [pause(name, 2)])
                    changed.add(name)
            await store.append(f"new{len(listed)}", 0, [start(f"new{len(listed)}")])

        assert [row.execution_id for row in listed] == names[::-1]
        assert {row.status for row in listed} == {Status.RUNNING}
        assert len(changed) > 10, "the test changed too little"
        now = await store.list_executions(limit=100)
        assert {row.execution_id for row in now if row.status is Status.PAUSED} == changed

    async def test_last_position_is_that_of_the_latest_event(self, store: EventStore):
        assert await store.last_position() == 0
        appended = await store.append("a", 0, [start("a"), pause("a", 2)])

        assert await store.last_position() == appended[-1].position

    async def test_listing_an_empty_log_gives_no_rows(self, store: EventStore):
        assert await store.list_executions() == []
        assert await store.list_executions(status=Status.RUNNING, flow="approval") == []


def _histories_in_every_status() -> dict[str, list[StoredEvent]]:
    """One history per kind of latest event, covering every status."""
    wake = T0 + timedelta(hours=1)
    timer = TimerStarted(1, wake)
    prefix = {
        "started": [],
        "resumed": [pause("resumed", 2)],
        "stepped": [stored("stepped", 2, StepCompleted(1, "s"))],
        "step_failed": [],
        "woke": [stored("woke", 2, timer)],
        "expired": [pause("expired", 2)],
        "paused": [pause("paused", 2)],
        "waiting": [stored("waiting", 2, timer)],
        "completed": [],
        "failed": [],
        "cancelled": [pause("cancelled", 2)],
    }
    latest: dict[str, Event | None] = {
        "started": None,
        "resumed": ExecutionResumed(1, {"approved": True}),
        "stepped": None,
        "step_failed": StepFailed(1, "s", "OSError", "disk full"),
        "woke": TimerFired(1),
        "expired": PauseExpired(1),
        "paused": None,
        "waiting": None,
        "completed": ExecutionCompleted({"ok": True}),
        "failed": ExecutionFailed("ValueError", "no"),
        "cancelled": ExecutionCancelled("not needed"),
    }
    histories = {}
    for name, middle in prefix.items():
        events = [start(name), *middle]
        last = latest[name]
        if last is not None:
            events.append(stored(name, len(events) + 1, last))
        histories[name] = events
    return histories


async def _all_pages(
    store: EventStore, limit: int, before: int | None = None
) -> list[list[ExecutionSummary]]:
    """Every page of the listing from ``before`` on, up to and with the first empty one."""
    pages: list[list[ExecutionSummary]] = []
    while not pages or pages[-1]:
        assert len(pages) < 100, "the pages never end"
        pages.append(await store.list_executions(limit=limit, before_position=before))
        before = pages[-1][-1].position if pages[-1] else before
        await asyncio.sleep(0)
    return pages
