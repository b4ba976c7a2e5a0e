"""Notifications: every durably appended event, published on its subject in append order.

One task publishes whatever has queued up since it last ran, so a burst of appends costs
one wake-up rather than a task per event. Each notification carries
``Nats-Msg-Id: <execution_id>:<version>`` so that JetStream can drop a duplicate.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client as NATS

from .events import StoredEvent
from .messages import encoder, notification
from .subjects import Subjects

logger = logging.getLogger(__name__)


class Notifier:
    """Publishes notifications of appended events.

    Known limit: the queue lives in memory, so a crash between an append and its
    publication loses that notification (the event itself is safe in the log).
    TODO(#3): publish by tailing the log from a stored checkpoint (the outbox).
    """

    def __init__(self, nc: NATS, subjects: Subjects):
        self._nc = nc
        self._subjects = subjects
        self._queue: asyncio.Queue[tuple[str, list[StoredEvent]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start publishing."""
        self._task = asyncio.create_task(self._run(), name="evflow-notifier")

    def __call__(self, flow: str, events: list[StoredEvent]) -> None:
        """Queue the notifications of one append."""
        self._queue.put_nowait((flow, events))

    async def close(self) -> None:
        """Publish what is queued, then stop."""
        if self._task is None:
            return
        await self._queue.join()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                for flow, events in batch:
                    for stored in events:
                        await self._publish(flow, stored)
            except Exception:
                logger.warning("publishing notifications failed", exc_info=True)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _publish(self, flow: str, stored: StoredEvent) -> None:
        message = notification(flow, stored, self._subjects)
        subject = self._subjects.notification(flow, stored.execution_id, message.kind)
        msg_id = f"{stored.execution_id}:{stored.version}"
        await self._nc.publish(subject, encoder.encode(message), headers={"Nats-Msg-Id": msg_id})
