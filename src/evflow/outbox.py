"""The outbox: every appended event becomes a notification, published by tailing the log.

The outbox keeps its place in the log as a checkpoint in the store. It reads the events
after the checkpoint in global order, publishes them to JetStream (stream
``EVFLOW_EVENTS``) with ``Nats-Msg-Id: <execution_id>:<version>``, waits for the stream
to acknowledge them, and only then moves the checkpoint. The checkpoint is saved at most
once a second under load (each save is a durable write), when the outbox goes idle, and on
stop. A crash publishes the events acknowledged since the last save again on restart, and
the stream's duplicate window drops the copies.

Engines sharing a log on a cluster (``shared``) publish through one outbox: the one of the
engine holding partition 0 (``router``), which reads the log from the saved checkpoint when
it takes over. The others ping ``<prefix>.appended`` after their appends, so that it
publishes at once rather than at its next look.

Known limit: an engine that stays down longer than the duplicate window (2 minutes by
default) and restarts re-publishes the events of its last unfinished batch as new stream
messages. Subscribers see each such event twice and can drop the copy by ``Nats-Msg-Id``;
the log itself is unaffected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from .errors import StoreError
from .events import ExecutionStarted, StoredEvent
from .messages import Notification, encoder, notification, slim
from .publisher import StreamPublisher
from .store import EventStore
from .subjects import Subjects

logger = logging.getLogger(__name__)

_HEADROOM = 1024
"""Bytes of a message kept free for its subject and headers."""

POSITION_HEADER = "Evflow-Position"
"""Header carrying an event's global position in the log, for consumers that track it."""


