"""What the service promises beyond single requests: idempotency, conflicts, restarts, load,
and that a slow execution holds up nobody else.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import nats
import pytest
from examples.flows import app as example_app
from examples.flows import approval
from nats.aio.client import Client as NATS

from evflow import App, Client, Conflict, Context, Finished, NotPaused, Status
from evflow.messages import Completed, Paused
from evflow.nats_server import NatsServer
from evflow.server import Server
from wire import (
    APPROVAL,
    EXECUTION_HEADER,
    FINANCE_YES,
    MANAGER_YES,
    PURCHASE,
    YES,
    call,
    error,
    events,
    invoke,
    invoke_subject,
    log_size,
    reply,
    resume,
    resume_subject,
    types,
)


@pytest.fixture
async def nc(nats_server: NatsServer, engine_server: Server) -> AsyncIterator[NATS]:
    """A raw NATS connection to the test's server, with the engine serving."""
    connection = await nats.connect(nats_server.url)
    yield connection
    await connection.drain()


async def test_repeated_invoke_with_a_key_returns_the_first_reply_byte_for_byte(
    nc: NATS, engine_server: Server
) -> None:
    """Even after the execution moved on, the repeat gets the first reply and starts nothing."""
    key = {"Idempotency-Key": "order-17"}
    first = await call(nc, invoke_subject("approval"), APPROVAL, key)
    execution_id = reply(first)["execution_id"]
    await resume(nc, "approval", execution_id, YES)

    again = await call(nc, invoke_subject("approval"), APPROVAL, key)

    assert again.data == first.data
    assert again.headers is not None and again.headers[EXECUTION_HEADER] == execution_id
    assert await log_size(engine_server) == 4


async def test_repeated_resume_with_a_key_returns_the_first_reply_byte_for_byte(
    nc: NATS,
) -> None:
    """A resume repeated after the next pause was answered gets the first reply, appends nothing."""
    execution_id = (await invoke(nc, "purchase", PURCHASE))["execution_id"]
    key = {"Idempotency-Key": "manager-says-yes"}
    first = await call(nc, resume_subject("purchase", execution_id), MANAGER_YES, key)
    await resume(nc, "purchase", execution_id, FINANCE_YES)

    again = await call(nc, resume_subject("purchase", execution_id), MANAGER_YES, key)

    assert again.data == first.data
    assert reply(again)["status"] == "paused"
    assert again.headers is not None and again.headers[EXECUTION_HEADER] == execution_id
    assert len(await events(nc, execution_id)) == 7


async def test_concurrent_invokes_with_one_key_start_one_execution(
    nc: NATS, engine_server: Server
) -> None:
    """Racing repeats of a keyed invoke all get the same reply; one execution exists."""
    key = {"Idempotency-Key": "race"}

    replies = await asyncio.gather(
        *(call(nc, invoke_subject("approval"), APPROVAL, key) for _ in range(8))
    )

    assert len({msg.data for msg in replies}) == 1
    assert reply(replies[0])["status"] == "paused"
    assert await log_size(engine_server) == 2


async def test_concurrent_resumes_with_one_key_all_get_the_first_reply(
    nc: NATS, engine_server: Server
) -> None:
    """A client retrying while its first resume is in flight is told the outcome, not 409."""
    execution_id = (await invoke(nc))["execution_id"]
    key = {"Idempotency-Key": "answer-once"}

    replies = await asyncio.gather(
        *(call(nc, resume_subject("approval", execution_id), YES, key) for _ in range(10))
    )

    assert len({msg.data for msg in replies}) == 1, [msg.data for msg in replies]
    assert reply(replies[0])["status"] == "completed"
    assert types(await events(nc, execution_id)).count("ExecutionResumed") == 1


async def test_one_key_on_two_flows_starts_two_executions(nc: NATS) -> None:
    """An invoke key is scoped to its flow, so unrelated flows do not collide."""
    key = {"Idempotency-Key": "shared"}

    first = reply(await call(nc, invoke_subject("approval"), APPROVAL, key))
    second = reply(await call(nc, invoke_subject("purchase"), PURCHASE, key))

    assert first["execution_id"] != second["execution_id"]
    assert second["flow"] == "purchase"


