"""The engine: turns commands into appended events and answers with where things settled.

Commands on one execution are serialised in this process by a lock per execution; across
processes the log's version check decides, and the loser re-reads. Every answer is the
folded state at a settle point, computed from the log, so a repeated command with the same
idempotency key gets exactly the answer the first one got.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

from . import fields
from .errors import (
    AlreadyResumed,
    ConcurrencyError,
    Conflict,
    DuplicateCommand,
    EvflowError,
    Finished,
    NondeterminismError,
    NotPaused,
    UnknownExecution,
    UnknownFlow,
)
from .events import SETTLING, Event, ExecutionResumed, ExecutionStarted, StoredEvent
from .flow import App, FlowDef
from .runtime import Runner, Suspended
from .state import ExecutionState, Status, fold
from .store import EventStore, invoke_scope, resume_scope
from .timers import Clock, SystemClock

logger = logging.getLogger(__name__)

Notify = Callable[[str, list[StoredEvent]], None]
"""Told the flow and the events of every durable append, in append order."""


class Engine:
    """Runs the flows of an ``App`` against an ``EventStore``.

    Args:
        app: the flows served.
        store: the log.
        clock: the source of event timestamps.
        notify: called after every durable append, to publish notifications.
    """

    def __init__(
        self,
        app: App,
        store: EventStore,
        clock: Clock | None = None,
        notify: Notify | None = None,
    ):
        self.app = app
        self.store = store
        self.clock = clock or SystemClock()
        self._notify = notify or (lambda flow, events: None)
        self._locks: dict[str, asyncio.Lock] = {}
        self._holders: dict[str, int] = {}

    async def invoke(
        self, flow_name: str, body: bytes, idempotency_key: str | None = None
    ) -> ExecutionState:
        """Start an execution of ``flow_name`` and run it to its first settle point."""
        flow = self.app.get(flow_name)
        inputs = fields.to_builtins(flow.decode_inputs(body))
        if idempotency_key is not None:
            first = await self.store.find_command(invoke_scope(flow.name, idempotency_key))
            if first is not None:
                return await self._outcome_of(first)

        execution_id = uuid.uuid4().hex
        started = ExecutionStarted(flow.name, inputs, flow.version, idempotency_key)
        try:
            async with self._exclusive(execution_id):
                return await self._run(flow, execution_id, [], [started])
        except DuplicateCommand:
            first = await self.store.find_command(invoke_scope(flow.name, idempotency_key or ""))
            assert first is not None, "a claimed idempotency scope must be found again"
            return await self._outcome_of(first)

    async def resume(
        self,
        flow_name: str,
        execution_id: str,
        body: bytes,
        idempotency_key: str | None = None,
        pause: int | None = None,
    ) -> ExecutionState:
        """Answer the pending pause of an execution and run it to its next settle point.

        ``pause``, when given, names the pause (its sequence) the caller means to answer,
        so a late duplicate cannot answer a later pause by mistake.
        """
        self.app.get(flow_name)
        repeat = await self._repeat_of(execution_id, idempotency_key, flow_name)
        if repeat is not None:
            return repeat

        # Judge the command by the state it arrives at, not the state after the run in
        # progress: a resume sent while the flow runs is refused, never queued to answer a
        # pause its sender has not seen.
        try:
            state = _of_flow(fold(await self.store.read(execution_id)), flow_name, execution_id)
            _check_resumable(state, pause)
            assert state.pause is not None
            pause = state.pause.sequence

            async with self._exclusive(execution_id):
                history = await self.store.read(execution_id)
                state = _of_flow(fold(history), flow_name, execution_id)
                _check_resumable(state, pause)
                flow = self._flow_for(state)
                try:
                    return await self._answer(flow, history, state, body, idempotency_key)
                except ConcurrencyError:
                    # Another process wrote first: say where the execution stands now.
                    _check_resumable(_settled(await self.store.read(execution_id)), pause)
                    raise
        except (Conflict, DuplicateCommand):
            # A twin with the same key may have answered the pause first: its outcome is ours.
            repeat = await self._repeat_of(execution_id, idempotency_key, flow_name)
            if repeat is None:
                raise
            return repeat

    async def _repeat_of(
        self, execution_id: str, idempotency_key: str | None, flow_name: str
    ) -> ExecutionState | None:
        """The outcome of an earlier resume with this key, if there was one."""
        if idempotency_key is None:
            return None
        first = await self.store.find_command(resume_scope(execution_id, idempotency_key))
        if first is None:
            return None
        return _of_flow(await self._outcome_of(first), flow_name, execution_id)

    async def get(self, execution_id: str, at_version: int | None = None) -> ExecutionState:
        """The folded state of an execution."""
        state = fold(await self.store.read(execution_id, at_version))
        if state is None:
            raise UnknownExecution(
                f"no execution {execution_id}; check the execution ID",
                execution_id=execution_id,
            )
        return state

    async def history(self, execution_id: str) -> list[StoredEvent]:
        """The events of an execution, in version order."""
        events = await self.store.read(execution_id)
        if not events:
            raise UnknownExecution(
                f"no execution {execution_id}; check the execution ID",
                execution_id=execution_id,
            )
        return events

    async def recover(self, concurrency: int = 32) -> int:
        """Drive on every execution a crash left running; returns how many were driven.

        Known limit: with two engines on one log, an engine that starts also drives on what
        the other is running at that moment, so a step in flight there can run twice (the
        version check still records it once). TODO(#7): own executions per engine.
        """
        slots = asyncio.Semaphore(concurrency)

        async def drive(execution_id: str) -> bool:
            async with slots:
                try:
                    async with self._exclusive(execution_id):
                        await self._drive_on(execution_id)
                    return True
                except ConcurrencyError:
                    logger.info("execution %s was driven on by another engine", execution_id)
                except EvflowError as error:
                    logger.error("execution %s could not be recovered: %s", execution_id, error)
                return False

        outcomes = await asyncio.gather(*(drive(e) for e in await self.store.unsettled()))
        return sum(outcomes)

    async def _answer(
        self,
        flow: FlowDef,
        history: list[StoredEvent],
        state: ExecutionState,
        body: bytes,
        idempotency_key: str | None,
    ) -> ExecutionState:
        assert state.pause is not None
        runner = self._runner(flow, state.execution_id, history, [])
        try:
            # Replay to the pending pause: the code there declares the resume body's type.
            outcome = await runner.start()
            if not isinstance(outcome, Suspended) or outcome.sequence != state.pause.sequence:
                raise _diverged(state, outcome)
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
        return _settled(history + runner.stored)

    async def _run(
        self, flow: FlowDef, execution_id: str, history: list[StoredEvent], new: list[Event]
    ) -> ExecutionState:
        """Run an execution from its history (plus ``new`` events) to a settle point."""
        runner = self._runner(flow, execution_id, history, new)
        try:
            await runner.start()
            await runner.flush()
        except ConcurrencyError:
            return await self._applied_anyway(runner)
        finally:
            await runner.close()
        return _settled(history + runner.stored)

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
        return await self._outcome_held(runner.stored[0])

    async def _drive_on(self, execution_id: str) -> ExecutionState:
        """Bring an execution that is not at a settle point to one."""
        history = await self.store.read(execution_id)
        state = fold(history)
        assert state is not None
        if state.status is not Status.RUNNING:
            return state
        logger.info("driving on execution %s of flow '%s'", execution_id, state.flow)
        return await self._run(self._flow_for(state), execution_id, history, [])

    async def _outcome_of(self, command: StoredEvent) -> ExecutionState:
        """The answer a command got: the state at the first settle point after it."""
        async with self._exclusive(command.execution_id):
            return await self._outcome_held(command)

    async def _outcome_held(self, command: StoredEvent, attempts: int = 5) -> ExecutionState:
        """``_outcome_of`` with the execution's lock held.

        With no settle point after the command yet (a crash cut its run short), this drives
        the execution on. Another engine on the same log may be driving it at that moment;
        its appends win the version check, and the answer is read again.
        """
        for _ in range(attempts):
            history = await self.store.read(command.execution_id)
            for stored in history[command.version - 1 :]:
                if isinstance(stored.event, SETTLING):
                    return _settled(history[: stored.version])
            try:
                await self._drive_on(command.execution_id)
            except ConcurrencyError:
                logger.debug("execution %s moved on; reading it again", command.execution_id)
        raise ConcurrencyError(
            f"execution {command.execution_id} kept changing under this engine while it "
            "read the outcome of a command; send the command again with the same key",
            execution_id=command.execution_id,
        )

    def _flow_for(self, state: ExecutionState) -> FlowDef:
        flow = self.app.flows.get(state.flow)
        if flow is None:
            raise UnknownFlow(
                f"execution {state.execution_id} belongs to flow '{state.flow}', which this "
                "engine does not serve; serve the app that registers it",
                execution_id=state.execution_id,
            )
        if flow.version != state.flow_version:
            raise UnknownFlow(
                f"execution {state.execution_id} started on version {state.flow_version} of "
                f"flow '{state.flow}', but this engine serves version {flow.version}; serve "
                f"version {state.flow_version} beside it to finish the execution",
                execution_id=state.execution_id,
            )
        return flow

    def _runner(
        self, flow: FlowDef, execution_id: str, history: list[StoredEvent], new: list[Event]
    ) -> Runner:
        persist = partial(self._append, flow.name)
        return Runner(flow, execution_id, history, new, self.clock, persist)

    async def _append(
        self, flow: str, execution_id: str, expected: int, events: list[StoredEvent]
    ) -> list[StoredEvent]:
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
        self._notify(flow, stored)
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
    async def _exclusive(self, execution_id: str) -> AsyncIterator[None]:
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


def _settled(history: list[StoredEvent]) -> ExecutionState:
    state = fold(history)
    assert state is not None
    return state


def _check_resumable(state: ExecutionState, pause: int | None) -> None:
    """Refuse a resume the execution cannot take, saying where it stands."""
    where = {"status": state.status.value, "version": state.version}
    execution_id = state.execution_id
    if pause is not None and pause in state.answered:
        raise AlreadyResumed(
            f"pause {pause} of execution {execution_id} was already answered; the execution "
            f"is now {state.status.value}",
            execution_id=execution_id,
            **where,
        )
    if state.status.finished:
        raise Finished(
            f"execution {execution_id} is {state.status.value}; nothing is left to resume",
            execution_id=execution_id,
            **where,
        )
    if state.status is not Status.PAUSED or state.pause is None:
        raise NotPaused(
            f"execution {execution_id} is {state.status.value}, not paused; resume it once it "
            "reports a pause",
            execution_id=execution_id,
            **where,
        )
    if pause is not None and pause != state.pause.sequence:
        raise NotPaused(
            f"execution {execution_id} waits at pause {state.pause.sequence}, not at pause "
            f"{pause}; answer pause {state.pause.sequence}",
            execution_id=execution_id,
            **where,
        )


def _diverged(state: ExecutionState, outcome: object) -> NondeterminismError:
    assert state.pause is not None
    where = (
        f"pause '{outcome.name}' at {outcome.sequence}"
        if isinstance(outcome, Suspended)
        else "the end of the flow"
    )
    return NondeterminismError(
        f"execution {state.execution_id}: the history waits at pause '{state.pause.name}' "
        f"(operation {state.pause.sequence}) but the flow code reached {where}; the flow "
        "code changed since the execution started: restore the old code",
        execution_id=state.execution_id,
        sequence=state.pause.sequence,
    )


def _of_flow(state: ExecutionState | None, flow_name: str, execution_id: str) -> ExecutionState:
    """The state, if it is an execution of ``flow_name``: a subject names both, and both count."""
    if state is None or state.flow != flow_name:
        raise UnknownExecution(
            f"no execution {execution_id} of flow '{flow_name}'; check the execution ID "
            "and the flow name in the subject",
            execution_id=execution_id,
        )
    return state
