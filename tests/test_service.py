"""The wire contract over a real nats-server: settle replies, error replies, queries, discovery.

Raw nats-py requests are used where the bytes and headers are the point; ``evflow.Client``
where the typed surface is.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NATS

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
    state,
    types,
)

NOT_OBJECTS = [b"not json at all", b"[1, 2]", b'"a string"', b"{"]


@pytest.fixture
async def nc(nats_server: NatsServer, engine_server: Server) -> AsyncIterator[NATS]:
    """A raw NATS connection to the test's server, with the engine serving."""
    connection = await nats.connect(nats_server.url)
    yield connection
    await connection.drain()


async def test_invoke_replies_with_a_pause_that_describes_itself(nc: NATS) -> None:
    """The pause reply names the execution, the inputs, the outputs and how to resume."""
    msg = await call(nc, invoke_subject("approval"), APPROVAL)

    paused = reply(msg)
    execution_id = paused["execution_id"]
    assert msg.headers is not None and msg.headers[EXECUTION_HEADER] == execution_id
    assert paused["status"] == "paused"
    assert paused["flow"] == "approval"
    assert paused["inputs"] == APPROVAL
    assert paused["outputs"] == ["approved", "note"]
    assert paused["resume_subject"] == f"evflow.flo.approval.resume.{execution_id}"
    schema = paused["output_schema"]
    assert schema["type"] == "object"
    assert schema["properties"] == {"approved": {"type": "boolean"}, "note": {"type": "string"}}
    assert sorted(schema["required"]) == ["approved", "note"]


async def test_resume_on_the_resume_subject_completes_with_the_result(nc: NATS) -> None:
    """Sending the declared outputs to ``resume_subject`` ends the flow with its result."""
    paused = await invoke(nc)

    msg = await call(nc, paused["resume_subject"], YES)

    done = reply(msg)
    assert msg.headers is not None
    assert msg.headers[EXECUTION_HEADER] == paused["execution_id"]
    assert done["status"] == "completed"
    assert done["execution_id"] == paused["execution_id"]
    assert done["flow"] == "approval"
    assert done["result"] == YES


async def test_purchase_needs_the_manager_then_finance_then_reserves_budget(nc: NATS) -> None:
    """The two-pause flow asks the manager, then finance, then records the budget step."""
    manager = await invoke(nc, "purchase", PURCHASE)
    execution_id = manager["execution_id"]
    assert manager["outputs"] == ["approved", "manager"]
    assert manager["inputs"] == PURCHASE

    finance = await resume(nc, "purchase", execution_id, MANAGER_YES)
    assert finance["status"] == "paused"
    assert finance["outputs"] == ["approved", "cost_center"]
    assert finance["inputs"] == {"item": "desk", "amount": 300.0, "approved_by": "mia"}

    done = await resume(nc, "purchase", execution_id, FINANCE_YES)
    assert done["status"] == "completed"
    assert done["result"]["status"] == "ordered"
    assert done["result"]["cost_center"] == "cc-7"
    assert done["result"]["reservation"] == "budget-desk-300.00"
    assert types(await events(nc, execution_id)) == [
        "ExecutionStarted",
        "ExecutionPaused",
        "ExecutionResumed",
        "ExecutionPaused",
        "ExecutionResumed",
        "StepCompleted",
        "ExecutionCompleted",
    ]


async def test_purchase_rejected_by_the_manager_never_asks_finance(nc: NATS) -> None:
    """A default input is honoured, and a rejection ends the flow after one pause."""
    manager = await invoke(nc, "purchase", {"item": "lamp", "amount": 20.0})
    assert manager["inputs"]["buyer"] == "anonymous"

    done = await resume(
        nc, "purchase", manager["execution_id"], {"approved": False, "manager": "mia"}
    )

    assert done["status"] == "completed"
    assert done["result"] == {"status": "rejected", "by": "mia"}


