"""Helpers for tests that speak the wire contract with raw NATS requests."""

from __future__ import annotations

import json
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from evflow.server import Server

EXECUTION_HEADER = "Evflow-Execution-Id"
APPROVAL = {"amount": 120.5, "requester": "ann"}
YES = {"approved": True, "note": "within budget"}
PURCHASE = {"item": "desk", "amount": 300.0, "buyer": "bo"}
MANAGER_YES = {"approved": True, "manager": "mia"}
FINANCE_YES = {"approved": True, "cost_center": "cc-7"}


def invoke_subject(flow: str) -> str:
    return f"evflow.flo.{flow}.invoke"


def resume_subject(flow: str, execution_id: str) -> str:
    return f"evflow.flo.{flow}.resume.{execution_id}"


async def call(
    nc: NATS, subject: str, body: Any = None, headers: dict[str, str] | None = None
) -> Msg:
    """One request; ``body`` is sent as is when bytes, as JSON otherwise (None: empty)."""
    data = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    return await nc.request(subject, data, timeout=20, headers=headers)


def reply(msg: Msg) -> dict[str, Any]:
    """The JSON body of a successful reply."""
    assert "Nats-Service-Error-Code" not in (msg.headers or {}), msg.data
    return json.loads(msg.data)


def error(msg: Msg, status: int, code: str) -> dict[str, Any]:
    """The ``error`` object of an error reply, after checking its headers and code."""
    headers = msg.headers or {}
    assert headers.get("Nats-Service-Error-Code") == str(status), (headers, msg.data)
    body = json.loads(msg.data)
    assert body["error"]["code"] == code, body
    assert headers["Nats-Service-Error"] == body["error"]["message"]
    assert body["error"]["message"]
    return body["error"]


async def invoke(nc: NATS, flow: str = "approval", inputs: Any = None) -> dict[str, Any]:
    """Invoke a flow and return its (successful) reply."""
    body = APPROVAL if inputs is None and flow == "approval" else inputs
    return reply(await call(nc, invoke_subject(flow), body))


async def resume(nc: NATS, flow: str, execution_id: str, outputs: Any) -> dict[str, Any]:
    """Resume an execution and return its (successful) reply."""
    return reply(await call(nc, resume_subject(flow, execution_id), outputs))


async def events(nc: NATS, execution_id: str) -> list[dict[str, Any]]:
    """The execution's events from the history query."""
    return reply(await call(nc, f"evflow.executions.history.{execution_id}"))["events"]


async def state(nc: NATS, execution_id: str) -> dict[str, Any]:
    """The execution's folded state from the get query."""
    return reply(await call(nc, f"evflow.executions.get.{execution_id}"))


def types(history: list[dict[str, Any]]) -> list[str]:
    return [stored["event"]["type"] for stored in history]


async def log_size(server: Server) -> int:
    """How many events the whole log of a running engine holds."""
    assert server.store is not None
    return len(await server.store.read_all(limit=1_000_000))
