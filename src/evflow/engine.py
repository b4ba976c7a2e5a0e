"""The engine: the commands (invoke, resume, cancel), the queries, timers and recovery.

Each command is admitted against the state it finds (``admission``), then run by the
``Driver`` to a settle point, which is the answer. A command with an idempotency key that
was seen before is answered with the first one's outcome, read from the log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection

from . import admission, fields
from .driver import Driver, settled
from .errors import (
    ConcurrencyError,
    Conflict,
    DuplicateCommand,
    EvflowError,
    FlowVersionGone,
    InvalidInput,
    StoreError,
    Unavailable,
    UnknownExecution,
    UnknownFlow,
)
from .events import (
    ExecutionCancelled,
    ExecutionStarted,
    PauseExpired,
    StoredEvent,
    TimerFired,
    new_execution_id,
)
from .flow import App
from .hot import DEFAULT_CAPACITY
from .partitions import partition_of
from .state import ExecutionState, Status, fold
from .store import EventStore, ExecutionSummary, cancel_scope, invoke_scope, resume_scope
from .timers import Clock, Scheduler, SystemClock, Timer, pending_timer

logger = logging.getLogger(__name__)

Notify = Callable[[str, list[StoredEvent]], None]
"""Told the flow and the events of every durable append, in append order."""


DRIVE_ON_RETRIES = (0.5, 1.0, 2.0, 4.0, 8.0)
"""Seconds between attempts to drive an execution on after its timer fired, while the log
cannot be reached (the execution's lock is held meanwhile, so its commands wait). After the
last, the execution stays running until an engine starts and drives it on."""


class Engine:
    """Runs the flows of an ``App`` against an ``EventStore``.

    Args:
        app: the flows served.
        store: the log.
        clock: the source of event timestamps.
        notify: called after every durable append, to publish notifications.
        hot_executions: how many executions at a pause to keep in memory with their flow
            code waiting there, so that resuming them reads and replays nothing.
    """

    def __init__(
        self,
        app: App,
        store: EventStore,
        clock: Clock | None = None,
        notify: Notify | None = None,
        hot_executions: int = DEFAULT_CAPACITY,
    ):
        self.app = app
        self.store = store
        self.clock = clock or SystemClock()
        self._notify = notify or (lambda flow, events: None)
        self._driver = Driver(app, store, self.clock, self._appended, hot_executions)
        self.timers = Scheduler(self.clock, self.fire)
        """Every pending timer of the executions this engine acts on; fires them once
        ``start`` has been called."""
        self.acts_on: Callable[[str], bool] = lambda execution_id: True
        """Whether this engine acts on an execution: fires its timers and drives it on. On
        a cluster, whether it holds the execution's partition (``router``)."""

    async def start(self, partitions: Collection[int] | None = None) -> None:
        """Load the pending timers from the log (of ``partitions`` if given) and fire them as
        they fall due; those whose due time passed while no engine ran fire at once,
        earliest first."""
        self.timers.add_all(await self.store.pending_timers(partitions))
        self.timers.start()

    async def take_partition(self, partition: int) -> int:
        """Act on a partition this engine now holds: load its timers, then drive on what a
        crash or another engine left running there; returns how many were driven on."""
        loaded = await self.store.pending_timers({partition})
        self.timers.add_all(t for t in loaded if self._not_overtaken(t))
        return await self.recover(partitions={partition})

    def _not_overtaken(self, timer: Timer) -> bool:
        """Whether a timer read from the log is no older than the one held for its
        execution: a command may set a newer one while the log is read."""
        held = self.timers.pending(timer.execution_id)
        return held is None or held.version <= timer.version

    async def quiesce(self, partition: int) -> None:
        """Wait until nothing runs here on the partition's executions (a command, a timer's
        firing, a drive on): before it is let go, so that its next holder does not drive
        one on meanwhile."""
        while self._driver.busy(lambda execution_id: partition_of(execution_id) == partition):
            await asyncio.sleep(0.05)

    def drop_partition(self, partition: int) -> None:
        """Stop acting on a partition another engine may hold now: forget its timers, and
        its hot executions, which that engine may move on."""
        self.timers.forget_where(lambda execution_id: partition_of(execution_id) == partition)
        self._driver.hot.drop_where(lambda execution_id: partition_of(execution_id) == partition)

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop firing timers; a firing still under way after ``timeout`` s is dropped (its
        timer fires again on the next start, or its execution is driven on then); then
        let go of the hot executions."""
        await self.timers.stop(timeout)
        self._driver.hot.close()

    async def invoke(
        self,
        flow_name: str,
        body: bytes,
        idempotency_key: str | None = None,
        execution_id: str | None = None,
    ) -> ExecutionState:
        """Start an execution of ``flow_name`` and run it to its first settle point, under a
        new ID, or under ``execution_id`` (new, and in a partition this engine holds)."""
        flow = self.app.get(flow_name)
        inputs = fields.to_builtins(flow.decode_inputs(body))
        if idempotency_key is not None:
            first = await self.store.find_command(invoke_scope(flow.name, idempotency_key))
            if first is not None:
                return await self._driver.outcome_of(first)

        execution_id = execution_id or new_execution_id()
        started = ExecutionStarted(flow.name, inputs, flow.version, idempotency_key)
        try:
            async with self._driver.exclusive(execution_id):
                return await self._driver.run(flow, execution_id, [], [started])
        except DuplicateCommand:
            first = await self.store.find_command(invoke_scope(flow.name, idempotency_key or ""))
            assert first is not None, "a claimed idempotency scope must be found again"
            return await self._driver.outcome_of(first)

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
            arrival = await self._arrival_pause(flow_name, execution_id, pause)
            async with self._driver.exclusive(execution_id):
                return await self._resume_held(
                    flow_name, execution_id, body, idempotency_key, arrival, pause
                )
        except (Conflict, DuplicateCommand):
            # A twin with the same key may have answered the pause first: its outcome is ours.
            repeat = await self._repeat_of(execution_id, idempotency_key, flow_name)
            if repeat is None:
                raise
            return repeat

    async def _arrival_pause(self, flow_name: str, execution_id: str, pause: int | None) -> int:
        """The pause a resume answers, judged by the state the execution is in now.

        A hot execution's state serves when it allows the resume; a refusal is always
        judged from the log, which a hot state may lag (another engine on the log).
        """
        state = self._driver.hot.state(execution_id)
        if state is None or not admission.resumable(state, flow_name, pause, self.clock):
            history = await self.store.read(execution_id)
            state = admission.of_flow(fold(history), flow_name, execution_id)
            admission.check_resumable(state, pause)

        assert state.pause is not None
        return state.pause.sequence

    async def _resume_held(
        self,
        flow_name: str,
        execution_id: str,
        body: bytes,
        key: str | None,
        pause: int,
        asked: int | None,
    ) -> ExecutionState:
        """``resume`` with the execution's lock held: judge again, then answer the pause.

        ``pause`` is the pause judged at arrival, ``asked`` the one the caller named. A hot
        execution is answered at once. If the log's version check finds that another
        engine overtook it, the hot copy was stale, and so may the judgement at arrival
        have been: the resume is judged again from the log, by what the caller asked.
        """
        hot = self._driver.hot.take(execution_id)
        if hot is not None and admission.resumable(hot.state, flow_name, pause, self.clock):
            try:
                flow = self._driver.flow_for(hot.state)
            except BaseException:
                hot.runner.abandon()  # taken from the cache: nobody else will let it go
                raise
            try:
                return await self._driver.answer(flow, hot.history, hot.state, body, key, hot)
            except ConcurrencyError:
                logger.debug("hot execution %s was overtaken; reading it again", execution_id)
                pause = await self._arrival_pause(flow_name, execution_id, asked)
        elif hot is not None:
            self._driver.hot.keep(hot)  # still current; the log says why this resume is not

        history = await self.store.read(execution_id)
        state = admission.of_flow(fold(history), flow_name, execution_id)
        admission.check_resumable(state, pause)
        flow = self._driver.flow_for(state)  # before an expiry: no firing into code not served
        if admission.past_deadline(state, self.clock):
            await self._expire_held(state)
        try:
            return await self._driver.answer(flow, history, state, body, key)
        except ConcurrencyError:
            # Another writer was first (a deadline, another engine): say where it stands now.
            admission.check_resumable(settled(await self.store.read(execution_id)), pause)
            raise

    async def _expire_held(self, state: ExecutionState) -> None:
        """Record the expiry of a pause whose deadline passed, drive the flow on, and refuse
        the resume that found it so, as expired (the execution's lock is held)."""
        assert state.pause is not None and state.pause.deadline is not None
        pause = state.pause.sequence
        timer = Timer(
            state.pause.deadline, state.execution_id, state.flow, state.version, pause, "deadline"
        )
        if await self._record_firing(timer):
            await self._drive_on_after_timer(timer)
        admission.check_resumable(settled(await self.store.read(state.execution_id)), pause)
        raise ConcurrencyError(
            f"execution {state.execution_id} changed while this engine expired its pause; "
            "read it again",
            execution_id=state.execution_id,
        )

    async def cancel(
        self,
        flow_name: str,
        execution_id: str,
        reason: str | None = None,
        idempotency_key: str | None = None,
    ) -> ExecutionState:
        """End an execution that is paused, waiting or running as ``cancelled``.

        No flow code runs for it: the flow stops where it stood. A command in flight on the
        execution in this engine finishes first; a finished execution is refused.
        """
        self.app.get(flow_name)
        scope = cancel_scope
        repeat = await self._repeat_of(execution_id, idempotency_key, flow_name, scope)
        if repeat is not None:
            return repeat
        try:
            async with self._driver.exclusive(execution_id):
                return await self._cancel_held(flow_name, execution_id, reason, idempotency_key)
        except (Conflict, DuplicateCommand):
            repeat = await self._repeat_of(execution_id, idempotency_key, flow_name, scope)
            if repeat is None:
                raise
            return repeat

    async def _cancel_held(
        self, flow_name: str, execution_id: str, reason: str | None, key: str | None
    ) -> ExecutionState:
        for _ in range(5):
            history = await self.store.read(execution_id)
            state = admission.of_flow(fold(history), flow_name, execution_id)
            admission.check_cancellable(state)
            event = ExecutionCancelled(reason, key)
            cancelled = StoredEvent(execution_id, state.version + 1, self.clock.now(), event)
            try:
                stored = await self._driver.append(
                    state.flow, execution_id, state.version, [cancelled]
                )
            except ConcurrencyError:  # a timer fired, or another engine wrote: look again
                continue
            logger.info("execution %s of flow '%s' cancelled", execution_id, state.flow)
            return settled(history + stored)
        raise ConcurrencyError(
            f"execution {execution_id} kept changing while this engine cancelled it; send the "
            "cancel again",
            execution_id=execution_id,
        )

    async def fire(self, timer: Timer) -> None:
        """Record that a timer fired, then drive its execution on.

        The firing is appended at the version that started the timer, so it lands once
        whoever else fires it or resumes or cancels the execution meanwhile: a timer whose
        execution has moved on changes nothing. A timer of a flow version this engine does
        not serve is left unfired. The scheduler calls this.
        """
        if not self.acts_on(timer.execution_id) or not await self._serves(timer):
            return
        if await self._record_firing(timer):
            async with self._driver.exclusive(timer.execution_id):
                await self._drive_on_after_timer(timer)

    async def _serves(self, timer: Timer) -> bool:
        """Whether this engine serves the flow version the timer's execution started on.

        A timer of one it does not serve stays pending in the log, unfired: recording the
        firing would move the execution on with no code of its version to run. The next
        start of an engine that serves that version reads it from the log and fires it.
        Known cost: one read of the execution's first event per firing.
        """
        started = settled(await self.store.read(timer.execution_id, 1))
        try:
            self._driver.flow_for(started)
        except (UnknownFlow, FlowVersionGone) as error:
            logger.warning(
                "the %s timer of execution %s is left unfired: %s",
                timer.kind,
                timer.execution_id,
                error.message,
            )
            return False
        return True

    async def _drive_on_after_timer(self, timer: Timer) -> None:
        """Run the flow on from a recorded firing (the execution's lock is held)."""
        await self._drive_on(timer.execution_id, f"its {timer.kind} timer")

    async def drive_on_later(self, execution_id: str) -> None:
        """Drive on an execution a command left short of a settle point, when the log was
        out of reach mid-way (a NATS node restarting): its partition's holder is alive, so
        no recovery at a start or a takeover would find it."""
        async with self._driver.exclusive(execution_id):
            await self._drive_on(execution_id, "a command cut short")

    async def _drive_on(self, execution_id: str, after: str) -> None:
        """Bring an execution to a settle point. The log unavailable for a while is tried
        again, a few times; a failure still left after that leaves the execution running,
        for the next start of an engine (or takeover of its partition) to drive on."""
        for delay in (*DRIVE_ON_RETRIES, None):
            if not self.acts_on(execution_id):
                return  # its partition's new holder drives it on
            try:
                if await self.store.read(execution_id, 1):  # nothing if the invoke never landed
                    await self._driver.drive_on(execution_id)
                return
            except ConcurrencyError:
                logger.info("execution %s was driven on by another engine", execution_id)
                return
            except (StoreError, Unavailable) as error:
                if delay is None:
                    logger.error(
                        "execution %s could not go on after %s (%s); the next start of an "
                        "engine drives it on",
                        execution_id,
                        after,
                        error,
                    )
                    return
                logger.warning(
                    "execution %s could not go on after %s (%s); trying again in %g s",
                    execution_id,
                    after,
                    error,
                    delay,
                )
                await asyncio.sleep(delay)
            except EvflowError as error:
                logger.error(
                    "execution %s could not go on after %s: %s", execution_id, after, error
                )
                return

    async def _record_firing(self, timer: Timer) -> bool:
        """Append a timer's firing; False when the execution moved on without it."""
        event = TimerFired(timer.sequence) if timer.kind == "wait" else PauseExpired(timer.sequence)
        fired = StoredEvent(timer.execution_id, timer.version + 1, self.clock.now(), event)
        try:
            await self._driver.append(timer.flow, timer.execution_id, timer.version, [fired])
        except ConcurrencyError:
            logger.debug("the timer of execution %s was overtaken", timer.execution_id)
            return False
        return True

    def followed(self, flow: str, stored: StoredEvent) -> None:
        """Told of an event in the log, this engine's or another's, in log order and a
        little late (by the outbox): keep the timers and the hot executions in step with
        other engines on the same log. A timer learned so may have fired already; its
        firing then fails the version check and changes nothing."""
        execution_id = stored.execution_id
        self._driver.hot.drop_if_behind(execution_id, stored.version)
        if not self.acts_on(execution_id):
            return
        held = self.timers.pending(execution_id)
        if held is None or held.version <= stored.version:
            timer = pending_timer(flow, stored)
            if timer is not None:
                self.timers.add(timer)
            elif held is not None:
                self.timers.forget(execution_id)

    def _appended(self, flow: str, events: list[StoredEvent]) -> None:
        """After every durable append: keep the scheduler in step, then notify."""
        timer = pending_timer(flow, events[-1])
        if timer is not None:
            self.timers.add(timer)
        else:
            self.timers.forget(events[-1].execution_id)
        self._notify(flow, events)

    async def _repeat_of(
        self,
        execution_id: str,
        idempotency_key: str | None,
        flow_name: str,
        scope: Callable[[str, str], str] = resume_scope,
    ) -> ExecutionState | None:
        """The outcome of an earlier command on the execution with this key, if any."""
        if idempotency_key is None:
            return None
        first = await self.store.find_command(scope(execution_id, idempotency_key))
        if first is None:
            return None
        return admission.of_flow(await self._driver.outcome_of(first), flow_name, execution_id)

    async def get(self, execution_id: str, at_version: int | None = None) -> ExecutionState:
        """The folded state of an execution, as it was at ``at_version`` if given.

        A version below 1, or beyond the execution's latest, is refused as
        ``InvalidInput`` naming ``at_version`` (and the latest version).
        """
        if at_version is not None and at_version < 1:
            raise InvalidInput(
                f"at_version must be an integer >= 1, not {at_version}: a version of "
                f"execution {execution_id}; leave it out for the latest state",
                execution_id=execution_id,
                field="at_version",
            )
        state = fold(await self.store.read(execution_id, at_version))
        if state is None:
            raise UnknownExecution(
                f"no execution {execution_id}; check the execution ID",
                execution_id=execution_id,
            )
        if at_version is not None and at_version > state.version:
            raise InvalidInput(
                f"execution {execution_id} has no version {at_version}: its latest is "
                f"{state.version}; ask for at_version from 1 to {state.version}",
                execution_id=execution_id,
                field="at_version",
                version=state.version,
            )
        return state

    async def list_executions(
        self,
        flow: str | None = None,
        status: Status | None = None,
        limit: int = 100,
        before_position: int | None = None,
        as_of_position: int | None = None,
    ) -> list[ExecutionSummary]:
        """Executions, the most recently changed first; see ``EventStore.list_executions``."""
        return await self.store.list_executions(
            flow, status, limit, before_position, as_of_position
        )

    async def history(self, execution_id: str) -> list[StoredEvent]:
        """The events of an execution, in version order."""
        events = await self.store.read(execution_id)
        if not events:
            raise UnknownExecution(
                f"no execution {execution_id}; check the execution ID",
                execution_id=execution_id,
            )
        return events

    async def recover(
        self, concurrency: int = 32, partitions: Collection[int] | None = None
    ) -> int:
        """Drive on every execution (of ``partitions`` if given) a crash left running;
        returns how many were driven.

        Known limit: two engines on one SQLite file do not hold partitions, so an engine that
        starts also drives on what the other is running at that moment, and a step in flight
        there can run twice (the version check still records it once). On a cluster each
        engine recovers only the partitions it holds (``leases``).
        """
        slots = asyncio.Semaphore(concurrency)

        async def drive(execution_id: str) -> bool:
            async with slots:
                if not self.acts_on(execution_id):
                    return False  # its partition was lost meanwhile: the new holder drives
                try:
                    async with self._driver.exclusive(execution_id):
                        await self._driver.drive_on(execution_id)
                    return True
                except ConcurrencyError:
                    logger.info("execution %s was driven on by another engine", execution_id)
                except FlowVersionGone as error:  # left as it is for an engine that serves it
                    logger.warning("execution %s was not recovered: %s", execution_id, error)
                except EvflowError as error:
                    logger.error("execution %s could not be recovered: %s", execution_id, error)
                return False

        unsettled = await self.store.unsettled(partitions)
        outcomes = await asyncio.gather(*(drive(e) for e in unsettled))
        return sum(outcomes)