@pytest.mark.parametrize("body", NOT_OBJECTS)
async def test_invoke_body_that_is_not_a_json_object_is_invalid_json(
    nc: NATS, engine_server: Server, body: bytes
) -> None:
    """Malformed JSON, an array or a string is refused with 400 and nothing is appended."""
    msg = await call(nc, invoke_subject("approval"), body)

    error(msg, 400, "invalid_json")
    assert await log_size(engine_server) == 0


@pytest.mark.parametrize("body", NOT_OBJECTS)
async def test_resume_body_that_is_not_a_json_object_is_invalid_json(nc: NATS, body: bytes) -> None:
    """A resume body that is not a JSON object is refused and the execution stays paused."""
    execution_id = (await invoke(nc))["execution_id"]

    msg = await call(nc, resume_subject("approval", execution_id), body)

    error(msg, 400, "invalid_json")
    assert len(await events(nc, execution_id)) == 2
    assert (await state(nc, execution_id))["status"] == "paused"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"amount": 5.0}, "requester"),
        ({"amount": "five", "requester": "ann"}, "amount"),
        ({"amount": 5.0, "requester": 7}, "requester"),
        ({**APPROVAL, "urgent": True}, "urgent"),
    ],
    ids=["missing", "wrong-type", "wrong-type-str", "unknown"],
)
async def test_invalid_invoke_input_names_the_field(
    nc: NATS, engine_server: Server, body: dict, field: str
) -> None:
    """A missing, mistyped or unknown invoke field is a 400 naming it; nothing is appended."""
    msg = await call(nc, invoke_subject("approval"), body)

    assert error(msg, 400, "invalid_input")["field"] == field
    assert await log_size(engine_server) == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"approved": True}, "note"),
        ({"approved": "yes", "note": "ok"}, "approved"),
        ({**YES, "extra": 1}, "extra"),
    ],
    ids=["missing", "wrong-type", "unknown"],
)
async def test_invalid_resume_input_names_the_field(nc: NATS, body: dict, field: str) -> None:
    """A missing, mistyped or unknown resume field is a 400 naming it; nothing is appended."""
    execution_id = (await invoke(nc))["execution_id"]

    msg = await call(nc, resume_subject("approval", execution_id), body)

    assert error(msg, 400, "invalid_input")["field"] == field
    assert len(await events(nc, execution_id)) == 2
    assert (await state(nc, execution_id))["status"] == "paused"


async def test_invoke_of_an_unregistered_flow_is_unknown_flow(
    nc: NATS, engine_server: Server
) -> None:
    """An invoke on a flow nobody registered is a 404 and nothing is appended."""
    msg = await call(nc, invoke_subject("payroll"), {})

    assert error(msg, 404, "unknown_flow")["flow"] == "payroll"
    assert await log_size(engine_server) == 0


async def test_resume_on_an_unregistered_flow_is_unknown_flow(nc: NATS) -> None:
    """A resume whose flow token names no flow is a 404, even for a real execution."""
    execution_id = (await invoke(nc))["execution_id"]

    msg = await call(nc, resume_subject("payroll", execution_id), YES)

    error(msg, 404, "unknown_flow")
    assert len(await events(nc, execution_id)) == 2


async def test_resume_of_an_unknown_execution_is_unknown_execution(nc: NATS) -> None:
    """A resume naming no execution is a 404 that names the ID."""
    msg = await call(nc, resume_subject("approval", "0123abcd"), YES)

    assert error(msg, 404, "unknown_execution")["execution_id"] == "0123abcd"


async def test_resume_on_the_wrong_flow_token_is_unknown_execution(nc: NATS) -> None:
    """A purchase execution cannot be resumed through the approval flow's subject."""
    execution_id = (await invoke(nc, "purchase", PURCHASE))["execution_id"]

    msg = await call(nc, resume_subject("approval", execution_id), YES)

    error(msg, 404, "unknown_execution")
    assert len(await events(nc, execution_id)) == 2
    assert (await state(nc, execution_id))["status"] == "paused"


