"""Engines on a JetStream log (issue 7, in progress): one engine runs the whole contract of
commands on it, and two engines on one log share its partitions: each command runs on the
engine holding its execution's partition, whichever engine it reached, and the partitions
of an engine that stops are taken over with their timers, each timer firing once."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from examples.flows import app as example_app

from evflow import App, Client, Context, Status
from evflow.audit import verify_store
from evflow.commands import Invoke
from evflow.nats_server import NatsServer
from evflow.outbox import Outbox
from evflow.partitions import PARTITIONS, partition_of
from evflow.router import PUBLISHER
from evflow.server import Server
from test_outbox import stream_ids

APPROVED = {"approved": True, "note": "fine"}


async def test_an_engine_on_a_jetstream_log_pauses_resumes_and_notifies(
    nats_server: NatsServer,
):
    server = Server(example_app, "jetstream", nats_server.url)
    await server.start()
    client = await Client.connect(nats_server.url)
    try:
        notes = await client.nc.subscribe("evflow.events.approval.>")
        paused = await client.invoke("approval", {"amount": 5, "requester": "ann"})
        done = await client.resume("approval", paused.execution_id, APPROVED)

        assert (type(paused).__name__, type(done).__name__) == ("Paused", "Completed")
        history = await client.history(paused.execution_id)
        assert [type(s.event).__name__ for s in history] == [
            "ExecutionStarted", "ExecutionPaused", "ExecutionResumed", "ExecutionCompleted",
        ]  # fmt: skip
        kinds = [(await notes.next_msg(timeout=5)).subject.rsplit(".", 1)[1] for _ in range(4)]
        assert kinds == ["started", "paused", "resumed", "completed"]
        assert server.store is not None and (await verify_store(server.store)).intact
    finally:
        await client.close()
        await server.stop()


def held(server: Server) -> set[int]:
    assert server.router is not None
    return server.router.held


async def until_shared(servers: list[Server]) -> None:
    """Wait until the engines hold every partition between them, each its share."""
    share = -(-PARTITIONS // len(servers))
    async with asyncio.timeout(20):
        while True:
            shares = [held(server) for server in servers]
            whole = set().union(*shares) == set(range(PARTITIONS))
            if whole and all(0 < len(s) <= share for s in shares):
                assert sum(map(len, shares)) == PARTITIONS  # no partition held twice
                return
            await asyncio.sleep(0.1)


async def until_published(outbox: Outbox, count: int) -> None:
    """Wait until the outbox has had ``count`` notifications acknowledged: subscribers may
    see a notification before the stream's acknowledgement reaches the outbox."""
    async with asyncio.timeout(10):
        while outbox.published < count:
            await asyncio.sleep(0.05)
    assert outbox.published == count


async def test_two_engines_on_one_jetstream_log_share_the_partitions(nats_server: NatsServer):
    """Each command runs where its execution's partition is held: an invoke on the engine
    that got it, a resume forwarded there from the other engine and answered hot."""
    engines = [Server(example_app, "jetstream", nats_server.url) for _ in range(2)]
    for engine in engines:
        await engine.start()
    await until_shared(engines)
    client = await Client.connect(nats_server.url)
    try:
        invoked = await asyncio.gather(
            *(client.invoke("approval", {"amount": n, "requester": "ann"}) for n in range(40))
        )
        hot = [len(engine.engine._driver.hot) for engine in engines]  # type: ignore[union-attr]
        resumed = await asyncio.gather(
            *(client.resume("approval", p.execution_id, APPROVED) for p in invoked)
        )
        again = await asyncio.gather(
            *(client.resume("approval", p.execution_id, APPROVED) for p in invoked),
            return_exceptions=True,
        )

        assert sum(hot) == 40 and min(hot) > 0  # both engines took invokes
        for engine in engines:  # each kept only executions of its own partitions
            kept = engine.engine._driver.hot._entries  # type: ignore[union-attr]
            assert {partition_of(e) for e in kept} <= held(engine)
        assert {type(r).__name__ for r in resumed} == {"Completed"}
        assert {type(error).__name__ for error in again} == {"Finished"}
        for settled in resumed:
            history = await client.history(settled.execution_id)
            assert [s.version for s in history] == [1, 2, 3, 4]
        assert (await verify_store(engines[0].store)).intact  # type: ignore[arg-type]
    finally:
        await client.close()
        for engine in engines:
            await engine.stop()


def napping_app() -> App:
    app = App()

    @app.flow("nap")
    async def nap(ctx: Context) -> str:
        await ctx.wait_for(timedelta(seconds=1))
        return "rested"

    return app


async def test_a_timer_fires_once_though_the_engine_that_set_it_stopped(
    nats_server: NatsServer,
):
    """When an engine stops, it lets go of its partitions and the other takes them over
    with their timers: each fires once."""
    engines = [Server(napping_app(), "jetstream", nats_server.url) for _ in range(2)]
    for engine in engines:
        await engine.start()
    await until_shared(engines)
    client = await Client.connect(nats_server.url)
    try:
        # The first engine sets every timer (its own invokes, not through NATS's choice).
        first = engines[0].router
        assert first is not None
        waiting = [await first.run(Invoke("nap", b"{}")) for _ in range(10)]
        assert {partition_of(w.execution_id) for w in waiting} <= held(engines[0])
        await engines[0].stop()

        async with asyncio.timeout(20):
            for settled in waiting:
                while (await client.get(settled.execution_id)).status is not Status.COMPLETED:
                    await asyncio.sleep(0.2)

        assert {w.status for w in waiting} == {Status.WAITING}
        for settled in waiting:
            kinds = [type(s.event).__name__ for s in await client.history(settled.execution_id)]
            assert kinds.count("TimerFired") == 1, kinds
    finally:
        await client.close()
        for engine in engines:
            await engine.stop()


async def test_one_outbox_publishes_for_all_engines_and_another_takes_over(
    nats_server: NatsServer,
):
    """The holder of partition 0 publishes every engine's notifications, each once; when it
    stops, the engine that takes partition 0 publishes on from the checkpoint."""
    engines = [Server(example_app, "jetstream", nats_server.url) for _ in range(2)]
    for engine in engines:
        await engine.start()
    await until_shared(engines)
    leader, other = sorted(engines, key=lambda e: PUBLISHER not in held(e))
    client = await Client.connect(nats_server.url)
    try:
        notes = await client.nc.subscribe("evflow.events.approval.>")
        first = [
            await client.invoke("approval", {"amount": n, "requester": "a"}) for n in range(20)
        ]
        assert {partition_of(p.execution_id) in held(other) for p in first} == {True, False}
        for _ in range(2 * len(first)):  # started, paused
            await notes.next_msg(timeout=10)

        assert leader.outbox is not None and other.outbox is not None
        await until_published(leader.outbox, 2 * len(first))
        assert other.outbox.published == 0
        await leader.stop()
        engines.remove(leader)
        await until_shared([other])
        for paused in first:
            await client.resume("approval", paused.execution_id, APPROVED)
        for _ in range(2 * len(first)):  # resumed, completed
            await notes.next_msg(timeout=10)

        await until_published(other.outbox, 2 * len(first))
        ids = await stream_ids(client.nc.jetstream())
        assert len(ids) == 4 * len(first) == len(set(ids))
    finally:
        await client.close()
        for engine in engines:
            await engine.stop()
