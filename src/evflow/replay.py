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
from collections.abc import AsyncIterator

from .chain import Record
from .errors import StoreError, UnknownExecution, UnknownFlow
from .events import ExecutionStarted, StoredEvent, decode
from .flow import App, FlowDef
from .replay_check import ReplayCheck, quoted
from .replay_verdicts import Result, Summary, Verdict, raised_at, unfolded, verdict_of
from .state import fold
from .store import EventStore

REPLAY_TIMEOUT = 30.0
"""Seconds one execution's flow code may take to replay before it is reported as an error."""

REPLAY_WINDOW = 64
"""Executions read from the log at once, and replayed under one timer."""


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
        return await ReplayCheck(flow, state, history).run(timeout, in_task)
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