async def test_resume_of_a_completed_execution_is_finished_and_appends_nothing(
    nc: NATS,
) -> None:
    """A 409 ``finished`` carries the status and version; the history is unchanged."""
    execution_id = (await invoke(nc))["execution_id"]
    await resume(nc, "approval", execution_id, YES)
    before = await events(nc, execution_id)

    msg = await call(nc, resume_subject("approval", execution_id), YES)

    body = error(msg, 409, "finished")
    assert body["status"] == "completed"
    assert body["version"] == len(before) == 4
    assert await events(nc, execution_id) == before


async def test_resume_naming_an_answered_pause_is_already_resumed(nc: NATS) -> None:
    """``Evflow-Pause: 1`` after the manager answered is a 409 and appends nothing."""
    execution_id = (await invoke(nc, "purchase", PURCHASE))["execution_id"]
    await resume(nc, "purchase", execution_id, MANAGER_YES)

    msg = await call(
        nc, resume_subject("purchase", execution_id), MANAGER_YES, {"Evflow-Pause": "1"}
    )

    body = error(msg, 409, "already_resumed")
    assert (body["status"], body["version"]) == ("paused", 4)
    assert len(await events(nc, execution_id)) == 4


async def test_resume_naming_a_pause_that_is_not_pending_is_not_paused(nc: NATS) -> None:
    """``Evflow-Pause`` naming a pause the execution is not waiting at is a 409."""
    execution_id = (await invoke(nc))["execution_id"]

    msg = await call(nc, resume_subject("approval", execution_id), YES, {"Evflow-Pause": "2"})

    body = error(msg, 409, "not_paused")
    assert (body["status"], body["version"]) == ("paused", 2)
    assert len(await events(nc, execution_id)) == 2


async def test_resume_naming_the_pending_pause_is_accepted(nc: NATS) -> None:
    """``Evflow-Pause`` with the sequence from the pause reply answers that pause."""
    paused = await invoke(nc)
    headers = {"Evflow-Pause": str(paused["sequence"])}

    msg = await call(nc, paused["resume_subject"], YES, headers)

    assert reply(msg)["status"] == "completed"


@pytest.mark.parametrize(
    ("headers", "field"),
    [
        ({"Evflow-Pause": "first"}, "Evflow-Pause"),
        ({"Evflow-Pause": "²"}, "Evflow-Pause"),  # a digit to str.isdigit, not to int()
        ({"Idempotency-Key": " "}, "Idempotency-Key"),
    ],
    ids=["pause", "pause-superscript", "idempotency-key"],
)
async def test_malformed_command_headers_are_invalid_input(
    nc: NATS, headers: dict[str, str], field: str
) -> None:
    """A non-numeric ``Evflow-Pause`` or a blank ``Idempotency-Key`` is a 400 naming it."""
    execution_id = (await invoke(nc))["execution_id"]

    msg = await call(nc, resume_subject("approval", execution_id), YES, headers)

    assert error(msg, 400, "invalid_input")["field"] == field
    assert len(await events(nc, execution_id)) == 2


@pytest.mark.parametrize(
    ("flow", "body", "headers", "status"),
    [
        ("payroll", YES, None, 404),
        ("approval", b"[]", None, 400),
        ("approval", {"approved": 1}, None, 400),
        ("approval", YES, {"Idempotency-Key": " "}, 400),
        ("approval", YES, {"Evflow-Pause": "9"}, 409),
    ],
    ids=["unknown-flow", "invalid-json", "invalid-input", "blank-key", "not-paused"],
)
async def test_every_resume_error_names_the_execution_in_its_header(
    nc: NATS, flow: str, body: object, headers: dict[str, str] | None, status: int
) -> None:
    """The contract puts ``Evflow-Execution-Id`` on every reply; a resume's names its subject's."""
    execution_id = (await invoke(nc))["execution_id"]

    msg = await call(nc, resume_subject(flow, execution_id), body, headers)

    assert msg.headers is not None
    assert msg.headers["Nats-Service-Error-Code"] == str(status)
    assert msg.headers.get(EXECUTION_HEADER) == execution_id


