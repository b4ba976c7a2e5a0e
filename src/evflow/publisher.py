"""Publishing notifications to JetStream and collecting the stream's acknowledgements.

The outbox publishes every event it reads and must know that the stream stored each one
before it moves its checkpoint. nats-py's ``publish_async`` does this with machinery that
profiling showed to be a fifth of the engine's time under load (a random token per message,
a semaphore, a dataclass decode with deep copies per acknowledgement). Here each message is
a plain publish whose reply subject carries a counter, and one subscription decodes the
acknowledgements with msgspec.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from .errors import Unavailable

logger = logging.getLogger(__name__)

_NO_RESPONDERS = "503"


class _AckError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _Ack(msgspec.Struct):
    """A JetStream publish acknowledgement, or its refusal."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _AckError | None = None


_decode_ack = msgspec.json.Decoder(_Ack).decode


class StreamPublisher:
    """Publishes to subjects a JetStream stream captures; each publish gives a future that
    the stream's acknowledgement resolves (or its refusal fails, as ``Unavailable``).

    Args:
        nc: the NATS connection.
    """

    def __init__(self, nc: NATS):
        self._nc = nc
        self._inbox = ""
        self._subscription: Subscription | None = None
        self._waiting: dict[int, asyncio.Future[int]] = {}
        self._sent = 0

    async def start(self) -> None:
        """Subscribe to the acknowledgements."""
        self._inbox = self._nc.new_inbox()
        self._subscription = await self._nc.subscribe(f"{self._inbox}.*", cb=self._acknowledged)

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str]
    ) -> asyncio.Future[int]:
        """Publish a message; the future gives its stream sequence once the stream stored it."""
        self._sent += 1
        acked: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting[self._sent] = acked
        await self._nc.publish(subject, payload, f"{self._inbox}.{self._sent}", headers)
        return acked

    def forget(self) -> None:
        """Give up on every acknowledgement still awaited (the caller publishes again)."""
        for acked in self._waiting.values():
            acked.cancel()
        self._waiting.clear()

    async def close(self) -> None:
        """Stop listening for acknowledgements; those still awaited are given up."""
        self.forget()
        if self._subscription is not None:
            try:
                await self._subscription.unsubscribe()
            except Exception as error:  # the connection is closing anyway
                logger.debug("unsubscribing from acknowledgements: %s", error)
            self._subscription = None

    async def _acknowledged(self, msg: Msg) -> None:
        number = msg.subject.rpartition(".")[2]
        ours = number.isascii() and number.isdigit()
        acked = self._waiting.pop(int(number), None) if ours else None
        if acked is None or acked.done():
            return
        if msg.headers and msg.headers.get("Status") == _NO_RESPONDERS:
            acked.set_exception(
                Unavailable(
                    "no JetStream stream answered for notifications: on a cluster it may be "
                    "electing a leader (the outbox retries); if this goes on, the stream is "
                    "missing: the engine creates it at start, so restart the engine, or check "
                    "that JetStream is enabled (nats-server -js)"
                )
            )
            return
        try:
            ack = _decode_ack(msg.data)
        except msgspec.DecodeError as error:
            unreadable = f"JetStream sent an unreadable acknowledgement ({error}); retrying"
            acked.set_exception(Unavailable(unreadable))
            return
        if ack.error is not None:
            acked.set_exception(
                Unavailable(
                    f"JetStream refused a notification ({ack.error.code} "
                    f"{ack.error.description}); the outbox retries it"
                )
            )
            return
        acked.set_result(ack.seq)
