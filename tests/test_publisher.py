"""The outbox's JetStream publisher against a real nats-server: each future says whether the
stream stored its message, so the outbox never moves its checkpoint past one it did not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import api

from evflow.errors import Unavailable
from evflow.nats_server import NatsServer
from evflow.publisher import StreamPublisher


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    connection = await nats.connect(nats_server.url)
    await connection.jetstream().add_stream(
        api.StreamConfig(name="NOTES", subjects=["notes.>"], duplicate_window=60)
    )
    yield connection
    await connection.close()


async def test_each_message_is_acknowledged_with_its_stream_sequence(nc: NATS):
    publisher = StreamPublisher(nc)
    await publisher.start()

    acks = [await publisher.publish(f"notes.{i}", b"{}", {"Nats-Msg-Id": str(i)}) for i in range(5)]
    again = await publisher.publish("notes.0", b"{}", {"Nats-Msg-Id": "0"})  # a duplicate

    assert await asyncio.gather(*acks) == [1, 2, 3, 4, 5]
    assert await again == 1  # the stream kept the first copy
    info = await nc.jetstream().stream_info("NOTES")
    assert info.state.messages == 5
    await publisher.close()


async def test_a_subject_no_stream_captures_fails_as_unavailable(nc: NATS):
    publisher = StreamPublisher(nc)
    await publisher.start()

    acked = await publisher.publish("elsewhere.1", b"{}", {})

    with pytest.raises(Unavailable, match="no JetStream stream"):
        await asyncio.wait_for(acked, 5)
    await publisher.close()


async def test_a_message_the_stream_refuses_fails_as_unavailable(nc: NATS):
    publisher = StreamPublisher(nc)
    await publisher.start()

    acked = await publisher.publish("notes.1", b"{}", {"Nats-Expected-Stream": "OTHER"})

    with pytest.raises(Unavailable, match="JetStream refused"):
        await asyncio.wait_for(acked, 5)
    await publisher.close()


async def test_forgotten_acknowledgements_are_cancelled(nc: NATS):
    publisher = StreamPublisher(nc)
    await publisher.start()
    acked = await publisher.publish("notes.1", b"{}", {})

    publisher.forget()

    assert acked.cancelled()
    await publisher.close()
