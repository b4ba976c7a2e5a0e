"""The store contract on a JetStream stream of a real nats-server (issue 7, in progress),
and what two stores on one stream, and an import from SQLite, must do.

Each ``where`` the contract opens a store in is a log of its own on the test's server
(its own stream, subjects and checkpoint bucket), as a folder is for SQLite.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from evflow.audit import verify_store
from evflow.errors import ConcurrencyError, DuplicateCommand, StoreError
from evflow.nats_server import NatsServer
from evflow.store import JetStreamLog, parse_store
from evflow.store.jetstream import JetStreamStore
from evflow.store.sqlite import SqliteStore

from .contract import StoreContract, pause, resume, start


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
        with pytest.raises(DuplicateCommand):
            await target.append("c", 0, [start("c", key="k")])
        with pytest.raises(StoreError, match="not empty"):
            await target.import_records(records)
    finally:
        await target.close()


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
