"""One execution's replay check: its flow code run against its history, writing nothing,
and the verdict on where the code got to (see ``replay`` for the verdicts' meaning)."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime
from typing import Any

import msgspec

from .context import Sleeping, Suspended, describe
from .errors import EvflowError, NondeterminismError
from .events import Event, ExecutionCompleted, ExecutionFailed, StoredEvent
from .flow import FlowDef
from .replay_verdicts import Verdict, raised_at, verdict_of
from .runtime import Outcome, Runner, WaitedElsewhere
from .state import ExecutionState, Status


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


class ReplayCheck:
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
