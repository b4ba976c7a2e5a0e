"""The queries over a real nats-server: get at a version, and the paged listing of executions.

Raw nats-py requests check the bytes, headers and error bodies; ``evflow.Client`` checks the
typed surface (``get(at_version=)``, ``list_executions``, ``executions``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS

from evflow import Client, InvalidInput, Status, UnknownExecution
from evflow.nats_server import NatsServer
from evflow.server import Server
from wire import (
    APPROVAL,
    EXECUTION_HEADER,
    MANAGER_YES,
    PURCHASE,
    YES,
    call,
    error,
    invoke,
    log_size,
    reply,
    resume,
)

LIST = "evflow.executions.list"
STATUSES = "running, paused, waiting, completed, failed, cancelled"


@pytest.fixture
async def nc(nats_server: NatsServer, engine_server: Server) -> AsyncIterator[NATS]:
    """A raw NATS connection to the test's server, with the engine serving."""
    connection = await nats.connect(nats_server.url)
    yield connection
    await connection.drain()


async def completed_approval(nc: NATS) -> str:
    """An approval invoked and resumed: versions 1 to 4, completed."""
    execution_id = (await invoke(nc))["execution_id"]
    await resume(nc, "approval", execution_id, YES)
    return execution_id


async def listing(nc: NATS, query: Any = None) -> dict[str, Any]:
    """One page of the listing."""
    return reply(await call(nc, LIST, query))


def ids(page: dict[str, Any]) -> list[str]:
    return [row["execution_id"] for row in page["executions"]]


# get at a version


async def test_get_at_a_version_folds_the_events_up_to_it(nc: NATS) -> None:
    """Each version shows the execution as it stood then; no body, or {}, the latest."""
    execution_id = await completed_approval(nc)
    subject = f"evflow.executions.get.{execution_id}"

    states = [reply(await call(nc, subject, {"at_version": v})) for v in (1, 2, 3, 4)]
    latest = [reply(await call(nc, subject, body)) for body in (None, {}, b"  ")]
    explicit_null = reply(await call(nc, subject, {"at_version": None}))

    assert [(s["status"], s["version"]) for s in states] == [
        ("running", 1),
        ("paused", 2),
        ("running", 3),
        ("completed", 4),
    ]
    assert states[1]["pause"]["outputs"] == {"approved": "bool", "note": "str"}
    assert "result" not in states[2] and states[3]["result"] == YES
    assert latest == [states[3]] * 3 and explicit_null == states[3]


@pytest.mark.parametrize(
    ("at_version", "words"),
    [
        (0, ["at_version must be an integer >= 1, not 0"]),
        (-3, ["at_version must be an integer >= 1, not -3"]),
        ("2", ['at_version must be an integer >= 1, not "2"']),
        (2.5, ["at_version must be an integer >= 1, not 2.5"]),
        (True, ["at_version must be an integer >= 1, not true"]),
        (5, ["has no version 5: its latest is 4", "from 1 to 4"]),
        (10**30, ["has no version 1000000000000000000000000000000: its latest is 4"]),
    ],
    ids=["zero", "negative", "string", "fraction", "boolean", "beyond-latest", "huge"],
)
async def test_get_at_a_bad_version_is_invalid_input_naming_at_version(
    nc: NATS, engine_server: Server, at_version: Any, words: list[str]
) -> None:
    """A version that is not an integer >= 1, or beyond the latest, is refused with 400
    naming ``at_version`` and the execution; nothing is appended."""
    execution_id = await completed_approval(nc)
    before = await log_size(engine_server)

    msg = await call(nc, f"evflow.executions.get.{execution_id}", {"at_version": at_version})

    body = error(msg, 400, "invalid_input")
    assert body["field"] == "at_version"
    assert body["execution_id"] == execution_id
    assert msg.headers is not None and msg.headers[EXECUTION_HEADER] == execution_id
    for word in [*words, execution_id]:
        assert word in body["message"], body["message"]
    if at_version == 5:
        assert body["version"] == 4
    assert await log_size(engine_server) == before


async def test_get_with_another_body_names_what_is_wrong(nc: NATS) -> None:
    """An unknown field is named; a body that is not a JSON object is ``invalid_json``."""
    execution_id = await completed_approval(nc)
    subject = f"evflow.executions.get.{execution_id}"

    unknown = error(await call(nc, subject, {"version": 2}), 400, "invalid_input")
    not_json = error(await call(nc, subject, b"{at_version: 2"), 400, "invalid_json")
    array = error(await call(nc, subject, b"[2]"), 400, "invalid_json")

    assert unknown["field"] == "version" and "at_version" in unknown["message"]
    assert "not valid JSON" in not_json["message"]
    assert "must be a JSON object" in array["message"]


