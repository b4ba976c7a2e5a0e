"""Replay checks: do recorded histories still replay against the current flow code?

An auditor, or a CI job gating a deployment, replays the executions of a log through the
engine's own ``Runner``, writing nothing. Its persist refuses every append; the runner calls
it before a step's side effect, so a step past the end of a history stops the code there,
unrun. Recorded steps, pauses and timers return what was recorded, at the recorded times;
what the code decides past the end is stamped with the last recorded time; nothing waits.

Each execution gets a ``Verdict``:

- ``ok``: the code issues every recorded operation, in order, and ends as the history does:
  waiting at the same pause or timer, or completing with the same result, or failing with
  the same error. A history that ends running (a crash cut it short) or cancelled records
  nothing past its end, so whatever the code goes on with there is reported, not judged.
- ``diverged``: the code issues another operation than the history at some sequence, ends
  before the history's last operation, goes on past a completed or failed history, or
  returns another result than the recorded one. A different result is a divergence here
  (Temporal's replayer checks only commands): the result is computed from recorded step
  results and answers, so a new one means the code's logic changed under the execution.
- ``unknown_flow``: the app registers no flow of that name, or not the version the
  execution started on; the execution cannot be checked, and counts as a failure (a
  deployment of that app could not drive it on). ``--flow`` checks one flow at a time, so a
retired flow's executions can be left out.
- ``error``: the flow code raised an exception the history does not record (where the
  history records more operations or another end), or did not reach its next operation
  in time; counts as a failure.

Known limit: flow code between operations runs for real, as it does on every replay, so
code that does I/O outside steps (which breaks determinism anyway) does it here too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import msgspec

from .chain import Record
from .context import Sleeping, Suspended, describe
from .errors import EvflowError, NondeterminismError, StoreError, UnknownExecution, UnknownFlow
from .events import (
    Event,
    ExecutionCompleted,
    ExecutionFailed,
    ExecutionStarted,
    StoredEvent,
    decode,
)
from .flow import App, FlowDef
from .replay_verdicts import Result, Summary, Verdict, raised_at, unfolded, verdict_of
from .runtime import Outcome, Runner, WaitedElsewhere
from .state import ExecutionState, Status, fold
from .store import EventStore

REPLAY_TIMEOUT = 30.0
"""Seconds one execution's flow code may take to replay before it is reported as an error."""

REPLAY_WINDOW = 64
"""Executions replayed side by side."""


async def execution_ids(store: EventStore, flow: str | None = None, page: int = 1000) -> list[str]:
    """The executions in the log, in the order they started; only ``flow``'s if given.

    This reads the log's records in pages and decodes only the starts: time grows with the
    size of the log. A start that does not decode is kept, so its replay reports why.
    """
    found: list[str] = []
    after = 0
    while batch := await store.records(after, page):
        for record in batch:
            if record.type == "ExecutionStarted" and _of_flow(record, flow):
                found.append(record.execution_id)
        after = batch[-1].position
    return found


def _of_flow(record: Record, flow: str | None) -> bool:
    if flow is None:
        return True
    try:
        event = decode(bytes(record.data), record.schema_version)
    except ValueError:  # msgspec's decode errors are ValueErrors
        return True
    return isinstance(event, ExecutionStarted) and event.flow == flow


async def replay_log(
    app: App,
    store: EventStore,
    executions: list[str],
    timeout: float = REPLAY_TIMEOUT,
    window: int = REPLAY_WINDOW,
) -> AsyncIterator[Verdict]:
    """Replay each of ``executions``, read from ``store`` a window at a time (one read per
    window), and yield the verdicts in order."""
    for start in range(0, len(executions), window):
        chunk = executions[start : start + window]
        for verdict in await replay_histories(app, await _histories_of(store, chunk), timeout):
            yield verdict


async def replay_histories(
    app: App, histories: list[list[StoredEvent] | Verdict], timeout: float = REPLAY_TIMEOUT
) -> list[Verdict]:
    """Replay histories under one timer (a verdict given in their place is kept); the
    verdicts come in the order of the histories.

    Flow code that waits only on its Context replays inline, one execution after another,
    with no task and no turn of the event loop. Code that waits on anything else is replayed
    again afterwards, those executions side by side, each in a task of its own. If the
    timer fires, each execution is replayed again alone under a timer of its own, so that
    only the code that waits is reported.
    """
    try:
        async with asyncio.timeout(timeout):
            found = [await _inline(app, history) for history in histories]
            elsewhere = [i for i, verdict in enumerate(found) if verdict is None]
            replayed = await asyncio.gather(*(_replayed(app, histories[i]) for i in elsewhere))
    except TimeoutError:
        return [await _replayed(app, history, timeout) for history in histories]
    again = dict(zip(elsewhere, replayed, strict=True))
    return [again[i] if verdict is None else verdict for i, verdict in enumerate(found)]


