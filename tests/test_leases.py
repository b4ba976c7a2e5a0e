"""Partition leases on a real nats-server: engines share the partitions evenly, never hold
one twice, take a dead engine's partitions only after its lease term, a holder cut off from
NATS stops acting at its fence, before another may take over, and a holder that stalled past
its term is told it lost them.

Time is a hand-moved clock and each round is run by hand, so the terms are exact. A holder
is cut off by a TCP relay between it and the nats-server that stops passing bytes on, as a
network partition does (the connection stays open; requests go unanswered)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NATS

from evflow.errors import Unavailable
from evflow.leases import FENCE, TERM, Leases
from evflow.nats_server import NatsServer
from evflow.partitions import PARTITIONS


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Holder:
    """Records what the leases told it, as an engine would act on it; ``pause`` is how long
    it takes to stop acting on a partition it lost (a subscription draining)."""

    def __init__(self, pause: float = 0.0) -> None:
        self.held: set[int] = set()
        self.told: list[tuple[str, int]] = []
        self.pause = pause
        self.stuck: set[int] = set()

    async def gained(self, partition: int) -> None:
        assert partition not in self.held
        self.held.add(partition)
        self.told.append(("gained", partition))

    async def lost(self, partition: int) -> None:
        await asyncio.sleep(self.pause)
        self.held.discard(partition)
        self.told.append(("lost", partition))

    async def release(self, partition: int) -> None:
        if partition in self.stuck:  # work that does not finish
            await asyncio.Event().wait()
        self.held.discard(partition)
        self.told.append(("release", partition))


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    connection = await nats.connect(nats_server.url, max_reconnect_attempts=-1)
    yield connection
    with contextlib.suppress(ConnectionError):  # a test restarted the server under it
        await connection.close()


class Relay:
    """A TCP relay to the nats-server that can be cut: while cut, bytes wait in it."""

    def __init__(self, target_port: int):
        self._target = target_port
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"nats://127.0.0.1:{port}"

    def cut(self) -> None:
        self._flowing.clear()

    def mend(self) -> None:
        self._flowing.set()

    async def close(self) -> None:
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        if self._server is not None:
            self._server.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self._target)
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            pump = asyncio.create_task(self._pump(source, sink))
            self._pumps.add(pump)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                await self._flowing.wait()
                sink.write(data)
                await sink.drain()
        finally:
            sink.close()


@pytest.fixture
async def cut_off(nats_server: NatsServer) -> AsyncIterator[tuple[NATS, Relay]]:
    """A connection to the nats-server through a relay the test can cut."""
    relay = Relay(nats_server.port)
    connection = await nats.connect(await relay.start(), max_reconnect_attempts=-1)
    yield connection, relay
    relay.mend()
    with contextlib.suppress(ConnectionError, TimeoutError):
        await connection.close()
    await relay.close()


async def engine(nc: NATS, name: str, clock: Clock, pause: float = 0.0) -> tuple[Leases, Holder]:
    holder = Holder(pause)
    leases = Leases(nc, "TEST_LEASES", 1, name, holder, clock=clock, timeout=1.0)
    await leases.open()
    return leases, holder


async def sharing(
    cut_off: NATS, nc: NATS, clock: Clock, pause: float = 0.0
) -> tuple[tuple[Leases, Holder], tuple[Leases, Holder]]:
    """Engine a, on the connection that can be cut, and engine b, sharing the partitions."""
    a = await engine(cut_off, "a", clock, pause)
    b = await engine(nc, "b", clock)
    await rounds(a[0], b[0], times=4)
    return a, b


async def fenced_while_cut(leases: Leases, relay: Relay, clock: Clock) -> None:
    """Cut the engine off past its fence, and run a round: its renewals go unanswered."""
    relay.cut()
    clock.now += FENCE + 0.5
    with pytest.raises((TimeoutError, Unavailable)):  # renewals unanswered; the look too
        await leases.tick()


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


async def test_a_holder_cut_off_stops_acting_at_its_fence_before_another_takes_over(
    nc: NATS, cut_off: tuple[NATS, Relay]
):
    """Cut off from NATS, a holder cannot renew: past the fence it is told it lost its
    partitions, while the term still keeps the other engine from taking them; past the term
    the other takes them, and the holder, back, does not renew over it."""
    relay, clock = cut_off[1], Clock()
    (a, held_a), (b, held_b) = await sharing(cut_off[0], nc, clock)
    cut = set(held_a.held)

    before_cut = len(held_a.told)
    await fenced_while_cut(a, relay, clock)
    fenced = set(held_a.held)
    await rounds(b)
    early = set(held_b.held)
    clock.now += TERM - FENCE
    await rounds(b)
    relay.mend()
    await rounds(a, b, times=4)

    assert cut and not fenced  # stopped acting on every one at the fence
    told_since = held_a.told[before_cut:]
    assert {p for kind, p in told_since if kind == "lost"} == cut
    assert not (early & cut)  # none taken before the term
    assert held_b.held >= cut  # taken past the term
    assert not {p for kind, p in told_since if kind == "gained"} & cut  # a renewed none of them
    no_partition_twice(held_a, held_b)
    assert held_a.held | held_b.held == set(range(PARTITIONS))


async def test_a_holder_back_before_the_term_acts_on_its_partitions_again(
    nc: NATS, cut_off: tuple[NATS, Relay]
):
    """Cut off past its fence but back before the term, a holder renews its leases, which
    no other engine could take meanwhile, and acts on its partitions again."""
    relay, clock = cut_off[1], Clock()
    (a, held_a), (b, held_b) = await sharing(cut_off[0], nc, clock)
    cut = set(held_a.held)

    await fenced_while_cut(a, relay, clock)
    fenced = set(held_a.held)
    await rounds(b)
    relay.mend()
    await rounds(a)

    assert cut and not fenced
    assert held_a.held == cut
    assert not (held_b.held & cut)
    no_partition_twice(held_a, held_b)


async def test_renewals_that_land_while_the_holder_is_being_told_it_lost_leave_it_acting(
    nc: NATS, cut_off: tuple[NATS, Relay]
):
    """Renewals sent while cut off land once the cut mends, while the fence is still
    telling the holder, one partition at a time, that it lost them: the holder ends up
    acting on every lease it holds, told of each loss before it is told it holds it again."""
    relay, clock = cut_off[1], Clock()
    (a, held_a), (b, held_b) = await sharing(cut_off[0], nc, clock, pause=0.05)
    cut = set(held_a.held)

    relay.cut()
    clock.now += FENCE + 0.5

    async def fence_then_mend() -> None:
        await asyncio.sleep(0.1)  # the renewals are on their way, into the cut
        mending = asyncio.get_running_loop().call_later(0.3, relay.mend)
        await a.fence()  # as the watchdog does, while the renewals land
        mending.cancel()

    await asyncio.gather(a.tick(), fence_then_mend(), return_exceptions=True)
    await rounds(a, b, times=3)

    assert cut and held_a.held == set(a.held) == cut
    assert not held_b.held & cut
    for partition in cut:
        told = [kind for kind, p in held_a.told if p == partition]
        assert told[-2:] == ["lost", "gained"], (partition, told)


async def test_a_stop_whose_work_does_not_drain_keeps_that_partition_to_lapse(nc: NATS):
    """Stopping, an engine lets go of the partitions whose work drained within the timeout,
    and keeps the one whose work did not: it passes on only when its lease lapses."""
    clock = Clock()
    a, held_a = await engine(nc, "a", clock)
    b, held_b = await engine(nc, "b", clock)
    await rounds(a, b, times=4)
    stuck = min(held_a.held)
    held_a.stuck.add(stuck)

    await asyncio.wait_for(a.stop(timeout=0.5), 5)
    await rounds(b, times=2)
    early = set(held_b.held)
    clock.now += TERM + 0.5
    await rounds(b, times=2)

    assert early == set(range(PARTITIONS)) - {stuck}
    assert held_b.held == set(range(PARTITIONS))