async def test_get_at_a_version_of_an_unknown_execution_is_unknown_execution(nc: NATS) -> None:
    msg = await call(nc, "evflow.executions.get.feedbeef", {"at_version": 1})

    assert error(msg, 404, "unknown_execution")["execution_id"] == "feedbeef"


async def test_client_get_at_version(client: Client) -> None:
    """``Client.get(id, at_version=)`` sends the version; a bad one raises InvalidInput."""
    paused = await client.invoke("approval", APPROVAL)
    await client.resume("approval", paused.execution_id, YES)

    then = await client.get(paused.execution_id, at_version=2)
    with pytest.raises(InvalidInput) as too_far:
        await client.get(paused.execution_id, at_version=9)
    with pytest.raises(UnknownExecution):
        await client.get("feedbeef", at_version=1)

    assert (then.status, then.version, then.pause is not None) == (Status.PAUSED, 2, True)
    assert too_far.value.field == "at_version" and too_far.value.details["version"] == 4


# the listing


async def test_listing_shows_executions_most_recently_changed_first(nc: NATS) -> None:
    """Each row carries the execution, flow, flow version, status, version and times; the
    order follows the last change, not the start; the reply names no execution."""
    done = await completed_approval(nc)
    paused = (await invoke(nc))["execution_id"]
    ordered = (await invoke(nc, "purchase", PURCHASE))["execution_id"]
    await resume(nc, "purchase", ordered, MANAGER_YES)

    msg = await call(nc, LIST)
    page = reply(msg)

    assert EXECUTION_HEADER not in (msg.headers or {})
    assert ids(page) == [ordered, paused, done]
    assert page["next"] is None
    row = page["executions"][2]
    assert {k: row[k] for k in ("execution_id", "flow", "flow_version", "status", "version")} == {
        "execution_id": done,
        "flow": "approval",
        "flow_version": 1,
        "status": "completed",
        "version": 4,
    }
    assert row["started_at"] < row["updated_at"]
    purchase = page["executions"][0]
    assert (purchase["flow"], purchase["status"], purchase["version"]) == ("purchase", "paused", 4)


async def test_listing_filters_by_flow_and_status(nc: NATS) -> None:
    """``flow`` and ``status`` keep the matching executions, alone or together."""
    done = await completed_approval(nc)
    paused = (await invoke(nc))["execution_id"]
    purchase = (await invoke(nc, "purchase", PURCHASE))["execution_id"]

    assert ids(await listing(nc, {"flow": "approval"})) == [paused, done]
    assert ids(await listing(nc, {"status": "paused"})) == [purchase, paused]
    assert ids(await listing(nc, {"flow": "approval", "status": "completed"})) == [done]
    assert ids(await listing(nc, {"flow": "quote"})) == []
    assert ids(await listing(nc, {"status": "failed"})) == []


async def test_listing_pages_with_next_until_null(nc: NATS) -> None:
    """Pages of ``limit`` rows chained by ``next`` list every execution once; the last
    page's ``next`` is null, even when it is exactly full."""
    started = [(await invoke(nc))["execution_id"] for _ in range(6)]

    pages = [await listing(nc, {"limit": 2})]
    while pages[-1]["next"] is not None and len(pages) < 10:
        pages.append(await listing(nc, {"limit": 2, "after": pages[-1]["next"]}))

    assert [len(page["executions"]) for page in pages] == [2, 2, 2]
    assert [i for page in pages for i in ids(page)] == started[::-1]
    assert ids(await listing(nc, {"limit": 6})) == started[::-1]
    assert (await listing(nc, {"limit": 6}))["next"] is None
    assert (await listing(nc, {"limit": 5}))["next"] is not None


async def test_paging_lists_the_snapshot_the_first_page_saw(nc: NATS) -> None:
    """Between pages one execution already listed and one not yet listed are resumed and a
    new one starts: the pages list every execution that existed at the first page exactly
    once, as it stood then (paused), and none started after."""
    started = [(await invoke(nc))["execution_id"] for _ in range(9)]
    changed: list[str] = []

    listed: list[dict[str, Any]] = []
    after = None
    for _ in range(10):
        page = await listing(nc, {"limit": 3} | ({"after": after} if after else {}))
        listed += page["executions"]
        unseen = [i for i in started if i not in ids({"executions": listed})]
        for execution_id in (ids(page)[0], unseen[0] if unseen else None):
            if execution_id is not None and execution_id not in changed:
                await resume(nc, "approval", execution_id, YES)
                changed.append(execution_id)
        await invoke(nc)
        after = page["next"]
        if after is None:
            break

    assert ids({"executions": listed}) == started[::-1]
    assert {row["status"] for row in listed} == {"paused"}
    assert len(changed) > 3, "the test changed too little"


