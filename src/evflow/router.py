"""The router: every command runs on the engine that holds its execution's partition.

Commands reach any engine (a queue group, or the durable intake). On a cluster (``shared``)
the engine that got one runs it itself if it holds the execution's partition (``leases``),
and otherwise forwards it on ``<prefix>.part.<n>``, where only that partition's holder
listens, and relays the answer. An invoke starts its execution in a partition the engine
holds, so it is never forwarded while the engine holds any. A forward that finds no holder
(one died, and its partitions wait out their lease) is sent again until one has taken it.

So one engine drives each execution: two engines never run one step at once, a hot
execution stays current, and resumes need not replay from the log. An engine alone on its
log holds every partition and runs everything itself.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from . import commands
from .commands import Cancel, Command, Invoke, Resume
from .engine import Engine
from .errors import EvflowError, InternalError, StoreError, Unavailable, from_body
from .outbox import Outbox
from .partitions import PARTITIONS, new_execution_id_in, partition_of
from .startup import may_pass
from .state import ExecutionState
from .subjects import Subjects

logger = logging.getLogger(__name__)

FORWARD_TIMEOUT = 60.0
"""Seconds a forwarded command may run on its holder before its sender gives up on it."""
WAIT_FOR_HOLDER = (0.05, 0.1, 0.2, 0.5, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0)
"""Seconds between forwards that found no holder: about 15 s in all, long enough for a dead
engine's partitions to be taken over (``leases.TERM`` and a renewal)."""

TAKE_RETRY = (0.5, 1.0, 2.0, 5.0)
"""Seconds between tries to act on a gained partition (load its timers, drive on its
executions) while that fails; the last repeats for as long as the partition is held."""

PUBLISHER = 0
"""The partition whose holder's outbox publishes the notifications of the whole log."""

_NOT_HELD = "Evflow-Not-Held"
_ERROR = "Evflow-Error"
_QUEUE = "evflow-partition"


class _Forward(msgspec.Struct, array_like=True):
    """A command on its way to the holder of ``partition``: exactly one of the three."""

    partition: int
    invoke: Invoke | None = None
    resume: Resume | None = None
    cancel: Cancel | None = None

    @property
    def command(self) -> Command:
        command = self.invoke or self.resume or self.cancel
        assert command is not None, "a forward carries one command"
        return command


_encode = msgspec.msgpack.Encoder().encode
_decode_forward = msgspec.msgpack.Decoder(_Forward).decode
_decode_state = msgspec.msgpack.Decoder(ExecutionState).decode


