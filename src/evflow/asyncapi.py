"""The AsyncAPI 3.0 document of evflow's NATS interface: subjects, messages and headers.

It describes the engine's side: the requests and durable commands it receives (with the
replies it sends) and the notifications and rejections it publishes. Addresses are built
by ``subjects.Subjects`` itself, with placeholders for the flow, execution and kind, and
the header names are the constants the engine uses, so neither can drift from the code.
Message payloads refer to the JSON Schema files beside the document (see ``schemas``).

The tables below are the whole interface: a new endpoint is one ``Channel`` line, a new
message one ``Message`` line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER

from . import __version__
from .client import DEFAULT_URL
from .commands import IDEMPOTENCY_HEADER, MAX_KEY_LENGTH, PAUSE_HEADER
from .errors import WIRE_ERRORS
from .events import EVENT_TYPES
from .outbox import POSITION_HEADER
from .service import EXECUTION_HEADER
from .subjects import Subjects

PATH = "asyncapi.json"
"""Where the document goes in the schemas folder."""

SCHEMA_FORMAT = "application/schema+json;version=2020-12"
"""The payload files are JSON Schema draft 2020-12, not AsyncAPI's own schema dialect."""

MSG_ID_HEADER = "Nats-Msg-Id"

_PLACEHOLDERS = {"__flow__": "flow", "__execution_id__": "execution_id", "__kind__": "kind"}
FLOW, EXECUTION, KIND = _PLACEHOLDERS


class Message(NamedTuple):
    """A message: its payload's schema file (None: no body), its headers, what it is."""

    name: str
    payload: str | None
    headers: tuple[str, ...]
    summary: str
    required: tuple[str, ...] = ()


class Channel(NamedTuple):
    """A subject, what the engine does on it, and the messages it carries and answers."""

    name: str
    subject: Callable[[Subjects], str]
    action: str
    """``receive``: the engine takes it; ``send``: the engine publishes it."""
    messages: tuple[str, ...]
    summary: str
    replies: tuple[str, ...] = ()
    """The messages the engine answers with; empty: no reply."""


HEADERS: dict[str, dict[str, Any]] = {
    IDEMPOTENCY_HEADER: {
        "type": "string",
        "pattern": "\\S",
        "maxLength": MAX_KEY_LENGTH,
        "description": "A repeat with the same key gets the first command's outcome; invoke "
        "keys are scoped to the flow, resume and cancel keys to the execution and kind.",
    },
    PAUSE_HEADER: {
        "type": "string",
        "pattern": "^[0-9]*[1-9][0-9]*$",
        "description": "The sequence of the pause this resume answers (from the paused reply).",
    },
    MSG_ID_HEADER: {
        "type": "string",
        "description": "JetStream deduplication ID: `<execution_id>:<version>` on a "
        "notification; on a durable command, its idempotency key when it has no "
        "Idempotency-Key.",
    },
    EXECUTION_HEADER: {"type": "string", "description": "The execution the reply concerns."},
    ERROR_HEADER: {"type": "string", "description": "The error's message."},
    ERROR_CODE_HEADER: {
        "enum": sorted({str(cls.status) for cls in WIRE_ERRORS}),
        "description": "The error's HTTP-like status.",
    },
    POSITION_HEADER: {
        "type": "string",
        "pattern": "^[0-9]+$",
        "description": "The event's position in the whole log.",
    },
}

_DURABLE = (IDEMPOTENCY_HEADER, MSG_ID_HEADER)

MESSAGES: tuple[Message, ...] = (
    Message("invoke", "commands/invoke.json", (IDEMPOTENCY_HEADER,), "The flow's input fields"),
    Message(
        "resume",
        "commands/resume.json",
        (IDEMPOTENCY_HEADER, PAUSE_HEADER),
        "The pause's output fields",
    ),
    Message("cancel", "commands/cancel.json", (IDEMPOTENCY_HEADER,), "Why, optionally"),
    Message("durableInvoke", "commands/invoke.json", _DURABLE, "The flow's input fields"),
    Message(
        "durableResume",
        "commands/resume.json",
        (*_DURABLE, PAUSE_HEADER),
        "The pause's output fields",
    ),
    Message("durableCancel", "commands/cancel.json", _DURABLE, "Why, optionally"),
    Message("query", None, (), "An empty body; what is sent is ignored"),
    Message("getQuery", "commands/get.json", (), "Empty, or the version to fold up to"),
    Message("listQuery", "commands/list.json", (), "Filters, page size and page cursor"),
    Message("list", "replies/list.json", (), "A page of executions, newest change first"),
    Message(
        "settled",
        "replies/settled.json",
        (EXECUTION_HEADER,),
        "Where the execution settled",
        (EXECUTION_HEADER,),
    ),
    Message(
        "state",
        "replies/state.json",
        (EXECUTION_HEADER,),
        "The execution's folded state",
        (EXECUTION_HEADER,),
    ),
    Message(
        "history",
        "replies/history.json",
        (EXECUTION_HEADER,),
        "The execution's events",
        (EXECUTION_HEADER,),
    ),
    Message(
        "error",
        "error.json",
        (ERROR_HEADER, ERROR_CODE_HEADER, EXECUTION_HEADER),
        "Why the request was refused",
        (ERROR_HEADER, ERROR_CODE_HEADER),
    ),
    Message(
        "notification",
        "notification.json",
        (MSG_ID_HEADER, POSITION_HEADER),
        "An event, once durable in the log",
        (MSG_ID_HEADER, POSITION_HEADER),
    ),
    Message(
        "rejection",
        "rejection.json",
        (MSG_ID_HEADER,),
        "Why a durable command was refused",
        (MSG_ID_HEADER,),
    ),
)

_COMMAND_REPLIES = ("settled", "error")

