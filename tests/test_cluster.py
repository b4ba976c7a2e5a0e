"""The three-node cluster the multi-engine tests run on behaves as a replicated log.

These tests check the fixture, not evflow: a stream with three replicas keeps every
acknowledged message when the node leading it is SIGKILLed, takes new messages once
another node leads, and the killed node catches up when it returns.
"""

from __future__ import annotations

import asyncio

import nats
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import APIError, NoStreamResponseError

from evflow.nats_cluster import NODES, NatsCluster


async def _publish_until_stored(js: nats.js.JetStreamContext, number: int) -> None:
    """Publish message ``number``, again (same message ID) until a leader stores it."""
    async with asyncio.timeout(30):
        while True:
            try:
                message_id = {"Nats-Msg-Id": f"m{number}"}
                await js.publish("probe.n", str(number).encode(), headers=message_id)
                return
            except (NatsTimeout, NoRespondersError, NoStreamResponseError, APIError):
                await asyncio.sleep(0.1)


async def _until_replicas_current(js: nats.js.JetStreamContext) -> None:
    async with asyncio.timeout(30):
        while True:
            info = await js.stream_info("PROBE")
            replicas = info.cluster.replicas if info.cluster and info.cluster.replicas else []
            if len(replicas) == NODES - 1 and all(r.current for r in replicas):
                return
            await asyncio.sleep(0.2)


async def test_a_replicated_stream_survives_the_death_of_its_leader(nats_cluster: NatsCluster):
    nc = await nats.connect(
        servers=nats_cluster.urls, reconnect_time_wait=0.1, max_reconnect_attempts=-1
    )
    js = nc.jetstream(timeout=2)
    try:
        await js.add_stream(name="PROBE", subjects=["probe.>"], num_replicas=NODES)
        for number in range(50):
            await _publish_until_stored(js, number)
        info = await js.stream_info("PROBE")
        assert info.cluster is not None and info.cluster.leader is not None
        leader = [nats_cluster.name(i) for i in range(NODES)].index(info.cluster.leader)

        nats_cluster.kill(leader)
        await nats_cluster.stop_node(leader)
        for number in range(50, 100):
            await _publish_until_stored(js, number)
        await nats_cluster.start_node(leader)
        await nats_cluster.until_ready()
        await _until_replicas_current(js)

        info = await js.stream_info("PROBE")
        assert info.state.messages == 100
        subscription = await js.subscribe("probe.n", ordered_consumer=True)
        numbers = [int((await subscription.next_msg(timeout=5)).data) for _ in range(100)]
        assert numbers == list(range(100))
    finally:
        await nc.close()
