"""Commands: what an invoke, a resume or a cancel asks, read from its subject, headers and body.

Requests (``service``) and durable intake (``intake``) carry the same commands in different
envelopes. Both read and run them here, so the same input is refused with the same error
whichever way it arrived.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from . import fields
from .engine import Engine
from .errors import InvalidInput, InvalidJson, TooLarge
from .state import ExecutionState

IDEMPOTENCY_HEADER = "Idempotency-Key"
PAUSE_HEADER = "Evflow-Pause"
MAX_BODY_BYTES = 256 * 1024
"""Largest command body accepted: its fields travel again in replies and notifications,
which must fit in one NATS message (1 MiB by default)."""
MAX_KEY_LENGTH = 512
"""Longest idempotency key accepted: keys are stored with every command they mark."""


class Invoke(msgspec.Struct, frozen=True):
    """Start an execution of ``flow`` with the input fields in ``body``."""

    flow: str
    body: bytes
    idempotency_key: str | None = None


class Resume(msgspec.Struct, frozen=True):
    """Answer the pending pause of an execution with the output fields in ``body``."""

    flow: str
    execution_id: str
    body: bytes
    idempotency_key: str | None = None
    pause: int | None = None


class Cancel(msgspec.Struct, frozen=True):
    """End an execution as cancelled, with an optional ``reason``."""

    flow: str
    execution_id: str
    reason: str | None = None
    idempotency_key: str | None = None


class CancelBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The body of a cancel: why, optionally."""

    reason: str | None = None
    """Why the execution is cancelled, kept in its ``ExecutionCancelled`` event."""


Command = Invoke | Resume | Cancel


def parse(
    tokens: list[str],
    headers: Mapping[str, str] | None,
    body: bytes,
    default_key: str | None = None,
) -> Command:
    """The command that subject ``tokens`` (after the prefix), ``headers`` and ``body`` ask.

    ``default_key`` is the idempotency key used when the headers carry none.
    """
    headers = headers or {}
    execution_id = named_execution(tokens)
    match tokens:
        case ["flo", flow, "invoke"]:
            key = _key(headers, None) or default_key
            return Invoke(flow, _object(body), key)
        case ["flo", flow, "resume", execution_id]:
            key = _key(headers, execution_id) or default_key
            pause = _pause(headers, execution_id)
            return Resume(flow, execution_id, _object(body, execution_id), key, pause)
        case ["flo", flow, "cancel", execution_id]:
            key = _key(headers, execution_id) or default_key
            what = f"cancel of execution {execution_id}"
            reason = fields.decode(_object(body, execution_id), CancelBody, what, execution_id)
            return Cancel(flow, execution_id, reason.reason, key)
    raise InvalidInput(
        f"'{'.'.join(tokens)}' is not a command subject; send flo.<flow>.invoke, "
        "flo.<flow>.resume.<execution_id> or flo.<flow>.cancel.<execution_id> after the "
        "prefix",
        execution_id=execution_id,
        field="subject",
    )


def named_execution(tokens: list[str]) -> str | None:
    """The execution a command subject names (a resume's or a cancel's), if any."""
    if len(tokens) == 4 and tokens[0] == "flo" and tokens[2] in ("resume", "cancel"):
        return tokens[3]
    return None


async def run(engine: Engine, command: Command, execution_id: str | None = None) -> ExecutionState:
    """Run a command on the engine; returns where the execution settled. An invoke starts
    its execution under ``execution_id`` if given (a partition the engine holds)."""
    match command:
        case Invoke():
            return await engine.invoke(
                command.flow, command.body, command.idempotency_key, execution_id
            )
        case Resume():
            return await engine.resume(
                command.flow,
                command.execution_id,
                command.body,
                command.idempotency_key,
                command.pause,
            )
        case Cancel():
            return await engine.cancel(
                command.flow, command.execution_id, command.reason, command.idempotency_key
            )


def _object(body: bytes, execution_id: str | None = None) -> bytes:
    """The body, once it is known to be one JSON object (an empty body stands for {})."""
    if not body.strip():
        return b"{}"
    if len(body) > MAX_BODY_BYTES:
        raise TooLarge(
            f"the body is {len(body)} bytes; send at most {MAX_BODY_BYTES} (keep large data "
            "elsewhere and pass a reference to it)",
            execution_id=execution_id,
            field="body",
        )
    try:
        value = msgspec.json.decode(body)
    except msgspec.DecodeError as error:
        raise InvalidJson(
            f'the body is not valid JSON ({error}); send a JSON object such as {{"name": 1}}',
            execution_id=execution_id,
        ) from None
    except RecursionError:
        raise InvalidJson(
            "the body nests arrays or objects too deeply to read; send a flatter JSON object",
            execution_id=execution_id,
        ) from None
    if not isinstance(value, dict):
        raise InvalidJson(
            f"the body must be a JSON object, not {_json_kind(value)}; wrap the fields in {{...}}",
            execution_id=execution_id,
        )
    return body


def _json_kind(value: object) -> str:
    """What a decoded JSON value is, in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    kinds = {list: "an array", str: "a string", int: "a number", float: "a number"}
    return kinds.get(type(value), "a JSON value")


def _key(headers: Mapping[str, str], execution_id: str | None) -> str | None:
    key = headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    if not key.strip():
        problem = "is empty; send a non-empty key or no header"
    elif len(key) > MAX_KEY_LENGTH:
        problem = f"is {len(key)} characters long; send at most {MAX_KEY_LENGTH}"
    else:
        return key
    raise InvalidInput(
        f"the {IDEMPOTENCY_HEADER} header {problem}",
        execution_id=execution_id,
        field=IDEMPOTENCY_HEADER,
    )


def _pause(headers: Mapping[str, str], execution_id: str) -> int | None:
    value = headers.get(PAUSE_HEADER)
    if value is None:
        return None
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or int(text) < 1:  # '²' is a digit to isdigit
        raise InvalidInput(
            f"the {PAUSE_HEADER} header must be the sequence of the pause to answer (a "
            f"positive integer from the pause reply), not '{value}'",
            execution_id=execution_id,
            field=PAUSE_HEADER,
        )
    return int(value)