CHANNELS: tuple[Channel, ...] = (
    Channel(
        "invoke",
        lambda s: s.invoke(FLOW),
        "receive",
        ("invoke",),
        "Start an execution; the reply is its first settle point.",
        _COMMAND_REPLIES,
    ),
    Channel(
        "resume",
        lambda s: s.resume(FLOW, EXECUTION),
        "receive",
        ("resume",),
        "Answer an execution's pause; the reply is its next settle point.",
        _COMMAND_REPLIES,
    ),
    Channel(
        "cancel",
        lambda s: s.cancel(FLOW, EXECUTION),
        "receive",
        ("cancel",),
        "End a paused, waiting or running execution as cancelled.",
        _COMMAND_REPLIES,
    ),
    Channel(
        "get",
        lambda s: s.get(EXECUTION),
        "receive",
        ("getQuery",),
        "An execution's state, folded from its events (up to `at_version` if given).",
        ("state", "error"),
    ),
    Channel(
        "list",
        lambda s: s.list_executions(),
        "receive",
        ("listQuery",),
        "Executions with their status, flow and last change, paged by `next`.",
        ("list", "error"),
    ),
    Channel(
        "history",
        lambda s: s.history(EXECUTION),
        "receive",
        ("query",),
        "An execution's events in version order.",
        ("history", "error"),
    ),
    Channel(
        "durableInvoke",
        lambda s: s.durable_invoke(FLOW),
        "receive",
        ("durableInvoke",),
        "An invoke published to JetStream (stream EVFLOW_COMMANDS); no reply, the outcome "
        "is notified.",
    ),
    Channel(
        "durableResume",
        lambda s: s.durable_resume(FLOW, EXECUTION),
        "receive",
        ("durableResume",),
        "A resume published to JetStream (stream EVFLOW_COMMANDS); no reply.",
    ),
    Channel(
        "durableCancel",
        lambda s: s.durable_cancel(FLOW, EXECUTION),
        "receive",
        ("durableCancel",),
        "A cancel published to JetStream (stream EVFLOW_COMMANDS); no reply.",
    ),
    Channel(
        "notification",
        lambda s: s.notification(FLOW, EXECUTION, KIND),
        "send",
        ("notification",),
        "Every event, once durable, published to JetStream (stream EVFLOW_EVENTS).",
    ),
    Channel(
        "rejected",
        lambda s: s.rejected(),
        "send",
        ("rejection",),
        "The refusal of a durable command (stream EVFLOW_EVENTS); the command is not retried.",
    ),
)
"""Every subject of the interface; a new endpoint is one more line here."""

PARAMETERS: dict[str, dict[str, Any]] = {
    "flow": {"description": "A registered flow's name: 1 to 128 letters, digits, '-' or '_'."},
    "execution_id": {"description": "An execution's ID (32 hex digits, given by the engine)."},
    "kind": {
        "description": "What happened: the event's notification kind.",
        "enum": sorted(cls.kind for cls in EVENT_TYPES),
    },
}


def document(subjects: Subjects | None = None) -> dict[str, Any]:
    """The AsyncAPI document for an engine serving ``subjects`` (prefix ``evflow``)."""
    subjects = subjects or Subjects()
    host = urlsplit(DEFAULT_URL)
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for channel in CHANNELS:
        channels[channel.name] = _channel(channel, subjects)
        operations[channel.name] = _operation(channel)
        if channel.replies:
            channels[_reply(channel)] = {
                "address": None,
                "description": "The request's reply inbox, chosen by the requester.",
                "messages": _refs(channel.replies),
            }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "evflow",
            "version": __version__,
            "description": "Commands, queries and notifications of an evflow engine. Subjects "
            f"start with the prefix `{subjects.prefix}` unless the engine is configured with "
            "another. Errors follow the NATS micro convention.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "embedded": {
                "host": host.netloc,
                "protocol": host.scheme,
                "description": "The nats-server `evflow serve` starts when given no --nats.",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": {m.name: _message(m) for m in MESSAGES}},
    }


def _channel(channel: Channel, subjects: Subjects) -> dict[str, Any]:
    address = channel.subject(subjects)
    names = [name for token, name in _PLACEHOLDERS.items() if token in address]
    for token, name in _PLACEHOLDERS.items():
        address = address.replace(token, "{" + name + "}")
    body: dict[str, Any] = {
        "address": address,
        "description": channel.summary,
        "messages": _refs(channel.messages),
    }
    if names:
        body["parameters"] = {name: PARAMETERS[name] for name in names}
    return body


def _operation(channel: Channel) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "action": channel.action,
        "channel": {"$ref": f"#/channels/{channel.name}"},
        "summary": channel.summary,
        "messages": [{"$ref": f"#/channels/{channel.name}/messages/{m}"} for m in channel.messages],
    }
    if channel.replies:
        reply = _reply(channel)
        operation["reply"] = {
            "channel": {"$ref": f"#/channels/{reply}"},
            "messages": [{"$ref": f"#/channels/{reply}/messages/{m}"} for m in channel.replies],
        }
    return operation


def _reply(channel: Channel) -> str:
    return f"{channel.name}Reply"


def _refs(names: tuple[str, ...]) -> dict[str, Any]:
    return {name: {"$ref": f"#/components/messages/{name}"} for name in names}


def _message(message: Message) -> dict[str, Any]:
    body: dict[str, Any] = {"name": message.name, "summary": message.summary}
    if message.payload is not None:
        body["payload"] = {
            "schemaFormat": SCHEMA_FORMAT,
            "schema": {"$ref": f"./{message.payload}"},
        }
    if message.headers:
        headers = {"type": "object", "properties": {n: HEADERS[n] for n in message.headers}}
        if message.required:
            headers["required"] = list(message.required)
        body["headers"] = headers
    return body
