"""What a replay check finds: one verdict per execution, and the summary of a run."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any, Literal

import msgspec

from .events import ExecutionStarted, StoredEvent
from .state import ExecutionState

Result = Literal["ok", "diverged", "unknown_flow", "error"]


class Verdict(msgspec.Struct, frozen=True):
    """What replaying one execution against the current flow code found."""

    execution_id: str
    """The execution replayed."""
    flow: str
    """Its flow."""
    flow_version: int
    """The version of the flow code it started on."""
    outcome: Result
    """``ok``, ``diverged``, ``unknown_flow`` or ``error``."""
    status: str | None
    """Where the history stands (``paused``, ``completed`` ...); None if it does not fold."""
    events: int
    """How many events the history holds."""
    message: str
    """What was found, in a sentence."""
    sequence: int | None = None
    """Diverged or error: the operation concerned (one past the last for a flow's end)."""
    recorded: str | None = None
    """Diverged or error: what the history records there (``step charge``, ``completed``)."""
    issued: str | None = None
    """Diverged or error: what the code issued there instead."""
    past_end: str | None = None
    """Ok: what the code goes on with past the end of a history that ends running or
    cancelled; a step there is not run."""


class Summary(msgspec.Struct):
    """How many executions got each outcome."""

    executions: int = 0
    """How many executions were replayed."""
    ok: int = 0
    """Those that replayed as recorded."""
    diverged: int = 0
    """Those whose code issued another operation, or ended otherwise, than recorded."""
    unknown_flow: int = 0
    """Those of a flow or version the app does not register."""
    error: int = 0
    """Those that could not be replayed: a damaged history, or code that raised."""

    def add(self, verdict: Verdict) -> None:
        """Count one more verdict."""
        self.executions += 1
        setattr(self, verdict.outcome, getattr(self, verdict.outcome) + 1)

    @property
    def passed(self) -> bool:
        """Whether every execution replayed as recorded."""
        return self.ok == self.executions


_PACKAGE = Path(__file__).resolve().parent
"""evflow's own code, whose frames an error report skips."""


def raised_at(error: BaseException) -> str:
    """An exception and the line of flow code that raised it: ``NameError: name 'x' is not
    defined (flows.py:12)``, so the auditor finds it (evflow's own frames are skipped)."""
    frames = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if not Path(frame.filename).resolve().is_relative_to(_PACKAGE)
    ]
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"


def verdict_of(state: ExecutionState, outcome: Result, message: str, **where: Any) -> Verdict:
    return Verdict(
        execution_id=state.execution_id,
        flow=state.flow,
        flow_version=state.flow_version,
        outcome=outcome,
        status=state.status.value,
        events=state.version,
        message=message,
        **where,
    )


def unfolded(history: list[StoredEvent], error: ValueError) -> Verdict:
    """The verdict on a history that does not fold: a gap, or no start."""
    started = history[0].event
    flow, version = (
        (started.flow, started.flow_version) if isinstance(started, ExecutionStarted) else ("", 0)
    )
    message = f"the history does not fold, so it cannot be replayed: {error}"
    return Verdict(history[0].execution_id, flow, version, "error", None, len(history), message)