class Outbox:
    """Publishes the log, in order, as notifications.

    Args:
        store: the log to tail.
        nc: the NATS connection to publish through.
        subjects: where notifications go.
        batch: events read and published at a time.
        poll: seconds between looks at the log when nothing woke the outbox; this is how
            appends by another engine on the same file are found.
        timeout: seconds to wait for the stream to acknowledge a batch.
        checkpoint_every: seconds between checkpoint saves while there is more to publish.
        shared: engines share the log: this outbox publishes only while ``lead`` says so.
    """

    CHECKPOINT = "outbox"

    def __init__(
        self,
        store: EventStore,
        nc: NATS,
        subjects: Subjects,
        *,
        batch: int = 256,
        poll: float = 1.0,
        timeout: float = 5.0,
        checkpoint_every: float = 1.0,
        shared: bool = False,
    ):
        self._store = store
        self._nc = nc
        self._publisher = StreamPublisher(nc)
        self._subjects = subjects
        self._batch = batch
        self._poll = poll
        self._timeout = timeout
        self._checkpoint_every = checkpoint_every
        self._saved = (0, 0.0)  # the position last saved, and when
        self._flows: OrderedDict[str, str] = OrderedDict()
        self._followers: list[Callable[[str, StoredEvent], None]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._draining = False
        self._shared = shared
        self._leading = asyncio.Event()
        self._pinged = False
        self._pings: Subscription | None = None
        self._terms = 0  # times told to stand by: a lead under way then does not start
        self._handing_over: asyncio.Future[None] | None = None
        if not shared:
            self._leading.set()
        self.position = 0
        """Global position of the last event the stream acknowledged."""
        self.published = 0
        """Notifications published since start."""

    async def start(self) -> None:
        """Load the checkpoint and start publishing from it."""
        self.position = await self._store.load_checkpoint(self.CHECKPOINT)
        self._saved = (self.position, time.monotonic())
        await self._publisher.start()
        self._task = asyncio.create_task(self._run(), name="evflow-outbox")
        logger.info("outbox publishing from log position %d", self.position)

    def follow(self, follower: Callable[[str, StoredEvent], None]) -> None:
        """Tell ``follower`` of every event published from now on, with its flow, in log
        order: engines on the same log learn each other's timers this way."""
        self._followers.append(follower)

    def __call__(self, flow: str, events: list[StoredEvent]) -> None:
        """Told of a durable append by this engine: remember the flow, publish soon (or
        have the leading outbox publish soon)."""
        self._remember(events[0].execution_id, flow)
        if self._leading.is_set():
            self._wake.set()
        elif not self._pinged:  # one ping for all the appends of this turn of the loop
            self._pinged = True
            asyncio.get_running_loop().call_soon(self._ping)

    def _ping(self) -> None:
        self._pinged = False
        if not self._nc.is_closed:
            asyncio.ensure_future(self._nc.publish(self._subjects.appended(), b""))

    @property
    def leading(self) -> bool:
        """Whether this outbox publishes (always, unless engines share the log)."""
        return self._leading.is_set()

    async def lead(self) -> None:
        """Publish from the saved checkpoint on (this engine took partition 0). Told to
        stand by meanwhile, it does not start."""
        if self._leading.is_set():
            return
        term = self._terms
        position = await self._store.load_checkpoint(self.CHECKPOINT)  # may fail: not leading
        if term != self._terms:
            return
        pings = await self._nc.subscribe(self._subjects.appended(), cb=self._woken)
        if term != self._terms:
            await pings.unsubscribe()
            return
        self._pings, self.position = pings, position
        self._saved = (self.position, time.monotonic())
        self._leading.set()
        self._wake.set()
        logger.info("this engine's outbox publishes from log position %d", self.position)

    def stop_leading(self) -> None:
        """Stop publishing at once (this engine lost partition 0, and another may hold it);
        the checkpoint is saved in the background, as NATS may be out of reach."""
        self._terms += 1
        if not self._leading.is_set():
            return
        self._leading.clear()
        self._handing_over = asyncio.ensure_future(self._hand_over())

    async def stand_by(self) -> None:
        """Stop publishing and save the checkpoint: another engine's outbox takes over
        from it (this engine let go of partition 0)."""
        self.stop_leading()
        if self._handing_over is not None:
            await self._handing_over

    async def _hand_over(self) -> None:
        subscription, self._pings = self._pings, None
        try:
            if subscription is not None:
                await subscription.unsubscribe()
            await self._save_checkpoint(when_due=False, handing_over=True)
        except Exception as error:  # the next publisher starts further back: the stream
            logger.warning(  # drops, within its duplicate window, what it publishes again
                "the outbox could not save its checkpoint at log position %d on standing "
                "by (%s); the next publisher starts from an earlier one",
                self.position,
                error,
            )
            return
        logger.info("this engine's outbox stands by at log position %d", self.position)

    async def _woken(self, msg: Msg) -> None:
        self._wake.set()

    async def close(self, timeout: float = 10.0) -> None:
        """Publish everything appended so far (for at most ``timeout`` seconds), then stop."""
        if self._task is None:
            return
        self._draining = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            logger.warning(
                "the outbox stopped at log position %d before publishing everything; the "
                "next start publishes the rest",
                self.position,
            )
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        if self._handing_over is not None:  # a checkpoint saved on losing partition 0
            await asyncio.gather(self._handing_over, return_exceptions=True)
        await self._publisher.close()

    async def _run(self) -> None:
        failures = 0
        while True:
            if not self._leading.is_set():
                if self._draining:
                    return
                await self._idle()
                continue
            try:
                events = await self._store.read_all(self.position, self._batch)
                if events:
                    await self._publish(events)
                    await self._save_checkpoint(when_due=True)
                    failures = 0
                    continue
                await self._save_checkpoint(when_due=False)  # idle: save now
            except Exception as error:
                failures += 1
                delay = min(0.1 * 2**failures, 5.0)
                damaged = isinstance(error, StoreError)  # retrying will not mend the log
                logger.log(
                    logging.ERROR if damaged else logging.WARNING,
                    "publishing notifications after log position %d failed (%s); retrying "
                    "in %.1f s",
                    self.position,
                    error or type(error).__name__,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            if self._draining:
                return
            await self._idle()

    async def _idle(self) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), self._poll)
        except TimeoutError:
            pass

    async def _publish(self, events: list[StoredEvent]) -> None:
        """Publish a batch, wait for every acknowledgement, then move the checkpoint."""
        acks, flows = [], []
        try:
            for stored in events:
                flow = await self._flow_of(stored)
                flows.append(flow)
                message = notification(flow, stored, self._subjects)
                subject = self._subjects.notification(flow, stored.execution_id, message.kind)
                headers = {
                    "Nats-Msg-Id": f"{stored.execution_id}:{stored.version}",
                    POSITION_HEADER: str(stored.position),
                }
                payload = self._payload(message)
                acks.append(await self._publisher.publish(subject, payload, headers))
            await asyncio.wait_for(asyncio.gather(*acks), self._timeout)
        except BaseException:
            self._publisher.forget()  # the whole batch is published again
            raise

        self.position = events[-1].position
        self.published += len(events)
        for follower in self._followers:
            for stored, flow in zip(events, flows, strict=True):
                follower(flow, stored)
        logger.debug("published %d notifications up to position %d", len(events), self.position)

    async def _save_checkpoint(self, when_due: bool, handing_over: bool = False) -> None:
        """Save the position reached, if it moved (and, ``when_due``, if a save is due);
        on a shared log only while leading or handing over, not over the next leader's."""
        if not handing_over and not self._leading.is_set():
            return
        position, at = self._saved
        now = time.monotonic()
        if self.position == position or (when_due and now - at < self._checkpoint_every):
            return
        await self._store.save_checkpoint(self.CHECKPOINT, self.position)
        self._saved = (self.position, now)

    def _payload(self, message: Notification) -> bytes:
        """The notification's JSON; without its event when that would not fit in a message.

        A notification NATS refuses would stop the outbox for good, holding back every
        later one, so an oversized event is announced without its content instead. Known
        limit: such an event cannot be read over NATS either (queries answer too_large);
        only the log itself (sqlite3, and export in issue 5) shows it.
        """
        payload = encoder.encode(message)
        if len(payload) <= self._nc.max_payload - _HEADROOM:
            return payload
        logger.warning(
            "the %s event of execution %s (version %d) is %d bytes, too large to publish; "
            "its notification says oversized; the event is in the log",
            message.kind,
            message.execution_id,
            message.version,
            len(payload),
        )
        return encoder.encode(slim(message))

    async def _flow_of(self, stored: StoredEvent) -> str:
        """The flow of an event's execution: known from its start, or read once from the log."""
        execution_id = stored.execution_id
        if isinstance(stored.event, ExecutionStarted):
            self._remember(execution_id, stored.event.flow)
        flow = self._flows.get(execution_id)
        if flow is None:
            first = await self._store.read(execution_id, 1)
            assert first and isinstance(first[0].event, ExecutionStarted)
            flow = first[0].event.flow
            self._remember(execution_id, flow)
        self._flows.move_to_end(execution_id)
        return flow

    def _remember(self, execution_id: str, flow: str, limit: int = 10_000) -> None:
        self._flows[execution_id] = flow
        if len(self._flows) > limit:
            self._flows.popitem(last=False)
