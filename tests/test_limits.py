"""Sizes: what does not fit in a NATS message is refused or announced, never a silent loss.

A command body has a limit of its own; a reply or a notification that would not fit in one
NATS message (1 MiB by default) is answered ``too_large`` or published without its event,
so one oversized execution never stops the outbox for everyone else.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from evflow import App, Context
from evflow.commands import MAX_BODY_BYTES
from evflow.nats_server import NatsServer
from evflow.server import Server
from wire import call, error, log_size, reply

BOUND = 20.0
app = App()


@app.flow("big")
async def big(ctx: Context, size: int) -> dict:
    """Pauses showing ``size`` characters: more than a NATS message holds when asked."""
    await ctx.pause(inputs={"blob": "x" * size}, outputs={"ok": bool})
    return {"done": True}


@app.flow("small")
async def small(ctx: Context, note: str = "") -> dict:
    """Pauses showing its note."""
    answer = await ctx.pause(inputs={"note": note}, outputs={"ok": bool})
    return {"ok": answer["ok"]}


@pytest.fixture
async def server(nats_server: NatsServer, store_url: str) -> AsyncIterator[Server]:
    async with Server(app, store_url, nats_server.url) as running:
        yield running


@pytest.fixture
async def nc(nats_server: NatsServer, server: Server) -> AsyncIterator[NATS]:
    connection = await nats.connect(nats_server.url)
    yield connection
    await connection.drain()


async def test_a_body_over_the_limit_is_too_large_and_appends_nothing(
    nc: NATS, server: Server
) -> None:
    """An invoke body past MAX_BODY_BYTES is refused with 413, naming the limit."""
    body = json.dumps({"note": "n" * (MAX_BODY_BYTES + 1)}).encode()

    refused = error(await call(nc, "evflow.flo.small.invoke", body), 413, "too_large")

    assert refused["field"] == "body"
    assert str(MAX_BODY_BYTES) in refused["message"]
    assert await log_size(server) == 0


async def test_a_reply_too_large_for_nats_is_too_large_and_names_the_execution(
    nc: NATS, server: Server
) -> None:
    """A pause showing more than a message holds: invoke and get say 413; the log has it."""
    msg = await call(nc, "evflow.flo.big.invoke", {"size": 1_100_000})
    execution_id = (msg.headers or {})["Evflow-Execution-Id"]
    get = await call(nc, f"evflow.executions.get.{execution_id}")

    refused = error(msg, 413, "too_large")
    assert refused["execution_id"] == execution_id
    assert "the command took effect: do not send it again" in refused["message"]
    assert "ask for less" in error(get, 413, "too_large")["message"]
    assert error(get, 413, "too_large")["execution_id"] == execution_id
    assert server.engine is not None
    state = await server.engine.get(execution_id)
    assert (state.status, state.version) == ("paused", 2)


async def test_an_oversized_notification_is_announced_and_the_rest_still_flow(
    nc: NATS, server: Server
) -> None:
    """The outbox publishes a too-large pause without its event and goes on publishing."""
    received: asyncio.Queue[Msg] = asyncio.Queue()
    await nc.subscribe("evflow.events.>", cb=received.put)
    await nc.flush()

    big_id = (await call(nc, "evflow.flo.big.invoke", {"size": 1_100_000})).headers or {}
    after = reply(await call(nc, "evflow.flo.small.invoke", {"note": "after"}))
    notes = [json.loads((await asyncio.wait_for(received.get(), BOUND)).data) for _ in range(4)]

    by_id = {(n["execution_id"], n["kind"]): n for n in notes}
    oversized = by_id[(big_id["Evflow-Execution-Id"], "paused")]
    assert oversized["oversized"] is True and oversized["event"] is None
    assert oversized["resume_subject"].endswith(big_id["Evflow-Execution-Id"])
    assert by_id[(after["execution_id"], "paused")]["inputs"] == {"note": "after"}