async def _inline(app: App, history: list[StoredEvent] | Verdict) -> Verdict | None:
    """The verdict of a replay run inline; None if its flow code waits elsewhere."""
    if not isinstance(history, list):
        return history
    return await _replay(app, history, None, in_task=False)


async def _replayed(
    app: App, history: list[StoredEvent] | Verdict, timeout: float | None = None
) -> Verdict:
    return await replay_execution(app, history, timeout) if isinstance(history, list) else history


async def _histories_of(
    store: EventStore, executions: list[str]
) -> list[list[StoredEvent] | Verdict]:
    """The executions' histories; a damaged one as the verdict that it cannot be read."""
    try:
        found = await store.read_many(executions)
    except StoreError:  # one damaged history: read them one by one, so it fails alone
        return [await _history_of(store, execution_id) for execution_id in executions]
    missing = [execution_id for execution_id in executions if execution_id not in found]
    if missing:
        raise UnknownExecution(
            f"there is no execution {missing[0]} in the log; check the execution ID and the store",
            execution_id=missing[0],
        )
    return [found[execution_id] for execution_id in executions]


async def _history_of(store: EventStore, execution_id: str) -> list[StoredEvent] | Verdict:
    """An execution's history, or the verdict that it cannot be read."""
    try:
        return await store.read(execution_id)
    except StoreError as error:
        return Verdict(execution_id, "", 0, "error", None, 0, error.message)


async def replay_execution(
    app: App, history: list[StoredEvent], timeout: float | None = REPLAY_TIMEOUT
) -> Verdict:
    """Replay one execution's history against ``app``'s flow code, writing nothing; the
    code may take ``timeout`` seconds (None: no limit of its own)."""
    verdict = await _replay(app, history, timeout, in_task=True)
    assert verdict is not None
    return verdict


async def _replay(
    app: App, history: list[StoredEvent], timeout: float | None, in_task: bool
) -> Verdict | None:
    """``replay_execution``; unless ``in_task``, None if the flow code waits on something
    other than its Context (it would need a task of its own)."""
    try:
        state = fold(history)
    except ValueError as error:
        return unfolded(history, error)
    assert state is not None

    try:
        flow = _flow_for(app, history[0])
    except UnknownFlow as error:
        return verdict_of(state, "unknown_flow", error.message)

    try:
        return await _Replay(flow, state, history).run(timeout, in_task)
    except Exception as error:  # one execution's surprise must not end the whole audit
        message = f"execution {state.execution_id}: replay failed with {raised_at(error)}"
        return verdict_of(state, "error", message)


def _flow_for(app: App, started: StoredEvent) -> FlowDef:
    """The code an execution is checked against: its flow, at the version it started on."""
    event = started.event
    assert isinstance(event, ExecutionStarted)
    execution_id = started.execution_id
    versions = app.versions(event.flow)
    if not versions:
        known = ", ".join(sorted(app.flows)) or "none"
        raise UnknownFlow(
            f"execution {execution_id} belongs to flow '{event.flow}', which the app does "
            f"not register (it registers: {known}); replay with the app that does, or check "
            "only the flows it serves, one --flow F at a time",
            execution_id=execution_id,
        )
    if event.flow_version not in versions:
        raise UnknownFlow(
            f"execution {execution_id} started on version {event.flow_version} of flow "
            f"'{event.flow}', but the app registers {app.describe(event.flow)}; register "
            f"version {event.flow_version} beside them to check this execution",
            execution_id=execution_id,
        )
    flow = app.get(event.flow, event.flow_version)
    return flow


class _PastEnd(EvflowError):
    """The flow code went on to a step past the end of its history: replay stops there."""


class _StoppedClock:
    """A replay's clock: it reads the history's last instant, and never moves (the runner
    settles at a timer rather than sleep, so nothing waits on it)."""

    def __init__(self, at: datetime):
        self._at = at

    def now(self) -> datetime:
        return self._at

    async def sleep_until(self, instant: datetime) -> None:
        if instant > self._at:
            await asyncio.get_running_loop().create_future()  # forever: bounded by the timeout


