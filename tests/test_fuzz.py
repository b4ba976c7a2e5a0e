"""Bad input never hurts: random and malformed subjects, headers and bodies, by hypothesis.

One engine serves every example of a test, so "keeps serving the others" is checked by
construction; after each refused request the log must be exactly as before, and no
request may be answered with ``internal`` (the engine's word for an unexpected failure).
Durable commands are published in bulk and each must be accounted for once: run or
rejected, none stuck in the stream.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from evflow.events import ExecutionCancelled, ExecutionResumed, ExecutionStarted
from evflow.nats_server import NatsServer
from evflow.server import Server
from wire import APPROVAL, log_size

BOUND = 20.0
CODES = {
    "invalid_json", "invalid_input", "unknown_flow", "unknown_execution", "not_paused",
    "already_resumed", "finished", "expired", "nondeterminism", "too_large",
}  # fmt: skip
"""Every code a refusal of bad input may carry; ``internal`` means the engine failed."""

EXAMPLES = int(os.environ.get("EVFLOW_FUZZ_EXAMPLES", "300"))
"""Examples per fuzz test; ``ops/fuzz`` asks for more."""
counter = itertools.count()

# Subject tokens NATS lets a client publish to: no dots, wildcards, spaces or controls.
token = st.text(
    st.characters(blacklist_characters=".*> \t\r\n", blacklist_categories=("Cc", "Cs", "Zs")),
    min_size=1,
    max_size=40,
) | st.sampled_from(["approval", "purchase", "nope", "x" * 300, "$SYS", "-", "_"])

json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)
body = st.one_of(
    st.binary(max_size=200),
    json_value.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {}, optional={"amount": json_value, "requester": json_value, "approved": json_value,
                      "note": json_value, "extra": json_value}
    ).map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"", b" ", b"{", b"null", b"[]", b'{"amount": 1e999}', b"\xff\xfe",
                     b'{"amount": 1, "requester": "a", "requester": "b"}',
                     b"[" * 2000, b'{"a":' * 500]),
)  # fmt: skip
header_value = st.text(
    st.characters(blacklist_characters="\r\n:", blacklist_categories=("Cc", "Cs")),
    max_size=30,
) | st.sampled_from(["", " ", "-1", "0", "1", "99999999999999999999", "k" * 600, "1.5"])
headers = st.dictionaries(
    st.sampled_from(["Idempotency-Key", "Evflow-Pause", "Nats-Msg-Id", "X-Other"]),
    header_value,
    max_size=3,
)


def subjects(paused: str) -> st.SearchStrategy[str]:
    """Command and query subjects, with real and invented flows and executions."""
    flow = st.sampled_from(["approval", "purchase"]) | token
    execution = st.just(paused) | token
    return st.one_of(
        st.builds("evflow.flo.{}.invoke".format, flow),
        st.builds("evflow.flo.{}.resume.{}".format, flow, execution),
        st.builds("evflow.flo.{}.cancel.{}".format, flow, execution),
        st.builds("evflow.executions.get.{}".format, execution),
        st.builds("evflow.executions.history.{}".format, execution),
    )


def unique(values: dict[str, str]) -> dict[str, str]:
    """Keys made unique per example (empty and oversized ones kept as drawn)."""
    suffix = str(next(counter))
    return {
        name: value + suffix if name in ("Idempotency-Key", "Nats-Msg-Id") and 0 < len(value)
        and len(value) < 500 else value
        for name, value in values.items()
    }  # fmt: skip


@pytest.fixture
async def nc(nats_server: NatsServer, engine_server: Server) -> AsyncIterator[NATS]:
    connection = await nats.connect(nats_server.url)
    yield connection
    await connection.drain()


@pytest.fixture
async def paused(nc: NATS) -> str:
    """An execution paused at its approval, for resumes to aim at."""
    msg = await nc.request("evflow.flo.approval.invoke", json.dumps(APPROVAL).encode(), 10)
    return json.loads(msg.data)["execution_id"]


def check_reply(msg: Msg) -> bool:
    """Whether the reply is a refusal; fails the test if it is malformed or ``internal``."""
    headers = msg.headers or {}
    if "Nats-Service-Error-Code" not in headers:
        json.loads(msg.data)  # a success is JSON
        return False
    error = json.loads(msg.data)["error"]
    assert error["code"] in CODES, error
    assert headers["Nats-Service-Error-Code"] in {"400", "404", "409", "413", "500"}
    assert error["message"]
    assert not set("\r\n") & set(headers["Nats-Service-Error"]), headers
    if error["message"].isprintable():
        assert headers["Nats-Service-Error"] == error["message"]
    return True


@pytest.mark.slow
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_random_requests_get_a_clear_answer_and_refusals_append_nothing(
    nc: NATS, engine_server: Server, paused: str, data: st.DataObject
) -> None:
    """Every request is answered; a refusal names its code and leaves the log unchanged."""
    subject = data.draw(subjects(paused), label="subject")
    sent_headers = unique(data.draw(headers, label="headers"))
    sent_body = data.draw(body, label="body")
    before = await log_size(engine_server)

    msg = await nc.request(subject, sent_body, timeout=BOUND, headers=sent_headers or None)

    if check_reply(msg):
        assert await log_size(engine_server) == before, (subject, sent_headers, sent_body)


@pytest.mark.slow
async def test_random_durable_commands_are_each_run_or_rejected_once(
    nc: NATS, engine_server: Server, paused: str
) -> None:
    """Hundreds of malformed durable commands: each runs or is rejected, none is stuck."""
    rejected: list[dict[str, Any]] = []

    async def collect(msg: Msg) -> None:
        rejected.append(json.loads(msg.data))

    await nc.subscribe("evflow.events.rejected", cb=collect)
    js = nc.jetstream()
    before = await _commands_in_log(engine_server)
    published = 0

    @settings(max_examples=EXAMPLES, deadline=None, database=None)
    @given(subject=subjects(paused), sent_headers=headers, sent_body=body)
    def draw(subject: str, sent_headers: dict[str, str], sent_body: bytes) -> None:
        samples.append((subject.replace("evflow.", "evflow.cmd.", 1), sent_headers, sent_body))

    samples: list[tuple[str, dict[str, str], bytes]] = []
    draw()
    assert len(samples) >= EXAMPLES, len(samples)
    for subject, sent_headers, sent_body in samples:
        if not subject.startswith("evflow.cmd.flo."):
            subject = "evflow.cmd." + subject.split(".", 2)[2]  # queries are not commands
        ack = await js.publish(subject, sent_body, headers=unique(sent_headers) or None)
        published += 0 if ack.duplicate else 1

    async def settled() -> bool:
        info = await js.stream_info("EVFLOW_COMMANDS")
        ran = await _commands_in_log(engine_server) - before
        return info.state.messages == 0 and ran + len(rejected) == published

    deadline = asyncio.get_running_loop().time() + 60
    while not await settled():
        assert asyncio.get_running_loop().time() < deadline, (published, len(rejected))
        await asyncio.sleep(0.1)

    assert all(r["error"]["code"] in CODES and r["error"]["message"] for r in rejected)
    alive = await nc.request("evflow.flo.approval.invoke", json.dumps(APPROVAL).encode(), 10)
    assert not check_reply(alive)


async def _commands_in_log(server: Server) -> int:
    """Invokes, resumes and cancels the log holds: each is one command that ran."""
    assert server.store is not None
    events = await server.store.read_all(limit=1_000_000)
    commands = ExecutionStarted | ExecutionResumed | ExecutionCancelled
    return sum(isinstance(e.event, commands) for e in events)