async def test_a_reused_resume_key_on_the_wrong_flow_token_is_unknown_execution(
    nc: NATS,
) -> None:
    """The flow token is checked even when the Idempotency-Key was used on the right flow."""
    execution_id = (await invoke(nc, "purchase", PURCHASE))["execution_id"]
    key = {"Idempotency-Key": "manager-says-yes"}
    await call(nc, resume_subject("purchase", execution_id), MANAGER_YES, key)

    msg = await call(nc, resume_subject("approval", execution_id), YES, key)

    error(msg, 404, "unknown_execution")


@pytest.mark.parametrize(
    ("headers", "loser_codes"),
    [(None, {"already_resumed", "finished"}), ({"Evflow-Pause": "1"}, {"already_resumed"})],
    ids=["no-pause-header", "pause-header"],
)
async def test_two_concurrent_resumes_one_wins_the_other_gets_409(
    nc: NATS, headers: dict[str, str] | None, loser_codes: set[str]
) -> None:
    """Exactly one of two racing resumes is recorded; the other is told where things stand.

    Without ``Evflow-Pause`` the loser is ``already_resumed`` if it arrived while the pause
    was pending and ``finished`` if it arrived after the flow completed; with it, the pause
    it names was answered either way.
    """
    execution_id = (await invoke(nc))["execution_id"]
    subject = resume_subject("approval", execution_id)
    answers = [YES, {"approved": False, "note": "over budget"}]

    replies = await asyncio.gather(*(call(nc, subject, body, headers) for body in answers))

    failed = [msg for msg in replies if "Nats-Service-Error-Code" in (msg.headers or {})]
    won = [reply(msg) for msg in replies if msg not in failed]
    assert len(won) == 1 and len(failed) == 1
    code = json.loads(failed[0].data)["error"]["code"]
    assert code in loser_codes
    body = error(failed[0], 409, code)
    assert (body["status"], body["version"]) == ("completed", 4)
    history = await events(nc, execution_id)
    assert types(history).count("ExecutionResumed") == 1
    assert history[-1]["event"]["result"] == won[0]["result"]


async def test_two_engines_on_one_log_let_exactly_one_resume_win(
    nats_server: NatsServer, store_url: str
) -> None:
    """Across engines sharing the SQLite file, the version check decides and the loser gets 409."""
    async with (
        Server(example_app, store_url, nats_server.url) as one,
        Server(example_app, store_url, nats_server.url) as two,
    ):
        assert one.engine is not None and two.engine is not None
        started = await one.engine.invoke("approval", b'{"amount": 1, "requester": "x"}')
        execution_id = started.execution_id

        outcomes = await asyncio.gather(
            one.engine.resume("approval", execution_id, b'{"approved": true, "note": "a"}'),
            two.engine.resume("approval", execution_id, b'{"approved": false, "note": "b"}'),
            return_exceptions=True,
        )
        history = await one.engine.history(execution_id)

    refused = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert len(refused) == 1 and isinstance(refused[0], Conflict), outcomes
    assert [stored.version for stored in history] == [1, 2, 3, 4]
    assert [stored.event.kind for stored in history].count("resumed") == 1


async def test_an_engine_restart_between_pauses_loses_nothing(
    nats_server: NatsServer, store_url: str
) -> None:
    """A new engine on the same log resumes where the stopped one paused."""
    client = await Client.connect(nats_server.url)
    try:
        async with Server(example_app, store_url, nats_server.url):
            paused = await client.invoke("purchase", PURCHASE)
            await client.resume("purchase", paused.execution_id, MANAGER_YES)
            before = await client.history(paused.execution_id)

        async with Server(example_app, store_url, nats_server.url):
            done = await client.resume("purchase", paused.execution_id, FINANCE_YES)
            after = await client.history(paused.execution_id)
    finally:
        await client.close()

    assert isinstance(done, Completed)
    assert done.result["reservation"] == "budget-desk-300.00"
    assert after[: len(before)] == before
    assert [stored.version for stored in after] == list(range(1, 8))
    assert [stored.event.kind for stored in after].count("step_completed") == 1