async def test_get_returns_the_folded_state(nc: NATS) -> None:
    """The get query answers the pending pause while paused and the result once completed."""
    execution_id = (await invoke(nc))["execution_id"]

    paused = await state(nc, execution_id)
    await resume(nc, "approval", execution_id, YES)
    completed = await state(nc, execution_id)

    assert (paused["status"], paused["version"], paused["flow"]) == ("paused", 2, "approval")
    assert paused["inputs"] == APPROVAL
    assert paused["pause"]["sequence"] == 1
    assert paused["pause"]["outputs"] == {"approved": "bool", "note": "str"}
    assert (completed["status"], completed["version"]) == ("completed", 4)
    assert completed["result"] == YES
    assert completed["answered"] == [1]
    assert "pause" not in completed


async def test_history_returns_ordered_events_with_versions_from_one(nc: NATS) -> None:
    """The history query lists every event of the execution, versions 1..n in order."""
    execution_id = (await invoke(nc))["execution_id"]
    await resume(nc, "approval", execution_id, YES)

    msg = await call(nc, f"evflow.executions.history.{execution_id}")

    body = reply(msg)
    assert msg.headers is not None and msg.headers[EXECUTION_HEADER] == execution_id
    assert body["execution_id"] == execution_id
    history = body["events"]
    assert [stored["version"] for stored in history] == [1, 2, 3, 4]
    assert {stored["execution_id"] for stored in history} == {execution_id}
    assert types(history) == [
        "ExecutionStarted",
        "ExecutionPaused",
        "ExecutionResumed",
        "ExecutionCompleted",
    ]
    assert history[0]["event"]["inputs"] == APPROVAL
    assert history[2]["event"]["outputs"] == YES
    positions = [stored["position"] for stored in history]
    assert positions == sorted(positions)


@pytest.mark.parametrize("query", ["get", "history"])
async def test_query_of_an_unknown_execution_is_unknown_execution(nc: NATS, query: str) -> None:
    """Both queries answer 404 ``unknown_execution`` for an ID the log does not hold."""
    msg = await call(nc, f"evflow.executions.{query}.feedbeef")

    assert error(msg, 404, "unknown_execution")["execution_id"] == "feedbeef"


async def test_the_service_answers_micro_ping_and_info(nc: NATS) -> None:
    """Standard NATS tooling finds the service ``evflow`` and its six endpoints."""
    ping = json.loads((await call(nc, "$SRV.PING.evflow")).data)
    info = json.loads((await call(nc, "$SRV.INFO.evflow")).data)

    assert ping["name"] == "evflow"
    assert info["name"] == "evflow"
    assert info["id"] == ping["id"]
    endpoints = {endpoint["name"]: endpoint["subject"] for endpoint in info["endpoints"]}
    assert endpoints == {
        "invoke": "evflow.flo.*.invoke",
        "resume": "evflow.flo.*.resume.*",
        "cancel": "evflow.flo.*.cancel.*",
        "get": "evflow.executions.get.*",
        "history": "evflow.executions.history.*",
        "list": "evflow.executions.list",
    }


async def test_micro_stats_count_the_requests_per_endpoint(nc: NATS) -> None:
    """``$SRV.STATS.evflow`` counts requests per endpoint, and the error replies among them."""
    execution_id = (await invoke(nc))["execution_id"]
    await invoke(nc)
    await call(nc, invoke_subject("approval"), b"[]")
    await resume(nc, "approval", execution_id, YES)
    await state(nc, execution_id)

    stats = json.loads((await call(nc, "$SRV.STATS.evflow")).data)

    assert stats["name"] == "evflow"
    by_name = {endpoint["name"]: endpoint for endpoint in stats["endpoints"]}
    counts = {name: endpoint["num_requests"] for name, endpoint in by_name.items()}
    assert counts == {"invoke": 3, "resume": 1, "cancel": 0, "get": 1, "history": 0, "list": 0}
    assert by_name["invoke"]["data"]["error_replies"] == 1
    assert by_name["resume"]["data"]["error_replies"] == 0