class _Replay:
    """One execution's replay: the runner that writes nothing, and what the code did."""

    def __init__(self, flow: FlowDef, state: ExecutionState, history: list[StoredEvent]):
        self.state = state
        self.history = history
        self.operations = max((getattr(s.event, "sequence", 0) for s in history), default=0)
        self.refused: list[StoredEvent] = []
        self.flow = flow
        self.runner = self._runner()

    @property
    def raised(self) -> Exception | None:
        """The exception the flow code ended with, if any (non-determinism aside)."""
        return self.runner.raised

    async def _refuse(
        self, execution_id: str, expected: int, events: list[StoredEvent]
    ) -> list[StoredEvent]:
        """The runner's persist: called before a step past the history runs; never writes."""
        self.refused = list(events)
        raise _PastEnd(f"execution {execution_id}: replay writes nothing")

    def _runner(self) -> Runner:
        clock = _StoppedClock(self.history[-1].at)
        return Runner(self.flow, self.state.execution_id, self.history, [], clock, self._refuse)

    async def run(self, timeout: float | None, in_task: bool = True) -> Verdict | None:
        """Replay the history to its end and judge where the code got to; None if the code
        waits on something other than its Context and may not have a task (``in_task``)."""
        runner = self.runner
        limit = asyncio.timeout(timeout) if timeout is not None else contextlib.nullcontext()
        try:
            async with limit:  # no task of its own, unlike wait_for
                try:
                    outcome: Outcome | None = await runner.start(inline=True)
                except WaitedElsewhere:  # code that waits elsewhere gets a task of its own
                    if not in_task:
                        return None
                    runner = self.runner = self._runner()
                    outcome = await runner.start()
        except _PastEnd:
            outcome = None
        except NondeterminismError as error:
            return self._nondeterminism(error)
        except TimeoutError:
            message = (
                f"execution {self.state.execution_id}: the flow code did not reach its next "
                f"operation within {timeout:g} s; flow code must wait only on its Context"
            )
            return verdict_of(self.state, "error", message)
        finally:
            runner.abandon()  # it unwinds on the loop's next turn, beside the next replay
        if self.state.status in (Status.COMPLETED, Status.FAILED):
            return self._judge_end(runner, outcome)
        if self.state.status in (Status.PAUSED, Status.WAITING):
            return self._judge_settled(runner, outcome)
        return self._judge_open(runner, outcome)

    def _nondeterminism(self, error: NondeterminismError) -> Verdict:
        """The runner's fault: another operation, an early end, inputs that no longer fit."""
        where = {key: error.details.get(key) for key in ("sequence", "recorded", "issued")}
        raised = self.raised
        if raised is not None and where["issued"] == ExecutionFailed.kind:
            message = (
                f"execution {self.state.execution_id}: the flow code raised {raised_at(raised)} "
                f"where the history records {quoted(str(where['recorded']))} (operation "
                f"{where['sequence']})"
            )
            where["issued"] = f"failed {type(raised).__name__}: {raised}"
            return verdict_of(self.state, "error", message, **where)
        return verdict_of(self.state, "diverged", error.message, **where)

    def _judge_end(self, runner: Runner, outcome: Outcome | None) -> Verdict:
        """A completed or failed history: the code must end the same way, and no later."""
        recorded = self.history[-1].event
        new = self.refused or runner.pending
        if outcome is None or len(new) != 1 or not isinstance(new[0].event, _ENDS):
            return self._went_past(runner, recorded)

        issued = new[0].event
        if _same_end(recorded, issued):
            ends = "completes with the recorded result"
            if isinstance(recorded, ExecutionFailed):
                ends = f"fails as recorded ({_end_text(recorded)})"
            return verdict_of(self.state, "ok", f"replays all {self._ops()} and {ends}")
        where = {
            "sequence": self.operations + 1,
            "recorded": _end_text(recorded),
            "issued": _end_text(issued),
        }
        if self.raised is not None and isinstance(issued, ExecutionFailed):
            message = (
                f"execution {self.state.execution_id}: the flow code raised "
                f"{raised_at(self.raised)} where the history records {where['recorded']}"
            )
            return verdict_of(self.state, "error", message, **where)
        message = (
            f"execution {self.state.execution_id}: the flow code ends {where['issued']}, but "
            f"the history records {where['recorded']}; {_CHANGED}"
        )
        return verdict_of(self.state, "diverged", message, **where)

    def _went_past(self, runner: Runner, recorded: Event) -> Verdict:
        """The code goes on past the end of a history that records the flow's end."""
        sequence, issued = self._next(runner)
        message = (
            f"execution {self.state.execution_id}: the history records {_end_text(recorded)} "
            f"after operation {self.operations}, but the flow code goes on with "
            f"{quoted(issued)}; {_CHANGED}"
        )
        where = {"sequence": sequence, "recorded": _end_text(recorded), "issued": issued}
        return verdict_of(self.state, "diverged", message, **where)

    def _judge_settled(self, runner: Runner, outcome: Outcome | None) -> Verdict:
        """A paused or waiting history: the code must wait at the same operation."""
        last = describe(self.history[-1].event)
        at = f"{quoted(last)} (operation {self.operations})"
        if last == "wait":
            at = f"the timer of operation {self.operations}"
        if isinstance(outcome, Suspended | Sleeping) and outcome.sequence == self.operations:
            message = f"replays all {self._ops()} and waits at {at}, as recorded"
            return verdict_of(self.state, "ok", message)
        sequence, issued = self._next(runner)
        message = (
            f"execution {self.state.execution_id}: the history waits at {at}, but the flow "
            f"code goes on with {quoted(issued)} (operation {sequence})"
        )
        where = {"sequence": sequence, "recorded": last, "issued": issued}
        return verdict_of(self.state, "diverged", message, **where)

    def _judge_open(self, runner: Runner, outcome: Outcome | None) -> Verdict:
        """A history that ends running or cancelled: nothing past its end is recorded."""
        ends = "cancelled" if self.state.status is Status.CANCELLED else "running"
        message = f"replays all {self._ops()}; the history ends {ends} there"
        past_end = None
        if outcome is None or runner.pending:
            past_end = self._next(runner)[1]
            message += f", and the flow code goes on with {quoted(past_end)} (not run)"
        return verdict_of(self.state, "ok", message, past_end=past_end)

    def _next(self, runner: Runner) -> tuple[int, str]:
        """The first thing the code decided past the end of the history: sequence, name."""
        new = self.refused or runner.pending
        if not new:
            return runner.last_operation
        event = new[0].event
        if isinstance(event, _ENDS):
            return self.operations + 1, _end_text(event)
        return getattr(event, "sequence", self.operations + 1), describe(event)

    def _ops(self) -> str:
        return f"{self.operations} operation" + ("" if self.operations == 1 else "s")


