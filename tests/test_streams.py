"""The notification and command streams an engine makes, and what it says when it changes
them: on a cluster engines share them, and the one started last decides their settings."""

from __future__ import annotations

import logging

import nats
import pytest

from evflow.nats_server import NatsServer
from evflow.streams import Streams, StreamSettings
from evflow.subjects import Subjects


async def test_an_engine_changing_the_streams_settings_warns_naming_them(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
):
    nc = await nats.connect(nats_server.url)
    try:
        await Streams(nc, Subjects(), StreamSettings()).ensure()
        with caplog.at_level(logging.WARNING, logger="evflow.streams"):
            await Streams(nc, Subjects(), StreamSettings()).ensure()
            same = [r.getMessage() for r in caplog.records]
            caplog.clear()
            await Streams(nc, Subjects(), StreamSettings(events_max_age=3600)).ensure()
            changed = [r.getMessage() for r in caplog.records]
        kept = (await nc.jetstream().stream_info("EVFLOW_EVENTS")).config.max_age
    finally:
        await nc.close()

    assert same == []
    assert len(changed) == 1
    assert "stream EVFLOW_EVENTS (max_age 604800.0 -> 3600)" in changed[0]
    assert "same --replicas" in changed[0]
    assert kept == 3600
