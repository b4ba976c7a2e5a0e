"""Durable intake: commands published fire-and-forget on ``<prefix>.cmd.>``.

A service that cannot wait for a reply publishes its invoke or resume to JetStream
(stream ``EVFLOW_COMMANDS``); the publish acknowledgement is its receipt. The engine pulls
the commands from a durable consumer and acknowledges each only after the events it caused
are appended, so a command published while no engine runs, or taken by an engine that
crashed, runs when an engine is back.

A command delivered again after a crash must not run twice. Each is run with an
idempotency key: its ``Idempotency-Key`` header, else its ``Nats-Msg-Id``, else one made
from the stream's creation time and the message's sequence, which a redelivery keeps.

A command the engine refuses (bad input, unknown flow or execution, a conflict) is
acknowledged, and the refusal is published on ``<prefix>.events.rejected``; it is never
retried, since it would be refused again. A fault that may pass (the log busy, a version
clash) returns the command to the stream to be delivered again after a delay.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from . import commands
from .engine import Engine
from .errors import (
    ConcurrencyError,
    EvflowError,
    FlowVersionGone,
    InternalError,
    StoreError,
    Unavailable,
)
from .messages import Rejection, encoder
from .state import ExecutionState
from .streams import Streams
from .subjects import Subjects
from .timers import Clock, SystemClock

logger = logging.getLogger(__name__)

TRANSIENT = (ConcurrencyError, StoreError, Unavailable, FlowVersionGone)
"""Refusals that may not happen again: the command is delivered again later. A command for
an execution whose flow version this engine does not serve waits, as a Temporal task waits
for a compatible worker, until an engine that serves it (this one after a redeploy, or
another in the queue group) takes it."""

FETCH_WAIT = 0.5
"""Seconds one pull waits for commands: how long a stop may wait for the pull under way."""

GIVE_UP_AFTER = 10
"""Deliveries after which a command that keeps failing unexpectedly is rejected."""


class Intake:
    """Pulls durable commands and runs them on the engine.

    Args:
        streams: the streams and consumer (created by ``Streams.ensure``).
        engine: runs the commands.
        subjects: the engine's subjects.
        concurrency: commands run at once; more wait in the stream.
        clock: stamps rejections.
        run: runs a command (a ``Router``'s, on a cluster); the engine itself if None.
    """

    def __init__(
        self,
        streams: Streams,
        engine: Engine,
        subjects: Subjects,
        *,
        concurrency: int = 64,
        clock: Clock | None = None,
        run: Callable[[commands.Command], Awaitable[ExecutionState]] | None = None,
    ):
        self._streams = streams
        self._js: JetStreamContext = streams.js
        self._run_command = run or functools.partial(commands.run, engine)
        self._subjects = subjects
        self._clock = clock or SystemClock()
        self._concurrency = concurrency
        self._in_flight: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._subscription: JetStreamContext.PullSubscription | None = None
        self._stopping = asyncio.Event()
        self._incarnation = ""
        self.handled = 0
        """Commands acknowledged since start (run or rejected)."""

    async def start(self) -> None:
        """Bind to the durable consumer and start pulling."""
        info = await self._js.stream_info(self._streams.commands)
        created = info.created.isoformat() if info.created else "unknown"
        self._incarnation = f"{self._streams.commands}@{created}"
        subscription = await self._js.pull_subscribe_bind(
            durable=Streams.CONSUMER, stream=self._streams.commands
        )
        self._subscription = subscription
        self._task = asyncio.create_task(self._pull(subscription), name="evflow-intake")
        logger.info("taking durable commands on %s.cmd.>", self._subjects.prefix)

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop pulling, and let the commands taken finish for at most ``timeout`` seconds."""
        if self._task is None:
            return
        self._stopping.set()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        if self._in_flight:
            _, pending = await asyncio.wait(self._in_flight, timeout=timeout)
            for task in pending:  # not acknowledged: the stream delivers them again
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._subscription is not None:
            # A pull subscription cannot be drained (late fetch replies are never marked
            # done), so it is dropped: what it fetched and did not acknowledge comes back.
            with suppress(Exception):
                await self._subscription.unsubscribe()
            self._subscription = None

    async def _pull(self, subscription: JetStreamContext.PullSubscription) -> None:
        failures = 0
        while not self._stopping.is_set():
            free = self._concurrency - len(self._in_flight)
            if free <= 0:  # ask for more only when a command has finished
                await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                messages = await subscription.fetch(free, timeout=FETCH_WAIT)
                failures = 0
            except TimeoutError:  # nats-py raises both its own and asyncio's: no commands
                continue
            except Exception as error:
                failures += 1
                delay = min(0.1 * 2**failures, 5.0)
                reason = str(error) or type(error).__name__
                logger.warning("pulling durable commands failed (%s); retrying", reason)
                await asyncio.sleep(delay)
                continue
            for message in messages:
                task = asyncio.create_task(self._handle(message))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)

    async def _handle(self, message: Msg) -> None:
        """Run one command; acknowledge it once its outcome is durable, or return it."""
        keeper = asyncio.create_task(self._keep_alive(message))
        try:
            await self._run(message)
        finally:
            keeper.cancel()

    async def _run(self, message: Msg) -> None:
        metadata = message.metadata
        sequence = metadata.sequence.stream
        tokens = self._subjects.tokens(message.subject)[1:]  # after "cmd"
        try:
            command = commands.parse(
                tokens, message.headers, message.data, self._default_key(message, sequence)
            )
            state = await self._run_command(command)
        except TRANSIENT as error:
            await self._retry(message, error)
            return
        except EvflowError as error:
            await self._reject(message, tokens, error)
            return
        except Exception as error:
            logger.exception("durable command %s failed unexpectedly", message.subject)
            if metadata.num_delivered < GIVE_UP_AFTER:
                await self._retry(message, error)
                return
            failure = InternalError(
                f"the engine failed {metadata.num_delivered} times on {message.subject}; the "
                "cause is in its log"
            )
            await self._reject(message, tokens, failure)
            return
        await message.ack()
        self.handled += 1
        logger.debug(
            "durable command %s settled %s", message.subject, state.status.value,
            extra={"execution_id": state.execution_id, "version": state.version},
        )  # fmt: skip

    def _default_key(self, message: Msg, sequence: int) -> str:
        """The idempotency key of a command without one: its message ID, else its place."""
        msg_id = (message.headers or {}).get("Nats-Msg-Id")
        if msg_id and msg_id.strip():
            return msg_id[: commands.MAX_KEY_LENGTH]
        return f"{self._incarnation}#{sequence}"

    async def _retry(self, message: Msg, error: Exception) -> None:
        delay = min(0.5 * message.metadata.num_delivered, 10.0)
        logger.warning(
            "durable command %s will be retried in %.1f s: %s", message.subject, delay, error
        )
        with suppress(Exception):  # if the nak is lost, ack_wait brings the command back
            await message.nak(delay=delay)

    async def _reject(self, message: Msg, tokens: list[str], error: EvflowError) -> None:
        """Publish why the command was refused, then acknowledge it: it will not be retried."""
        sequence = message.metadata.sequence.stream
        key = (message.headers or {}).get(commands.IDEMPOTENCY_HEADER)
        rejection = Rejection(
            subject=message.subject,
            stream_sequence=sequence,
            error=error.to_body(),
            at=self._clock.now(),
            idempotency_key=key or self._default_key(message, sequence),
            execution_id=error.execution_id or commands.named_execution(tokens),
        )
        logger.warning("durable command %s rejected: %s", message.subject, error.message)
        try:
            await self._js.publish(
                self._subjects.rejected(),
                encoder.encode(rejection),
                stream=self._streams.events,
                headers={"Nats-Msg-Id": f"rejected:{self._incarnation}#{sequence}"},
            )
        except Exception as failure:
            await self._retry(message, failure)  # the refusal must be on record before the ack
            return
        await message.ack()
        self.handled += 1

    async def _keep_alive(self, message: Msg) -> None:
        """Tell the stream a long command is still running, so it is not delivered again."""
        interval = max(self._streams.settings.command_ack_wait / 3, 0.5)
        while True:
            await asyncio.sleep(interval)
            with suppress(Exception):
                await message.in_progress()