_ENDS = (ExecutionCompleted, ExecutionFailed)

_CHANGED = (
    "the flow code changed since the execution started: restore the old code, or register "
    "the new code as a new flow version"
)

_LONGEST = 500
"""Characters of a result shown in a verdict; the history holds the whole."""


def quoted(operation: str) -> str:
    """An operation as a sentence names it: ``step 'charge'``, ``pause 'approve'``; other
    descriptions (``wait``, ``completed {...}``) as they are."""
    kind, _, name = operation.partition(" ")
    return f"{kind} '{name}'" if kind in ("step", "pause") and name else operation


def _same_end(recorded: Event, issued: Event) -> bool:
    """Whether two ends agree: the same kind, and results equal as JSON (keys in any order)."""
    if type(recorded) is not type(issued):
        return False
    if isinstance(recorded, ExecutionCompleted) and isinstance(issued, ExecutionCompleted):
        return _canonical(recorded.result) == _canonical(issued.result)
    return recorded == issued


def _canonical(value: Any) -> bytes:
    """JSON text that ignores key order but tells ``1`` from ``1.0`` and ``true``."""
    return msgspec.json.encode(value, order="sorted")


def _end_text(event: Event) -> str:
    """A flow's end as a verdict names it: ``completed {...}`` or ``failed Type: message``."""
    if isinstance(event, ExecutionCompleted):
        text = msgspec.json.encode(event.result).decode()
        if len(text) > _LONGEST:
            text = f"{text[:_LONGEST]}... ({len(text) - _LONGEST} more characters)"
        return f"completed {text}"
    if isinstance(event, ExecutionFailed):
        return f"failed {event.error_type}: {event.message}"
    return describe(event)


__all__ = [
    "REPLAY_TIMEOUT",
    "Result",
    "Summary",
    "Verdict",
    "execution_ids",
    "quoted",
    "replay_execution",
    "replay_histories",
    "replay_log",
]
