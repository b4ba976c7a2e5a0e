"""``evflow.Client``: typed replies, and error replies raised as the engine's own exceptions."""

from __future__ import annotations

import pytest

from evflow import (
    AlreadyResumed,
    Client,
    Conflict,
    Finished,
    InvalidInput,
    InvalidJson,
    NotPaused,
    Status,
    UnknownExecution,
    UnknownFlow,
)
from evflow.events import ExecutionCompleted, ExecutionStarted
from evflow.messages import Completed, Paused
from wire import APPROVAL, YES


def caught_as(kind: type[Exception]) -> pytest.RaisesExc:
    """``pytest.raises`` for exactly ``kind``: a subclass or a base class does not pass."""
    return pytest.raises(kind, check=lambda error: type(error) is kind)


async def test_invoke_and_resume_return_typed_settle_points(client: Client) -> None:
    """The client decodes replies into ``Paused`` and ``Completed``."""
    paused = await client.invoke("approval", APPROVAL)
    assert isinstance(paused, Paused)

    done = await client.resume("approval", paused.execution_id, YES, pause=paused.sequence)

    assert paused.resume_subject == f"evflow.flo.approval.resume.{paused.execution_id}"
    assert paused.outputs == ["approved", "note"]
    assert isinstance(done, Completed)
    assert done.result == YES


async def test_get_and_history_return_state_and_events(client: Client) -> None:
    """The queries decode into ``ExecutionState`` and ``StoredEvent``s."""
    paused = await client.invoke("approval", APPROVAL)
    await client.resume("approval", paused.execution_id, YES)

    state = await client.get(paused.execution_id)
    history = await client.history(paused.execution_id)

    assert state.status is Status.COMPLETED
    assert state.result == YES
    assert [stored.version for stored in history] == [1, 2, 3, 4]
    assert isinstance(history[0].event, ExecutionStarted)
    assert isinstance(history[-1].event, ExecutionCompleted)


async def test_idempotency_key_repeats_return_the_same_execution(client: Client) -> None:
    """``idempotency_key=`` is sent as the header, so a repeat gets the first execution."""
    first = await client.invoke("approval", APPROVAL, idempotency_key="k-1")
    again = await client.invoke("approval", APPROVAL, idempotency_key="k-1")

    assert again == first


async def test_invalid_input_raises_invalid_input_naming_the_field(client: Client) -> None:
    """A missing field raises ``InvalidInput`` with code, status, message and field."""
    paused = await client.invoke("approval", APPROVAL)

    with caught_as(InvalidInput) as caught:
        await client.resume("approval", paused.execution_id, {"approved": True})

    error = caught.value
    assert (error.code, error.status) == ("invalid_input", 400)
    assert error.field == error.details["field"] == "note"
    assert "note" in error.message
    assert error.execution_id == paused.execution_id


async def test_a_body_that_is_not_an_object_raises_invalid_json(client: Client) -> None:
    """A raw request with a JSON array raises ``InvalidJson``."""
    with caught_as(InvalidJson) as caught:
        await client.request("evflow.flo.approval.invoke", b"[1, 2]")

    assert (caught.value.code, caught.value.status) == ("invalid_json", 400)
    assert "object" in caught.value.message


async def test_unknown_names_raise_unknown_flow_and_unknown_execution(client: Client) -> None:
    """Unknown flows and executions raise their 404 classes, naming what was not found."""
    with caught_as(UnknownFlow) as flow:
        await client.invoke("payroll", {})
    with caught_as(UnknownExecution) as execution:
        await client.resume("approval", "feedbeef", YES)
    with caught_as(UnknownExecution) as query:
        await client.get("feedbeef")

    assert (flow.value.code, flow.value.status) == ("unknown_flow", 404)
    assert flow.value.details["flow"] == "payroll"
    assert (execution.value.code, execution.value.status) == ("unknown_execution", 404)
    assert execution.value.execution_id == query.value.execution_id == "feedbeef"


async def test_conflicts_raise_409_classes_with_status_and_version(client: Client) -> None:
    """not_paused, finished and already_resumed arrive as ``Conflict`` subclasses."""
    paused = await client.invoke("approval", APPROVAL)
    execution_id = paused.execution_id
    with caught_as(NotPaused) as not_paused:
        await client.resume("approval", execution_id, YES, pause=2)
    await client.resume("approval", execution_id, YES)
    with caught_as(Finished) as finished:
        await client.resume("approval", execution_id, YES)
    with caught_as(AlreadyResumed) as already:
        await client.resume("approval", execution_id, YES, pause=1)

    assert (not_paused.value.execution_status, not_paused.value.version) == ("paused", 2)
    for error, code in [(finished, "finished"), (already, "already_resumed")]:
        assert isinstance(error.value, Conflict)
        assert (error.value.code, error.value.status) == (code, 409)
        assert (error.value.execution_status, error.value.version) == ("completed", 4)
        assert error.value.execution_id == execution_id


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c: c.invoke("approval.x", APPROVAL), "flow"),
        (lambda c: c.invoke("", APPROVAL), "flow"),
        (lambda c: c.invoke("appr oval", APPROVAL), "flow"),
        (lambda c: c.resume("approval", "a.b", YES), "execution_id"),
        (lambda c: c.cancel("approval", "*"), "execution_id"),
        (lambda c: c.get("x" * 5000), "execution_id"),
        (lambda c: c.history(">"), "execution_id"),
        (lambda c: c.publish_invoke("a>b", APPROVAL), "flow"),
    ],
)
async def test_a_name_that_cannot_be_a_subject_token_is_refused_before_sending(
    client: Client, call, field: str
) -> None:
    """A dot, a space, a wildcard, nothing or thousands of characters would reach a subject
    no engine listens on (or make the server drop the connection): refused at once."""
    with caught_as(InvalidInput) as refused:
        await call(client)

    assert refused.value.field == field
    assert "cannot be part of a NATS subject" in refused.value.message
    assert len(refused.value.message) < 250
    assert (await client.invoke("approval", APPROVAL)).flow == "approval"  # still connected


async def test_closing_a_client_whose_server_is_gone_raises_nothing(tmp_path) -> None:
    """A client used while NATS goes away still closes quietly, keeping the caller's error."""
    from evflow.nats_server import NatsServer

    server = NatsServer(tmp_path / "nats", port=0)
    await server.start()
    client = await Client.connect(server.url)
    await server.stop()

    await client.close()

    assert client.nc.is_closed
