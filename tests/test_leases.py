"""Partition leases on a real nats-server: engines share the partitions evenly, never hold
one twice, take a dead engine's partitions only after its lease term, and a holder that
stalled past its term is told it lost them.

Time is a hand-moved clock and each round is run by hand, so the terms are exact."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NATS

from evflow.leases import TERM, Leases
from evflow.nats_server import NatsServer
from evflow.partitions import PARTITIONS


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Holder:
    """Records what the leases told it, as an engine would act on it."""

    def __init__(self) -> None:
        self.held: set[int] = set()
        self.told: list[tuple[str, int]] = []

    async def gained(self, partition: int) -> None:
        assert partition not in self.held
        self.held.add(partition)
        self.told.append(("gained", partition))

    async def lost(self, partition: int) -> None:
        self.held.discard(partition)
        self.told.append(("lost", partition))

    async def release(self, partition: int) -> None:
        self.held.discard(partition)
        self.told.append(("release", partition))


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    connection = await nats.connect(nats_server.url, max_reconnect_attempts=-1)
    yield connection
    with contextlib.suppress(ConnectionError):  # a test restarted the server under it
        await connection.close()


async def engine(nc: NATS, name: str, clock: Clock) -> tuple[Leases, Holder]:
    holder = Holder()
    leases = Leases(nc, "TEST_LEASES", 1, name, holder, clock=clock, timeout=1.0)
    await leases.open()
    return leases, holder


async def rounds(*engines: Leases, times: int = 3) -> None:
    for _ in range(times):
        for leases in engines:
            await leases.tick()


def no_partition_twice(*holders: Holder) -> None:
    counted = sum(len(h.held) for h in holders)
    assert counted == len(set().union(*(h.held for h in holders)))


async def test_engines_share_the_partitions_evenly_and_never_hold_one_twice(nc: NATS):
    clock = Clock()
    a, held_a = await engine(nc, "a", clock)
    b, held_b = await engine(nc, "b", clock)
    c, held_c = await engine(nc, "c", clock)

    await rounds(a)
    alone = set(held_a.held)
    await rounds(a, b, c, times=4)

    assert alone == set(range(PARTITIONS))  # alone, it takes them all at once
    no_partition_twice(held_a, held_b, held_c)
    assert held_a.held | held_b.held | held_c.held == set(range(PARTITIONS))
    assert sorted(len(h.held) for h in (held_a, held_b, held_c)) == [10, 11, 11]
    assert a.held == frozenset(held_a.held) and b.held == frozenset(held_b.held)
    let_go = [p for kind, p in held_a.told if kind == "release"]
    assert len(let_go) == PARTITIONS - len(held_a.held)  # drained, then let go


async def test_a_stopping_engine_lets_go_and_the_other_takes_over_at_once(nc: NATS):
    clock = Clock()
    a, held_a = await engine(nc, "a", clock)
    b, held_b = await engine(nc, "b", clock)
    await rounds(a, b, times=4)
    before = set(held_a.held)

    await a.stop()
    await rounds(b, times=2)  # no time passes

    assert before and not held_a.held
    assert held_b.held == set(range(PARTITIONS))


async def test_a_dead_engines_partitions_wait_out_the_term_then_pass_on(nc: NATS):
    clock = Clock()
    a, held_a = await engine(nc, "a", clock)
    b, held_b = await engine(nc, "b", clock)
    await rounds(a, b, times=4)
    dead = set(held_a.held)  # a dies: it renews no more

    clock.now += TERM - 0.5
    await rounds(b)
    early = set(held_b.held)
    clock.now += 1.0
    await rounds(b)

    assert dead and not (early & dead)  # not one taken before the term
    assert held_b.held == set(range(PARTITIONS))


async def test_an_overtaken_holder_is_told_it_lost_the_partitions(nc: NATS):
    """A holder that stalled past the term (a long pause) finds its leases taken: it is
    told, and never renews over the new holder."""
    clock = Clock()
    a, held_a = await engine(nc, "a", clock)
    b, held_b = await engine(nc, "b", clock)
    await rounds(a, b, times=4)
    stalled = set(held_a.held)

    clock.now += TERM + 1
    await rounds(b)
    await rounds(a, b, times=4)

    assert {p for kind, p in held_a.told if kind == "lost"} >= stalled
    no_partition_twice(held_a, held_b)
    assert held_a.held | held_b.held == set(range(PARTITIONS))