class Router:
    """Runs each command where its execution's partition is held.

    Args:
        nc: the engines' NATS connection.
        engine: the engine commands run on when this one holds their partition.
        subjects: the engines' subjects.
        shared: engines share the log through partition leases; if False this engine
            holds every partition.
        outbox: publishes the log's notifications while this engine holds partition 0
            (when shared: one outbox publishes for all the engines).
        timeout: see ``FORWARD_TIMEOUT``.
    """

    def __init__(
        self,
        nc: NATS,
        engine: Engine,
        subjects: Subjects,
        *,
        shared: bool,
        outbox: Outbox | None = None,
        timeout: float = FORWARD_TIMEOUT,
    ):
        self._nc = nc
        self._engine = engine
        self._subjects = subjects
        self._shared = shared
        self._outbox = outbox
        self._timeout = timeout
        self.held: set[int] = set() if shared else set(range(PARTITIONS))
        """The partitions whose commands run here."""
        self._listening: dict[int, Subscription] = {}
        self._running: dict[int, int] = {}
        self._idle: dict[int, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._takes: dict[int, asyncio.Task[None]] = {}  # acting on a gained partition
        if shared:
            engine.acts_on = self.acts_on

    def acts_on(self, execution_id: str) -> bool:
        """Whether this engine holds the execution's partition."""
        return partition_of(execution_id) in self.held

    async def run(self, command: Command) -> ExecutionState:
        """Run a command here or on its partition's holder; where its execution settled."""
        if isinstance(command, Invoke):
            partition = random.choice(tuple(self.held or range(PARTITIONS)))
        else:
            partition = partition_of(command.execution_id)
        if partition in self.held:
            return await self._run_here(partition, command)
        return await self._forward(partition, command)

    async def _run_here(self, partition: int, command: Command) -> ExecutionState:
        self._running[partition] = self._running.get(partition, 0) + 1
        try:
            execution_id = None
            if self._shared and isinstance(command, Invoke):
                execution_id = new_execution_id_in({partition})
            try:
                return await commands.run(self._engine, command, execution_id)
            except (StoreError, Unavailable):
                # It may have stopped between events: drive it on once the log is back.
                cut_short = execution_id or getattr(command, "execution_id", None)
                if self._shared and cut_short is not None:
                    self._track(self._engine.drive_on_later(cut_short))
                raise
        finally:
            self._running[partition] -= 1
            if not self._running[partition] and partition in self._idle:
                self._idle[partition].set()

    async def _forward(self, partition: int, command: Command) -> ExecutionState:
        """Send a command to its partition's holder, waiting for one if there is none."""
        kind = type(command).__name__.lower()
        request = _encode(_Forward(partition, **{kind: command}))
        subject = self._subjects.partition(partition)
        for delay in (*WAIT_FOR_HOLDER, None):
            if partition in self.held:  # taken by this engine meanwhile
                return await self._run_here(partition, command)
            try:
                reply = await self._nc.request(subject, request, timeout=self._timeout)
            except nats.errors.NoRespondersError:
                reply = None
            except nats.errors.TimeoutError as error:
                raise Unavailable(
                    f"the engine holding {_named(command)} did not answer within "
                    f"{self._timeout:g} s; the command may have taken effect: send it again "
                    "with the same Idempotency-Key to learn its outcome",
                    execution_id=getattr(command, "execution_id", None),
                ) from error
            if reply is not None and not (reply.headers or {}).get(_NOT_HELD):
                return _answer(reply)
            if delay is not None:
                await asyncio.sleep(delay)
        raise Unavailable(
            f"no engine holds partition {partition} of {_named(command)} yet (its holder "
            "stopped or lost NATS and it is being taken over, or the NATS cluster lacks a "
            "quorum); send the command again",
            execution_id=getattr(command, "execution_id", None),
        )

    # the holder's side (``leases.Holder``)

    async def gained(self, partition: int) -> None:
        """Take the partition's commands and timers, and drive on what runs there."""
        self.held.add(partition)
        subscription = await self._nc.subscribe(
            self._subjects.partition(partition), queue=_QUEUE, cb=self._forwarded
        )
        if partition not in self.held:  # lost while subscribing
            self._track(self._drain(partition, subscription))
            return
        self._listening[partition] = subscription
        take = asyncio.ensure_future(self._take(partition))
        self._takes[partition] = take
        self._tasks.add(take)
        take.add_done_callback(self._tasks.discard)

    async def _take(self, partition: int) -> None:
        """Act on a gained partition, trying again while it is held: a holder that cannot
        load its timers or drive on its executions (JetStream electing after losing its
        quorum) must not hold the partition idle."""
        self._running[partition] = self._running.get(partition, 0) + 1
        try:
            for attempt in itertools.count():
                if partition not in self.held:
                    return
                try:
                    await self._act_on(partition)
                    return
                except Exception as error:
                    delay = TAKE_RETRY[min(attempt, len(TAKE_RETRY) - 1)]
                    logger.log(
                        logging.WARNING if may_pass(error) else logging.ERROR,
                        "taking over partition %d failed (%s); trying again in %g s",
                        partition,
                        error,
                        delay,
                    )
                    await asyncio.sleep(delay)
        finally:
            if self._takes.get(partition) is asyncio.current_task():
                del self._takes[partition]
            self._running[partition] -= 1
            if not self._running[partition] and partition in self._idle:
                self._idle[partition].set()

    async def _act_on(self, partition: int) -> None:
        if partition == PUBLISHER and self._outbox is not None:
            await self._outbox.lead()
        recovered = await self._engine.take_partition(partition)
        if recovered:
            logger.info("drove on %d executions of partition %d", recovered, partition)

    async def lost(self, partition: int) -> None:
        """Stop acting on the partition at once, another engine may hold it now: nothing
        here waits on NATS, which may be out of reach, before this engine has stopped."""
        self.held.discard(partition)
        take = self._takes.pop(partition, None)
        if take is not None:
            take.cancel()  # what it was driving on is driven on by the new holder
        self._engine.drop_partition(partition)
        if partition == PUBLISHER and self._outbox is not None:
            self._outbox.stop_leading()
        subscription = self._listening.pop(partition, None)
        if subscription is not None:
            self._track(self._drain(partition, subscription))

    async def release(self, partition: int) -> None:
        """Stop taking the partition's commands, let those running here finish (commands,
        timer firings, drives), then forget it: the next holder starts where they ended."""
        self.held.discard(partition)
        subscription = self._listening.pop(partition, None)
        if subscription is not None:
            await self._drain(partition, subscription)
        idle = self._idle.setdefault(partition, asyncio.Event())
        if self._running.get(partition):
            idle.clear()
            await idle.wait()
        del self._idle[partition]
        await self._engine.quiesce(partition)
        self._engine.drop_partition(partition)
        if partition == PUBLISHER and self._outbox is not None:
            await self._outbox.stand_by()

    async def stop(self) -> None:
        """Stop listening on every partition and wait for the forwarded commands."""
        for take in self._takes.values():
            take.cancel()
        for partition in list(self._listening):
            await self._drain(partition, self._listening.pop(partition))
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _drain(self, partition: int, subscription: Subscription) -> None:
        """Drain a partition's subscription: what it already received is answered 'not
        held', so that its senders try again, rather than left to time out."""
        try:
            await subscription.drain()
        except Exception as error:  # the connection is closing or gone
            logger.debug("draining partition %d failed (%s)", partition, error)

    async def _forwarded(self, msg: Msg) -> None:
        self._track(self._serve(msg))

    async def _serve(self, msg: Msg) -> None:
        try:
            forward = _decode_forward(msg.data)
        except msgspec.DecodeError as error:  # not sent by an engine of this release
            logger.warning("dropped a message on %s that is not a command (%s)", msg.subject, error)
            return
        if forward.partition not in self.held:
            await self._reply(msg, b"", {_NOT_HELD: "1"})
            return
        try:
            state = await self._run_here(forward.partition, forward.command)
        except EvflowError as error:
            await self._reply(msg, msgspec.json.encode(error.to_body()), {_ERROR: "1"})
            return
        except Exception:
            logger.exception("a forwarded command on partition %d failed", forward.partition)
            command = forward.command
            failure = InternalError(
                f"the engine holding {_named(command)} failed running it; its log says why "
                "(send the command again with the same Idempotency-Key to learn its outcome)",
                execution_id=getattr(command, "execution_id", None),
            )
            await self._reply(msg, msgspec.json.encode(failure.to_body()), {_ERROR: "1"})
            return
        await self._reply(msg, _encode(state), None)

    async def _reply(self, msg: Msg, body: bytes, headers: dict[str, str] | None) -> None:
        try:
            await self._nc.publish(msg.reply, body, headers=headers)
        except Exception as error:  # its sender times out and says the outcome is unknown
            logger.warning("could not answer a forwarded command (%s)", error)

    def _track(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _answer(reply: Msg) -> ExecutionState:
    """The settle point a holder answered, or the error it refused with, raised."""
    if (reply.headers or {}).get(_ERROR):
        raise from_body(msgspec.json.decode(reply.data))
    return _decode_state(reply.data)


def _named(command: Command) -> str:
    execution_id = getattr(command, "execution_id", None)
    if execution_id is None:
        return f"the invoke of flow '{command.flow}'"
    return f"execution {execution_id}"
