"""Driving executions: flow code run against the log, one command at a time per execution.

The driver runs an execution's flow code from its history to the next settle point,
appends what it decided with the version it read, and answers with the folded state there.
Commands on one execution are serialised in this process by a lock per execution; across
processes the log's version check decides, and the loser re-reads. Every answer is
computed from the log, so a repeated command gets exactly the answer the first one got.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

from . import admission, fields
from .errors import ConcurrencyError, EvflowError, UnknownFlow
from .events import SETTLING, Event, ExecutionResumed, StoredEvent
from .flow import App, FlowDef
from .hot import DEFAULT_CAPACITY, Hot, HotExecutions
from .runtime import Outcome, Runner, Suspended
from .state import ExecutionState, Status, fold
from .store import EventStore
from .timers import Clock

logger = logging.getLogger(__name__)

Appended = Callable[[str, list[StoredEvent]], None]
"""Told the flow and the events of every durable append, in append order."""


class Driver:
    """Runs the flows of an ``App`` on an ``EventStore``, to settle points.

    Args:
        app: the flows.
        store: the log.
        clock: the source of event timestamps.
        appended: called after every durable append (notifications, timers).
        hot_capacity: how many executions at a pause to keep hot (``hot``).
    """

    def __init__(
        self,
        app: App,
        store: EventStore,
        clock: Clock,
        appended: Appended,
        hot_capacity: int = DEFAULT_CAPACITY,
    ):
        self.app = app
        self.store = store
        self.clock = clock
        self.hot = HotExecutions(hot_capacity)
        """Executions at a pause with their flow code waiting there, for fast resumes."""
        self._appended = appended
        self._locks: dict[str, asyncio.Lock] = {}
        self._holders: dict[str, int] = {}

    async def answer(
        self,
        flow: FlowDef,
        history: list[StoredEvent],
        state: ExecutionState,
        body: bytes,
        idempotency_key: str | None,
        hot: Hot | None = None,
    ) -> ExecutionState:
        """Answer the pause ``state`` waits at with ``body`` and run on to a settle point.

        The flow code waits at the pause: in ``hot``, or replayed there first. The code
        there declares the type the body must have. Hold the execution's lock.
        """
        assert state.pause is not None
        runner = hot.runner if hot else self._runner(flow, state.execution_id, history, [])
        try:
            waiting = hot.outcome if hot else await runner.start()
            if not isinstance(waiting, Suspended) or waiting.sequence != state.pause.sequence:
                raise admission.diverged(state, waiting)
        except BaseException:
            await runner.close()
            raise

        try:
            what = f"resume of execution {state.execution_id} (pause '{waiting.name}')"
            answer = fields.decode(body, waiting.kind, what, state.execution_id)
        except EvflowError:
            self.hot.keep(Hot(runner, waiting, history, state))  # still waiting: keep it hot
            raise

        resumed = ExecutionResumed(waiting.sequence, fields.to_builtins(answer), idempotency_key)
        return await self._drive(runner, history, runner.answer(resumed))

    async def run(
        self, flow: FlowDef, execution_id: str, history: list[StoredEvent], new: list[Event]
    ) -> ExecutionState:
        """Run an execution from its history (plus ``new`` events) to a settle point; hold
        the execution's lock."""
        runner = self._runner(flow, execution_id, history, new)
        return await self._drive(runner, history, runner.start())

    async def _drive(
        self, runner: Runner, history: list[StoredEvent], run: Awaitable[Outcome]
    ) -> ExecutionState:
        """Run flow code to its next settle point and append what it decided.

        Settled at a pause, the execution stays hot; otherwise its runner is closed.
        """
        try:
            outcome = await run
            await runner.flush()
        except ConcurrencyError:
            await runner.close()
            return await self._applied_anyway(runner)
        except BaseException:
            await runner.close()
            raise

        history = history + runner.stored
        state = settled(history)
        if isinstance(outcome, Suspended) and state.status is Status.PAUSED:
            self.hot.keep(Hot(runner, outcome, history, state))
        else:
            await runner.close()
        return state

    async def _applied_anyway(self, runner: Runner) -> ExecutionState:
        """After a version clash: if the command's first events had landed, it was applied.

        Another engine on the same log then drove the execution on (its recovery, say), so
        the answer is where the execution settled after those events. If nothing of ours
        landed, the clash is the caller's to judge: it is raised again.
        """
        if not runner.stored:
            raise ConcurrencyError(
                f"execution {runner.execution_id} changed while this engine ran it; read it again",
                execution_id=runner.execution_id,
            )
        return await self.outcome_held(runner.stored[0])

    async def drive_on(self, execution_id: str) -> ExecutionState:
        """Bring an execution that is not at a settle point to one; hold its lock."""
        history = await self.store.read(execution_id)
        state = fold(history)
        assert state is not None
        if state.status is not Status.RUNNING:
            return state
        logger.info("driving on execution %s of flow '%s'", execution_id, state.flow)
        return await self.run(self.flow_for(state), execution_id, history, [])

    async def outcome_of(self, command: StoredEvent) -> ExecutionState:
        """The answer a command got: the state at the first settle point after it."""
        async with self.exclusive(command.execution_id):
            return await self.outcome_held(command)

    async def outcome_held(self, command: StoredEvent, attempts: int = 5) -> ExecutionState:
        """``outcome_of`` with the execution's lock held.

        With no settle point after the command yet (a crash cut its run short), this drives
        the execution on. Another engine on the same log may be driving it at that moment;
        its appends win the version check, and the answer is read again.
        """
        for _ in range(attempts):
            history = await self.store.read(command.execution_id)
            for stored in history[command.version - 1 :]:
                if isinstance(stored.event, SETTLING):
                    return settled(history[: stored.version])
            try:
                await self.drive_on(command.execution_id)
            except ConcurrencyError:
                logger.debug("execution %s moved on; reading it again", command.execution_id)
        raise ConcurrencyError(
            f"execution {command.execution_id} kept changing under this engine while it "
            "read the outcome of a command; send the command again with the same key",
            execution_id=command.execution_id,
        )

    def flow_for(self, state: ExecutionState) -> FlowDef:
        """The flow code an execution runs on: its flow, at the version it started on.

        ``UnknownFlow`` when the engine serves no flow of that name, ``FlowVersionGone``
        when it serves the flow but not that version.
        """
        versions = self.app.flows.get(state.flow)
        if not versions:
            raise UnknownFlow(
                f"execution {state.execution_id} belongs to flow '{state.flow}', which this "
                "engine does not serve; serve the app that registers it",
                execution_id=state.execution_id,
            )
        flow = versions.get(state.flow_version)
        if flow is None:
            raise admission.version_gone(state, sorted(versions))
        return flow

    def _runner(
        self, flow: FlowDef, execution_id: str, history: list[StoredEvent], new: list[Event]
    ) -> Runner:
        persist = partial(self.append, flow.name)
        return Runner(flow, execution_id, history, new, self.clock, persist)

    async def append(
        self, flow: str, execution_id: str, expected: int, events: list[StoredEvent]
    ) -> list[StoredEvent]:
        """Append ``events`` after version ``expected`` and say so (``appended``); with no
        events, only confirm that the execution is still at ``expected``."""
        if not events:
            await self._confirm(execution_id, expected)
            return []

        self.hot.drop(execution_id)  # a hot execution's own appends happen while it is taken
        stored = await self.store.append(execution_id, expected, events)
        if logger.isEnabledFor(logging.DEBUG):  # the names are joined only when shown
            logger.debug(
                "appended %s to execution %s",
                ", ".join(type(s.event).__name__ for s in stored),
                execution_id,
                extra={"execution_id": execution_id, "flow": flow, "version": stored[-1].version},
            )
        self._appended(flow, stored)
        return stored

    async def _confirm(self, execution_id: str, expected: int) -> None:
        """Raise ``ConcurrencyError`` if the execution moved past ``expected`` meanwhile."""
        latest = await self.store.read(execution_id, expected + 1)
        if len(latest) > expected:
            raise ConcurrencyError(
                f"execution {execution_id} is past version {expected}: another engine drove "
                "it on; re-read it",
                execution_id=execution_id,
                version=latest[-1].version,
            )

    def busy(self, which: Callable[[str], bool]) -> bool:
        """Whether an execution ``which`` picks holds its lock, or waits for it."""
        return any(which(execution_id) for execution_id in self._holders)

    @asynccontextmanager
    async def exclusive(self, execution_id: str) -> AsyncIterator[None]:
        """Hold the execution's lock: one command at a time per execution in this process."""
        lock = self._locks.setdefault(execution_id, asyncio.Lock())
        self._holders[execution_id] = self._holders.get(execution_id, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._holders[execution_id] -= 1
            if not self._holders[execution_id]:
                del self._holders[execution_id], self._locks[execution_id]


def settled(history: list[StoredEvent]) -> ExecutionState:
    """The state a history folds to, which must exist."""
    state = fold(history)
    assert state is not None
    return state
