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
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

from . import admission, fields
from .errors import ConcurrencyError, UnknownFlow
from .events import SETTLING, Event, ExecutionResumed, StoredEvent
from .flow import App, FlowDef
from .runtime import Runner, Suspended
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
    """

    def __init__(self, app: App, store: EventStore, clock: Clock, appended: Appended):
        self.app = app
        self.store = store
        self.clock = clock
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
    ) -> ExecutionState:
        """Answer the pause ``state`` waits at with ``body`` and run on to a settle point.

        The flow code is replayed to the pause first: the code there declares the type the
        body must have. Hold the execution's lock (``exclusive``).
        """
        assert state.pause is not None
        runner = self._runner(flow, state.execution_id, history, [])
        try:
            # Replay to the pending pause: the code there declares the resume body's type.
            outcome = await runner.start()
            if not isinstance(outcome, Suspended) or outcome.sequence != state.pause.sequence:
                raise admission.diverged(state, outcome)
            what = f"resume of execution {state.execution_id} (pause '{outcome.name}')"
            answer = fields.decode(body, outcome.kind, what, state.execution_id)

            # Record the answer and run on to the next settle point.
            resumed = ExecutionResumed(
                outcome.sequence, fields.to_builtins(answer), idempotency_key
            )
            await runner.answer(resumed)
            await runner.flush()
        except ConcurrencyError:
            return await self._applied_anyway(runner)
        finally:
            await runner.close()
        return settled(history + runner.stored)

    async def run(
        self, flow: FlowDef, execution_id: str, history: list[StoredEvent], new: list[Event]
    ) -> ExecutionState:
        """Run an execution from its history (plus ``new`` events) to a settle point; hold
        the execution's lock."""
        runner = self._runner(flow, execution_id, history, new)
        try:
            await runner.start()
            await runner.flush()
        except ConcurrencyError:
            return await self._applied_anyway(runner)
        finally:
            await runner.close()
        return settled(history + runner.stored)

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
        stored = await self.store.append(execution_id, expected, events)
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
