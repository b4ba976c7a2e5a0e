"""The store contract on a JetStream stream of a real nats-server (issue 7, in progress),
and what two stores on one stream, and an import from SQLite, must do.

Each ``where`` the contract opens a store in is a log of its own on the test's server
(its own stream, subjects and checkpoint bucket), as a folder is for SQLite.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import timedelta
from pathlib import Path

import nats
import pytest

from evflow.audit import verify_store
from evflow.errors import ConcurrencyError, DuplicateCommand, StoreError, Unavailable
from evflow.events import TimerStarted
from evflow.nats_cluster import NatsCluster
from evflow.nats_server import NatsServer
from evflow.partitions import new_execution_id_in, partition_of
from evflow.state import Status
from evflow.store import JetStreamLog, parse_store
from evflow.store.jetstream import JetStreamStore
from evflow.store.jetstream_layout import Layout
from evflow.store.jetstream_requests import MULTI_LAST, Message, StreamRequests
from evflow.store.jetstream_scans import _read_caught_up
from evflow.store.sqlite import SqliteStore

from .contract import T0, StoreContract, pause, resume, start, stored


class TestJetStreamStore(StoreContract):
    """The contract on JetStream."""

    @pytest.fixture(autouse=True)
    def _server(self, nats_server: NatsServer) -> None:
        self.server = nats_server

    async def open_store(self, where: Path) -> JetStreamStore:
        name = "T" + hashlib.sha256(str(where).encode()).hexdigest()[:12].upper()
        store = JetStreamStore(self.server.url, name=name)
        await store.open()
        return store


async def test_two_stores_on_one_stream_judge_appends_by_the_log(nats_server: NatsServer):
    """Two engines' stores on one stream: a head one of them remembers may be stale, and the
    stream's version check refuses the append; a scope one claimed is refused to the other."""
    one, two = JetStreamStore(nats_server.url), JetStreamStore(nats_server.url)
    await one.open()
    await two.open()
    try:
        await one.append("a", 0, [start("a")])
        theirs = await two.append("a", 1, [pause("a", 2)])

        with pytest.raises(ConcurrencyError, match="version 2, not 1"):
            await one.append("a", 1, [pause("a", 2)])
        mine = await one.append("a", 2, [resume("a", 3)])
        await one.append("b", 0, [start("b", key="k")])
        with pytest.raises(DuplicateCommand):
            await two.append("c", 0, [start("c", key="k")])

        assert mine[0].prev_hash == theirs[0].hash
        assert [s.version for s in await two.read("a")] == [1, 2, 3]
        assert await two.read("c") == []
        assert (await verify_store(two)).intact
    finally:
        await one.close()
        await two.close()


async def test_a_sqlite_export_imports_into_jetstream_as_it_was(
    nats_server: NatsServer, tmp_path: Path
):
    """An SQLite log's records, imported into JetStream, read back the same and verify."""
    source = SqliteStore(tmp_path / "evflow.db")
    await source.open()
    await source.append("a", 0, [start("a", key="k"), pause("a", 2)])
    await source.append("b", 0, [start("b")])
    await source.append("a", 2, [resume("a", 3, key="r")])
    records = await source.records()
    await source.close()
    target = JetStreamStore(nats_server.url)
    await target.open()
    try:
        await target.import_records(records)

        assert await target.records() == records
        assert (await verify_store(target)).intact
        rows = await target.list_executions()
        assert [(r.execution_id, r.flow, r.version) for r in rows] == [
            ("a", "approval", 3),
            ("b", "approval", 1),
        ]
        assert await target.unsettled() == ["b", "a"]
        with pytest.raises(DuplicateCommand):
            await target.append("c", 0, [start("c", key="k")])
        with pytest.raises(StoreError, match="not empty"):
            await target.import_records(records)
    finally:
        await target.close()


async def test_an_execution_imported_without_its_start_is_named_by_the_listing(
    nats_server: NatsServer, tmp_path: Path
):
    """An export that began part way through an execution leaves no flow for it: the
    listing refuses, naming the execution, rather than guessing."""
    source = SqliteStore(tmp_path / "evflow.db")
    await source.open()
    await source.append("a", 0, [start("a")])
    await source.append("a", 1, [pause("a", 2)])
    records = await source.records(after_position=1)
    await source.close()
    target = JetStreamStore(nats_server.url, name="PARTIAL")
    await target.open()
    try:
        await target.import_records(records)

        assert await target.unsettled() == []
        with pytest.raises(StoreError, match="execution a: its latest event does not say"):
            await target.list_executions()
    finally:
        await target.close()


