"""The queries: what a get or a listing request asks, read from its body, and their answers.

A query body is optional JSON; a field of the wrong type or out of range is refused with
``invalid_input`` naming it and saying what it takes. A listing page ends with a ``next``
token: the position of its last row's latest event, wrapped so that callers pass it back
as it is rather than build one.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import msgspec

from . import fields
from .engine import Engine
from .errors import InvalidInput
from .messages import MAX_LIST_LIMIT, ExecutionList, GetQuery, ListQuery
from .state import Status

_TOKEN_PREFIX = "position:"

_LIST_FIELDS: dict[str, str] = {
    "flow": "a flow name",
    "status": f"one of {', '.join(Status)}",
    "limit": f"an integer from 1 to {MAX_LIST_LIMIT}",
    "after": "the 'next' token of the previous page (leave it out to start from the newest)",
}
"""What each listing field takes, for the message refusing a bad one."""


def get_query(body: bytes, execution_id: str) -> GetQuery:
    """The get query in ``body``; an empty body asks for the latest state."""
    what = f"get query of execution {execution_id}"
    try:
        query = fields.decode(body.strip(), GetQuery, what, execution_id)
    except InvalidInput as error:
        if error.field != "at_version":
            raise
        shown = _shown(body, "at_version")
        raise InvalidInput(
            f"at_version must be an integer >= 1, not {shown}: a version of execution "
            f"{execution_id} to fold up to; leave it out for the latest state",
            execution_id=execution_id,
            field="at_version",
        ) from None
    assert isinstance(query, GetQuery)
    return query


def list_query(body: bytes) -> ListQuery:
    """The listing query in ``body``; an empty body lists the most recent executions."""
    try:
        query = fields.decode(body.strip(), ListQuery, "listing query")
    except InvalidInput as error:
        takes = _LIST_FIELDS.get(error.field or "")
        if takes is None:
            raise
        raise _bad_field(error.field or "", _shown(body, error.field or ""), takes) from None
    assert isinstance(query, ListQuery)
    if query.after is not None:
        cursor_of(query.after)
    return query


async def list_page(engine: Engine, query: ListQuery) -> ExecutionList:
    """One page of the listing the query asks for, and the token of the page after it.

    The first page fixes the snapshot (the log's end as it is read); the token carries it,
    so every later page lists the log as it stood then.
    """
    if query.after is not None:
        before, as_of = cursor_of(query.after)
    else:
        before, as_of = None, await engine.store.last_position()

    # One row more than the page shows whether another page follows.
    rows = await engine.list_executions(query.flow, query.status, query.limit + 1, before, as_of)
    page = rows[: query.limit]
    more = len(rows) > query.limit
    return ExecutionList(
        executions=page, next=page_token(page[-1].position, as_of) if more else None
    )


def page_token(position: int, as_of: int) -> str:
    """The ``next`` token of a page whose last row's latest event is at ``position``, in
    the snapshot of the log up to ``as_of``."""
    raw = f"{_TOKEN_PREFIX}{position}:{as_of}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def cursor_of(token: str) -> tuple[int, int]:
    """The position and snapshot a ``next`` token carries; a token this engine did not give
    is refused."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        before, _, as_of = raw.removeprefix(_TOKEN_PREFIX).partition(":")
        cursor = (int(before), int(as_of)) if raw.startswith(_TOKEN_PREFIX) else (0, 0)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        cursor = (0, 0)
    if min(cursor) < 1:
        shown = token if len(token) <= 40 else f"{token[:40]}..."
        raise _bad_field("after", f"'{shown}'", _LIST_FIELDS["after"])
    return cursor


def _bad_field(field: str, shown: str, takes: str) -> InvalidInput:
    details: dict[str, Any] = {"field": field}
    if field == "status":
        details["valid"] = [status.value for status in Status]
    return InvalidInput(
        f"the listing query's {field} must be {takes}, not {shown}; send the listing fields "
        "flow, status, limit and after, each optional",
        **details,
    )


def _shown(body: bytes, field: str) -> str:
    """The value ``body`` gave ``field``, as JSON cut to 40 characters, for a message."""
    try:
        value = msgspec.json.decode(body).get(field)
    except (msgspec.DecodeError, AttributeError, RecursionError):
        return "a value too deep or too malformed to show"
    text = msgspec.json.encode(value).decode()
    return text if len(text) <= 40 else f"{text[:40]}..."