@pytest.mark.parametrize(
    ("query", "field", "words"),
    [
        ({"status": "done"}, "status", [f'status must be one of {STATUSES}, not "done"']),
        ({"status": 3}, "status", [f"one of {STATUSES}, not 3"]),
        ({"limit": 0}, "limit", ["limit must be an integer from 1 to 1000, not 0"]),
        ({"limit": 1001}, "limit", ["an integer from 1 to 1000, not 1001"]),
        ({"limit": "10"}, "limit", ['an integer from 1 to 1000, not "10"']),
        ({"flow": 5}, "flow", ["flow must be a flow name, not 5"]),
        ({"after": "not-a-token"}, "after", ["after must be the 'next' token", "not-a-token"]),
        ({"after": ""}, "after", ["after must be the 'next' token"]),
        ({"after": 12}, "after", ["after must be the 'next' token", "not 12"]),
        ({"sort": "flow"}, "sort", ["unknown field `sort`", "after"]),
    ],
    ids=[
        "unknown-status",
        "status-not-text",
        "limit-zero",
        "limit-too-large",
        "limit-text",
        "flow-not-text",
        "after-garbage",
        "after-empty",
        "after-number",
        "unknown-field",
    ],
)
async def test_a_bad_listing_query_is_invalid_input_naming_the_field(
    nc: NATS, query: dict[str, Any], field: str, words: list[str]
) -> None:
    """A bad filter is refused with 400 naming the field and what it takes."""
    await invoke(nc)

    body = error(await call(nc, LIST, query), 400, "invalid_input")

    assert body["field"] == field
    for word in words:
        assert word in body["message"], body["message"]
    if field == "status":
        assert body["valid"] == [status.value for status in Status]


@pytest.mark.parametrize("body", [b"[1]", b"nope", b'{"flow": "approval"'])
async def test_a_listing_body_that_is_no_json_object_is_invalid_json(nc: NATS, body: bytes) -> None:
    error(await call(nc, LIST, body), 400, "invalid_json")


async def test_a_deeply_nested_query_body_is_refused_without_harm(nc: NATS) -> None:
    """A value nested 100,000 deep is refused naming its field; the engine serves on."""
    execution_id = await completed_approval(nc)
    deep = b"[" * 100_000 + b"]" * 100_000

    listed = error(await call(nc, LIST, b'{"flow": ' + deep + b"}"), 400, "invalid_input")
    got = await call(nc, f"evflow.executions.get.{execution_id}", b'{"at_version": ' + deep + b"}")

    assert listed["field"] == "flow" and "too deep" in listed["message"]
    assert error(got, 400, "invalid_input")["field"] == "at_version"
    assert ids(await listing(nc)) == [execution_id]


async def test_a_token_from_a_page_works_with_other_filters(nc: NATS) -> None:
    """``next`` marks a place in the log, not a query: it may be sent with any filters."""
    done = await completed_approval(nc)
    paused = [(await invoke(nc))["execution_id"] for _ in range(2)]

    first = await listing(nc, {"limit": 1})
    completed = await listing(nc, {"status": "completed", "after": first["next"]})

    assert ids(first) == [paused[1]]
    assert ids(completed) == [done]


async def test_client_lists_a_page_and_iterates_over_all(client: Client) -> None:
    """``list_executions`` returns one typed page; ``executions`` walks every page."""
    started = [(await client.invoke("approval", APPROVAL)).execution_id for _ in range(5)]
    await client.invoke("purchase", PURCHASE)

    page = await client.list_executions(flow="approval", status="paused", limit=2)
    every = [row.execution_id async for row in client.executions(flow="approval", page_size=2)]
    with pytest.raises(InvalidInput) as bad:
        await client.list_executions(status="asleep")

    assert [row.execution_id for row in page.executions] == started[:-3:-1]
    assert page.next is not None
    assert all(row.status is Status.PAUSED for row in page.executions)
    assert every == started[::-1]
    assert bad.value.field == "status" and bad.value.details["valid"][0] == "running"


async def test_the_listing_is_a_micro_endpoint(nc: NATS) -> None:
    """``$SRV.INFO.evflow`` lists the endpoint ``list`` on ``evflow.executions.list``."""
    info = json.loads((await call(nc, "$SRV.INFO.evflow")).data)

    endpoints = {endpoint["name"]: endpoint["subject"] for endpoint in info["endpoints"]}
    assert endpoints["list"] == LIST


@pytest.mark.parametrize("at_version", [0, -1, 5])
async def test_engine_get_refuses_a_version_it_cannot_fold_to(
    client: Client, engine_server: Server, at_version: int
) -> None:
    """``Engine.get`` guards itself, for Python callers that bypass the wire's decoding."""
    paused = await client.invoke("approval", APPROVAL)
    await client.resume("approval", paused.execution_id, YES)
    assert engine_server.engine is not None

    with pytest.raises(InvalidInput) as refused:
        await engine_server.engine.get(paused.execution_id, at_version)

    assert refused.value.field == "at_version"
    assert refused.value.execution_id == paused.execution_id
