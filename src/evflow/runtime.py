"""Driving flow code: replay it against its history, then run it live to its next settle point.

A ``Runner`` owns one flow coroutine, run as a task. The coroutine replays the operations
its history holds, then goes on live: new events collect in ``pending`` and are flushed to
the log before any step's side effect and when the flow settles (pauses or ends). The
runner reports a settle point as an ``Outcome``; a pause hands control back to the engine,
which answers it with a resume or drops the runner.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from typing import Any

import msgspec

from . import fields
from .context import Context, Sleeping, Suspended
from .errors import EvflowError, NondeterminismError
from .events import (
    Event,
    ExecutionCompleted,
    ExecutionFailed,
    ExecutionResumed,
    StoredEvent,
)
from .flow import FlowDef
from .timers import Clock

logger = logging.getLogger(__name__)

Persist = Callable[[str, int, list[StoredEvent]], Awaitable[list[StoredEvent]]]
"""Appends events for an execution after a version and returns them as stored; with no
events, it only confirms that the execution is still at that version."""


class Ended(msgspec.Struct, frozen=True):
    """The flow returned or raised; its last event is recorded."""


Outcome = Suspended | Sleeping | Ended


class WaitedElsewhere(Exception):
    """Flow code started inline waited on something other than its Context (see
    ``Runner.start``): start it again in a task of its own."""


class _Aborted(BaseException):
    """Unwinds flow code when the engine must stop it: user code cannot catch this."""


class Runner:
    """One execution's flow code, replayed and then driven live.

    Args:
        flow: the flow definition.
        execution_id: the execution.
        history: its stored events (empty for a new execution).
        new: events decided before the flow runs (the ``ExecutionStarted`` of an invoke).
        clock: the source of timestamps for new events.
        persist: how pending events reach the log.
    """

    def __init__(
        self,
        flow: FlowDef,
        execution_id: str,
        history: list[StoredEvent],
        new: list[Event],
        clock: Clock,
        persist: Persist,
    ):
        self.flow = flow
        self.execution_id = execution_id
        self.version = history[-1].version if history else 0
        self.pending: list[StoredEvent] = []
        self.stored: list[StoredEvent] = []
        self._clock = clock
        self._persist = persist
        for event in new:
            self.record(event)
        self._context = Context(self, history + self.pending)
        self._inputs = (history + self.pending)[0].event
        self._signal: asyncio.Future[Outcome] | None = None
        self._answer: asyncio.Future[StoredEvent] | None = None
        self._task: asyncio.Task[None] | None = None
        self._inline: Coroutine[Any, Any, None] | None = None
        self._error: EvflowError | None = None
        self._closed = False
        self.raised: Exception | None = None  # what the flow code ended with, if it raised

    def now(self) -> datetime:
        """The engine clock's current instant, for decisions about time (deadlines)."""
        return self._clock.now()

    def record(self, event: Event, at: datetime | None = None) -> StoredEvent:
        """Add a new event to the pending ones, stamped with the next version and the time."""
        self.version += 1
        stored = StoredEvent(self.execution_id, self.version, at or self._clock.now(), event)
        self.pending.append(stored)
        return stored

    def record_result(self, event: Event) -> StoredEvent:
        """Record what a step's side effect gave, if the flow may still go on: while it ran,
        the flow may have settled in another branch of its code, or been dropped."""
        self.check_open()
        return self.record(event)

    async def flush(self) -> None:
        """Append the pending events to the log."""
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        self.stored += await self._persist(self.execution_id, batch[0].version - 1, batch)

    async def flush_in_flow(self) -> None:
        """Before a side effect: make pending events durable, or, with none pending, confirm
        that no other writer moved the execution on since it was read.

        Nothing is pending only when the history was read just before (recovery, or driving
        on after a crash). Another engine on the same log may be running that very step; if
        it recorded the step already, the confirmation fails and the step does not run again.
        A refusal stops the flow code where it stands.
        """
        try:
            if self.pending:
                await self.flush()
            else:
                await self._persist(self.execution_id, self.version, [])
        except EvflowError as error:
            self._error = error
            raise _Aborted from error

    def fault(self, error: NondeterminismError) -> NondeterminismError:
        """Remember a non-determinism fault, so flow code that catches it cannot hide it."""
        self._error = self._error or error
        self.pending.clear()
        return error

    @property
    def last_operation(self) -> tuple[int, str]:
        """The latest operation the flow code issued: sequence and name (``step charge``)."""
        return self._context.last_operation

    @property
    def waiting(self) -> bool:
        """Whether the flow code still waits at its settle point, to be answered."""
        return not self._closed and self._answer is not None and not self._answer.done()

    def check_open(self) -> None:
        """Refuse new operations once the runner is closed or has failed, and while the flow
        waits at a settle point: no command drives it then, so code that goes on (a task of
        its own beside the pause) would act with no lock and nothing to record it. Such code
        ends the runner; the next command replays the execution from the log."""
        if self.waiting:
            logger.warning(
                "the flow code of execution %s issued an operation while it waits at a pause "
                "or timer; it is stopped there and replayed from the log on its next command",
                self.execution_id,
            )
            self._closed = True
        if self._closed or self._error is not None:
            raise _Aborted

    async def start(self, inline: bool = False) -> Outcome:
        """Run the flow from its beginning to its first settle point past the history.

        ``inline`` runs the flow code in the caller's task, for replay checks, whose flow
        code should wait on nothing but its Context: a task per execution cost more than
        replaying its events. Settled at a pause or a timer, the code stays suspended with
        no task of its own. If it first waits on anything else, the inline run is dropped
        and ``WaitedElsewhere`` raised: code that runs inline sees the caller's task as its
        own (an ``asyncio.timeout`` it arms would cancel the caller), so it must start again
        in a task, with a new runner. Only for runners whose ``persist`` lets no side effect
        run (it refuses), since the code's first part runs twice. The engine always gives a
        flow its own task.
        """
        self._signal = asyncio.get_running_loop().create_future()
        if not inline:
            self._task = asyncio.create_task(self._main(), name=f"evflow-{self.execution_id}")
            return await self._settled()

        self._inline = self._main()
        try:
            waiting = self._inline.send(None)
        except StopIteration:
            self._inline = None
            return await self._settled()
        if waiting is None or waiting is not self._answer:
            self.abandon()
            raise WaitedElsewhere(self.execution_id)
        return await self._settled()

    async def answer(self, event: ExecutionResumed) -> Outcome:
        """Answer the pause the flow waits at, and run it to its next settle point.

        ``stored`` starts afresh: it holds what this command appends, also when the runner
        was kept waiting at the pause from an earlier command (a hot execution).
        """
        assert self._answer is not None and not self._answer.done()
        self.stored = []
        stored = self.record(event)
        self._signal = asyncio.get_running_loop().create_future()
        self._answer.set_result(stored)
        return await self._settled()

    async def suspend(self, outcome: Suspended | Sleeping) -> StoredEvent:
        """Called by the context where the flow waits for the outside world: a pause with
        no recorded answer, or a timer not yet fired. Settles the run there; only a pause
        is ever answered in this run (a timer's firing is recorded first, then replayed)."""
        self._answer = asyncio.get_running_loop().create_future()
        self._signal_once(outcome)
        try:
            return await self._answer
        except asyncio.CancelledError:
            if self._closed:
                raise
            # Not dropped by the engine: the flow code's own timer (asyncio.timeout around
            # a pause, kept hot) cancelled the wait. A settle point ends only by its answer,
            # so the code goes no further; the next command replays it from the log.
            logger.warning(
                "the flow code of execution %s stopped waiting at its pause by itself (an "
                "asyncio timeout in flow code?); flow code should bound a pause with its "
                "timeout= argument, which the log records",
                self.execution_id,
            )
            self._closed = True
            raise _Aborted from None

    async def close(self) -> None:
        """Drop the flow coroutine wherever it waits, and wait until it is gone."""
        self.abandon()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    def abandon(self) -> None:
        """Drop the flow coroutine wherever it waits, without waiting: it unwinds on the
        event loop's next turn (at once, if it waits inline), and can issue no operation
        meanwhile."""
        self._closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._inline is not None:
            inline, self._inline = self._inline, None
            try:
                inline.close()
            except RuntimeError as error:  # its code awaited again while unwinding
                logger.debug("the flow of %s did not unwind: %s", self.execution_id, error)

    async def _settled(self) -> Outcome:
        assert self._signal is not None
        outcome = await self._signal
        if self._error is not None:
            raise self._error
        return outcome

    def _signal_once(self, outcome: Outcome) -> None:
        if self._signal is not None and not self._signal.done():
            self._signal.set_result(outcome)

    async def _main(self) -> None:
        try:
            kwargs = self._reload_inputs()
            try:
                result = await self.flow.fn(self._context, **kwargs)
            except (_Aborted, asyncio.CancelledError):
                raise
            except Exception as error:
                if not isinstance(error, NondeterminismError):
                    self.raised = error
                self._end(ExecutionFailed(type(error).__name__, str(error)))
            else:
                self._end(_completion(result))
        except _Aborted:
            pass
        finally:
            self._signal_once(Ended())

    def _reload_inputs(self) -> dict[str, object]:
        """The flow's arguments as recorded; inputs the code now refuses stop the runner."""
        try:
            inputs = fields.reload(
                self._inputs.inputs, self.flow.inputs, self.execution_id, "inputs"
            )
        except NondeterminismError as error:
            self.fault(error)
            raise _Aborted from error
        return msgspec.structs.asdict(inputs)

    def _end(self, event: Event) -> None:
        recorded = self._context.recorded_operations
        issued = self._context.issued_operations
        if self._error is None and issued < recorded:
            self.fault(
                NondeterminismError(
                    f"execution {self.execution_id}: the flow code ended after operation "
                    f"{issued}, but the history records {recorded} "
                    "operations; the flow code changed since the execution started: restore "
                    "the old code, or register the new code as a new flow version",
                    execution_id=self.execution_id,
                    sequence=issued + 1,
                    recorded=self._context.recorded_operation(issued + 1),
                    issued=event.kind,
                )
            )
        if self._error is None:
            self.record(event)


def _completion(result: object) -> Event:
    """The event that records a flow's return value, or its failure to be JSON."""
    try:
        return ExecutionCompleted(msgspec.json.decode(msgspec.json.encode(result)))
    except TypeError as error:
        return ExecutionFailed(
            "TypeError", f"the flow returned a value that is not JSON-serialisable: {error}"
        )
