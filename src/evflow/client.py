"""``evflow.Client``: how a Python service invokes, resumes and watches executions.

Error replies come back as the same exception classes the engine raised (see
``evflow.errors``), so a caller can write ``except Finished`` or branch on ``error.code``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import MaxPayloadError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import NoStreamResponseError

from .commands import IDEMPOTENCY_HEADER, PAUSE_HEADER
from .connection import connect
from .errors import EvflowError, TooLarge, Unavailable, from_body
from .events import StoredEvent
from .messages import (
    ExecutionList,
    Notification,
    Settled,
    error_decoder,
    history_decoder,
    list_decoder,
    notification_decoder,
    reply_decoder,
    state_decoder,
)
from .state import ExecutionState
from .store import ExecutionSummary
from .subjects import Subjects

logger = logging.getLogger(__name__)

DEFAULT_URL = "nats://127.0.0.1:4222"


class Client:
    """An async evflow client over one NATS connection.

    Args:
        nc: a connected NATS client.
        subjects: the engine's subjects (prefix ``evflow`` by default).
        timeout: seconds to wait for a reply.
    """

    def __init__(self, nc: NATS, subjects: Subjects | None = None, timeout: float = 30.0):
        self.nc = nc
        self.subjects = subjects or Subjects()
        self.timeout = timeout
        self._owns_connection = False

    @classmethod
    async def connect(
        cls, url: str = DEFAULT_URL, *, connect_timeout: float = 2.0, **kwargs: Any
    ) -> Client:
        """Connect to NATS at ``url`` and return a client that closes the connection.

        The first connection must succeed within ``connect_timeout`` seconds; after that,
        a lost connection is retried without limit.
        """
        hint = "start the engine with 'evflow serve' or pass the right --nats URL"
        nc = await connect(url, timeout=connect_timeout, hint=hint, name="evflow-client")
        client = cls(nc, **kwargs)
        client._owns_connection = True
        return client

    async def close(self) -> None:
        """Close the connection if this client opened it.

        A connection that is reconnecting or lost cannot drain; it is closed as it is, so
        closing never hides the error that made the caller give up.
        """
        if not self._owns_connection or self.nc.is_closed:
            return
        try:
            await self.nc.drain()
        except Exception as error:
            logger.debug("the NATS connection did not drain (%s); closing it", error)
            with suppress(Exception):
                await self.nc.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def invoke(
        self, flow: str, inputs: dict[str, Any] | None = None, *, idempotency_key: str | None = None
    ) -> Settled:
        """Start an execution of ``flow``; returns where it first settled."""
        return await self._command(self.subjects.invoke(flow), inputs, _headers(idempotency_key))

    async def resume(
        self,
        flow: str,
        execution_id: str,
        outputs: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        pause: int | None = None,
    ) -> Settled:
        """Answer an execution's pause; ``pause`` names it (its sequence) to be exact."""
        headers = _headers(idempotency_key)
        if pause is not None:
            headers[PAUSE_HEADER] = str(pause)
        return await self._command(self.subjects.resume(flow, execution_id), outputs, headers)

    async def cancel(
        self,
        flow: str,
        execution_id: str,
        reason: str | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> Settled:
        """End an execution that is not finished as cancelled; returns its final state."""
        body = {"reason": reason} if reason is not None else {}
        subject = self.subjects.cancel(flow, execution_id)
        return await self._command(subject, body, _headers(idempotency_key))

    async def _command(
        self, subject: str, fields: dict[str, Any] | None, headers: dict[str, str]
    ) -> Settled:
        """Send a command's fields as its JSON body and decode the settle point it answers."""
        msg = await self.request(subject, msgspec.json.encode(fields or {}), headers)
        return reply_decoder.decode(msg.data)

    async def publish_invoke(
        self, flow: str, inputs: dict[str, Any] | None = None, *, idempotency_key: str | None = None
    ) -> int:
        """Publish an invoke for durable intake; returns its sequence in the commands stream.

        No reply comes: the engine runs the command when it can, even if it is down now,
        and its outcome arrives as notifications (a refusal on ``<prefix>.events.rejected``).
        The key, when given, is also the message's ``Nats-Msg-Id``.
        """
        return await self._publish(
            self.subjects.durable_invoke(flow), inputs, _headers(idempotency_key, msg_id=True)
        )

    async def publish_resume(
        self,
        flow: str,
        execution_id: str,
        outputs: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        pause: int | None = None,
    ) -> int:
        """Publish a resume for durable intake; returns its sequence in the commands stream."""
        headers = _headers(idempotency_key, msg_id=True)
        if pause is not None:
            headers[PAUSE_HEADER] = str(pause)
        subject = self.subjects.durable_resume(flow, execution_id)
        return await self._publish(subject, outputs, headers)

    async def publish_cancel(
        self,
        flow: str,
        execution_id: str,
        reason: str | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> int:
        """Publish a cancel for durable intake; returns its sequence in the commands stream."""
        subject = self.subjects.durable_cancel(flow, execution_id)
        body = {"reason": reason} if reason is not None else {}
        return await self._publish(subject, body, _headers(idempotency_key, msg_id=True))

    async def _publish(self, subject: str, fields: Any, headers: dict[str, str]) -> int:
        body = msgspec.json.encode(fields or {})
        try:
            ack = await self.nc.jetstream().publish(
                subject, body, timeout=self.timeout, headers=headers or None
            )
        except (NoStreamResponseError, NatsTimeout):
            raise Unavailable(
                f"no JetStream stream stored the command on {subject}; start the engine once "
                "with 'evflow serve' so that it creates its streams"
            ) from None
        return ack.seq

    async def get(self, execution_id: str, at_version: int | None = None) -> ExecutionState:
        """The folded state of an execution, as it was at version ``at_version`` if given."""
        body = msgspec.json.encode({"at_version": at_version}) if at_version is not None else b""
        msg = await self.request(self.subjects.get(execution_id), body)
        return state_decoder.decode(msg.data)

    async def list_executions(
        self,
        flow: str | None = None,
        status: str | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> ExecutionList:
        """One page of executions, the most recently changed first, of one flow and in one
        status if given; pass its ``next`` as ``after`` for the page after it.

        ``limit`` is 100 unless given (at most 1000). The pages that follow one another by
        ``next`` are one snapshot: the log as it stood when the first page was read, so
        each execution that existed then is listed once, in its state then.
        """
        query = {"flow": flow, "status": status, "limit": limit, "after": after}
        body = msgspec.json.encode({k: v for k, v in query.items() if v is not None})
        msg = await self.request(self.subjects.list_executions(), body)
        return list_decoder.decode(msg.data)

    async def executions(
        self, flow: str | None = None, status: str | None = None, page_size: int | None = None
    ) -> AsyncIterator[ExecutionSummary]:
        """Every execution of the listing, page after page (see ``list_executions``)."""
        after: str | None = None
        while True:
            page = await self.list_executions(flow, status, page_size, after)
            for summary in page.executions:
                yield summary
            if page.next is None:
                return
            after = page.next

    async def history(self, execution_id: str) -> list[StoredEvent]:
        """The events of an execution in version order."""
        msg = await self.request(self.subjects.history(execution_id))
        return history_decoder.decode(msg.data).events

    async def notifications(
        self, flow: str | None = None, kind: str | None = None
    ) -> AsyncIterator[Notification]:
        """Notifications as they are published, of one flow or kind if given."""
        subscription = await self.nc.subscribe(self.subjects.notifications(flow, kind))
        try:
            async for msg in subscription.messages:
                yield notification_decoder.decode(msg.data)
        finally:
            await subscription.unsubscribe()

    async def request(
        self, subject: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Msg:
        """Send a raw request; raises the engine's error if the reply is one."""
        try:
            msg = await self.nc.request(subject, body, timeout=self.timeout, headers=headers)
        except MaxPayloadError:
            raise TooLarge(
                f"the request on {subject} is {len(body)} bytes, more than the "
                f"{self.nc.max_payload} NATS carries; send a smaller body"
            ) from None
        except NoRespondersError:
            raise Unavailable(
                f"no evflow engine answers on {subject}; start one with 'evflow serve'"
            ) from None
        except NatsTimeout:
            raise Unavailable(
                f"no reply on {subject} within {self.timeout:g} s; the engine may be "
                "overloaded or stopped"
            ) from None
        if msg.headers and "Nats-Service-Error-Code" in msg.headers:
            raise _error(msg)
        return msg


def _headers(idempotency_key: str | None, *, msg_id: bool = False) -> dict[str, str]:
    if idempotency_key is None:
        return {}
    headers = {IDEMPOTENCY_HEADER: idempotency_key}
    if msg_id:  # let the stream drop a repeat before the engine ever sees it
        headers["Nats-Msg-Id"] = idempotency_key
    return headers


def _error(msg: Msg) -> EvflowError:
    try:
        return from_body(error_decoder.decode(msg.data).error)
    except msgspec.DecodeError:
        headers = msg.headers or {}
        return EvflowError(
            headers.get("Nats-Service-Error", "the engine answered with an unreadable error"),
            status=headers.get("Nats-Service-Error-Code"),
        )