async def test_a_partition_of_more_executions_than_one_read_answers_is_scanned_whole(
    nats_server: NatsServer,
):
    """nats-server answers a read of latest events for at most MULTI_LAST executions: a
    partition holding more, and the whole log, are still scanned whole and in log order."""
    crowded = 7
    ids = [new_execution_id_in({crowded}) for _ in range(MULTI_LAST + 60)]
    ids += [new_execution_id_in({other}) for other in (0, 1, 31) for _ in range(5)]
    wake = T0 + timedelta(hours=1)
    store = JetStreamStore(nats_server.url, name="CROWDED", timeout=30)
    await store.open()
    try:
        for first in range(0, len(ids), 200):
            batch = ids[first : first + 200]
            await asyncio.gather(*(store.append(e, 0, [start(e)]) for e in batch))
        waiting = ids[::3]
        for execution_id in waiting:
            await store.append(execution_id, 1, [stored(execution_id, 2, TimerStarted(1, wake))])

        running = [e for e in ids if e not in set(waiting)]
        in_crowded = [e for e in running if partition_of(e) == crowded]
        assert await store.unsettled({crowded}) == in_crowded
        assert await store.unsettled() == running
        timers = await store.pending_timers({crowded, 31})
        assert sorted(t.execution_id for t in timers) == sorted(
            e for e in waiting if partition_of(e) in {crowded, 31}
        )
        rows = await store.list_executions(limit=len(ids), status=Status.WAITING)
        assert [row.execution_id for row in rows] == waiting[::-1]
    finally:
        await store.close()


async def test_a_log_written_before_partitions_is_refused_naming_the_fix(
    nats_server: NatsServer,
):
    """A stream whose events are filed one subject per execution, as before partitions,
    is not misread: opening it says which stream, and how to move its events."""
    nc = await nats.connect(nats_server.url)
    try:
        subjects = ["old.log.ex.*", "old.log.key.*", "old.log.gap"]
        await nc.jetstream().add_stream(name="OLD_LOG", subjects=subjects, allow_direct=True)
    finally:
        await nc.close()

    for read_only in (False, True):
        store = JetStreamStore(nats_server.url, name="OLD", read_only=read_only)
        with pytest.raises(StoreError) as refused:
            await store.open()

        assert "OLD_LOG" in refused.value.message
        assert "before events were filed by partition" in refused.value.message
        assert "evflow export" in refused.value.message
        assert "nats stream rm OLD_LOG" in refused.value.message


@pytest.mark.slow
async def test_a_log_is_not_written_with_another_number_of_copies(nats_cluster: NatsCluster):
    """An engine asking for other replicas than the log keeps is refused, naming the number
    to give, rather than changing them for every engine; an auditor reading it is not."""
    made = JetStreamStore(nats_cluster.urls, name="COPIES", replicas=3)
    await made.open()
    await made.close()

    other = JetStreamStore(nats_cluster.urls, name="COPIES", replicas=1)
    with pytest.raises(StoreError) as refused:
        await other.open()
    auditor = JetStreamStore(nats_cluster.urls, name="COPIES", read_only=True)
    await auditor.open()
    await auditor.close()

    assert "COPIES_LOG keeps 3 copies, not the 1" in refused.value.message
    assert "jetstream?replicas=3" in refused.value.message


async def test_replicas_asked_of_one_server_are_refused_naming_the_fix(nats_server: NatsServer):
    store = JetStreamStore(nats_server.url, name="MANY", replicas=3)
    with pytest.raises(StoreError) as refused:
        await store.open()

    assert "MANY_LOG" in refused.value.message
    assert "jetstream?replicas=1" in refused.value.message


async def test_a_scan_takes_no_answer_from_a_replica_behind_the_leader(
    nats_server: NatsServer,
):
    """A scan reads up to the log's end as the leader holds it, and accepts an answer only
    if it holds the message there: one without it (a replica catching up, here a position
    no replica holds yet) is asked again, then refused as unavailable."""
    store = JetStreamStore(nats_server.url, name="BEHIND")
    await store.open()
    try:
        await store.append("a", 0, [start("a")])
        layout, end = Layout("BEHIND"), await store.last_position()
        wire = StreamRequests(await nats.connect(nats_server.url), store.stream, 5)
        found: dict = {}
        try:
            reached = Message(end, layout.execution("a"), b"")
            await _read_caught_up(wire, [layout.events], reached, found)
            assert list(found) == [layout.execution("a")]

            ahead = Message(end + 1, layout.execution("a"), b"")
            with pytest.raises(Unavailable, match="stay behind position"):
                await _read_caught_up(wire, [layout.events], ahead, {})
        finally:
            await wire.nc.close()
    finally:
        await store.close()


@pytest.mark.parametrize(
    "url, servers, replicas",
    [
        ("jetstream", None, 1),
        ("jetstream?replicas=3", None, 3),
        (
            "nats://a:4222, tls://b:4222,c:4222",
            ["nats://a:4222", "tls://b:4222", "nats://c:4222"],
            1,
        ),
    ],
)
def test_store_urls_name_a_jetstream_log(url: str, servers: list[str] | None, replicas: int):
    assert parse_store(url) == JetStreamLog(servers, replicas)


@pytest.mark.parametrize("url", ["jetstream?replicas=0", "jetstream?replicas=x", "jetstream?r=3"])
def test_a_bad_jetstream_option_is_refused_naming_it(url: str):
    with pytest.raises(StoreError, match="the only option is replicas, from 1 to 5"):
        parse_store(url)