async def test_two_hundred_concurrent_executions_all_complete(client: Client) -> None:
    """200 racing invokes, then 200 racing resumes: all complete with gap-free histories."""
    count = 200
    paused = await asyncio.gather(
        *(client.invoke("approval", {"amount": i, "requester": f"r{i}"}) for i in range(count))
    )
    ids = [settled.execution_id for settled in paused]
    assert len(set(ids)) == count

    done = await asyncio.gather(
        *(
            client.resume("approval", execution_id, {"approved": i % 2 == 0, "note": str(i)})
            for i, execution_id in enumerate(ids)
        )
    )
    histories = await asyncio.gather(*(client.history(execution_id) for execution_id in ids))

    for i, settled in enumerate(done):
        assert isinstance(settled, Completed)
        assert settled.result == {"approved": i % 2 == 0, "note": str(i)}
    for history in histories:
        assert [stored.version for stored in history] == [1, 2, 3, 4]


class Gate:
    """Holds a flow's step until the test releases it, and says when a step is held."""

    def __init__(self) -> None:
        self.entered: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.release = asyncio.Event()

    async def hold(self, execution_id: str) -> str:
        if not self.entered.done():
            self.entered.set_result(execution_id)
        await self.release.wait()
        return "released"


def gated_app(gate: Gate) -> App:
    """The example approval flow, plus a flow whose step waits on ``gate``."""
    app = App()
    app.flow("approval")(approval)

    @app.flow("slow")
    async def slow(ctx: Context, label: str) -> dict:
        held = await ctx.step("hold", gate.hold, ctx.execution_id)
        answer = await ctx.pause(inputs={"label": label}, outputs={"ok": bool})
        return {"held": held, "ok": answer["ok"]}

    @app.flow("broken")
    async def broken(ctx: Context, item: str) -> dict:
        raise LookupError(f"no stock of {item}")

    return app


@pytest.fixture
async def gate(nats_server: NatsServer, store_url: str) -> AsyncIterator[Gate]:
    """An engine serving ``gated_app``; the gate is released before the engine stops."""
    gate = Gate()
    server = Server(gated_app(gate), store_url, nats_server.url)
    await server.start()
    yield gate
    gate.release.set()
    await server.stop()


@pytest.fixture
async def gated_client(nats_server: NatsServer, gate: Gate) -> AsyncIterator[Client]:
    client = await Client.connect(nats_server.url)
    yield client
    await client.close()


async def test_a_slow_step_does_not_block_other_executions(
    gate: Gate, gated_client: Client
) -> None:
    """While one execution sits in a step, others are invoked, resumed and queried."""
    slow = asyncio.create_task(gated_client.invoke("slow", {"label": "big"}))
    slow_id = await asyncio.wait_for(gate.entered, 20)

    paused = await gated_client.invoke("approval", APPROVAL)
    done = await gated_client.resume("approval", paused.execution_id, YES)
    running = await gated_client.get(slow_id)

    assert isinstance(done, Completed)
    assert running.status is Status.RUNNING
    assert not slow.done()
    gate.release.set()
    settled = await slow
    assert isinstance(settled, Paused)
    assert settled.execution_id == slow_id


async def test_resume_of_a_running_execution_is_not_paused_at_once(
    gate: Gate, gated_client: Client
) -> None:
    """The contract answers 409 not_paused while the execution runs, rather than queueing."""
    slow = asyncio.create_task(gated_client.invoke("slow", {"label": "big"}))
    slow_id = await asyncio.wait_for(gate.entered, 20)
    resuming = asyncio.create_task(gated_client.resume("slow", slow_id, {"ok": True}))
    try:
        answered, _ = await asyncio.wait({resuming}, timeout=10)
    finally:
        gate.release.set()
        await slow
        late = await asyncio.gather(resuming, return_exceptions=True)

    assert answered, f"the resume waited for the running step, then got {late[0]!r}"
    with pytest.raises(NotPaused) as caught:
        resuming.result()
    assert caught.value.execution_status == "running"
    assert caught.value.version == 1


async def test_a_flow_that_raises_settles_failed_and_cannot_be_resumed(
    gated_client: Client,
) -> None:
    """The failed reply carries the exception's type and message; a resume is 409 finished."""
    msg = await gated_client.request("evflow.flo.broken.invoke", b'{"item": "pen"}')
    failed = json.loads(msg.data)
    subject = f"evflow.flo.broken.resume.{failed['execution_id']}"

    with pytest.raises(Finished) as caught:
        await gated_client.request(subject, b"{}")

    assert failed["status"] == "failed"
    assert failed["flow"] == "broken"
    assert failed["error"] == {"type": "LookupError", "message": "no stock of pen"}
    assert (caught.value.execution_status, caught.value.version) == ("failed", 2)
