"""The ``Context`` a flow receives: its only door to the outside world.

Every operation (``step``, ``pause``) takes the next sequence number. When the execution's
history already holds that sequence, the operation replays it: it returns the recorded
result and runs nothing. Otherwise it is live: it decides a new event, and for a pause the
flow stops there until a resume answers. An operation that differs from what the history
recorded at its sequence is a non-determinism fault, never silently accepted.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec

from . import fields
from .errors import NondeterminismError, StepError
from .events import (
    Event,
    ExecutionPaused,
    ExecutionResumed,
    StepCompleted,
    StepFailed,
    StoredEvent,
)

if TYPE_CHECKING:
    from .runtime import Runner


class Context:
    """What a flow uses to run steps, pause for input, and read the time.

    Attributes:
        execution_id: the execution this flow run belongs to.
        flow: the flow's name.
    """

    def __init__(self, runner: Runner, history: list[StoredEvent]):
        self.execution_id = runner.execution_id
        self.flow = runner.flow.name
        self._runner = runner
        self._recorded: dict[int, list[StoredEvent]] = {}
        for stored in history[1:]:
            sequence = getattr(stored.event, "sequence", None)
            if sequence is not None:
                self._recorded.setdefault(sequence, []).append(stored)
        self._sequence = 0
        self._now = history[0].at

    def now(self) -> datetime:
        """The time of the latest recorded event the flow has reached (UTC).

        Recorded, so a replay sees the same instant the first run saw; it moves forward
        when a step completes or a pause is answered.
        """
        return self._now

    @property
    def issued_operations(self) -> int:
        """How many operations the flow code has issued so far."""
        return self._sequence

    @property
    def recorded_operations(self) -> int:
        """How many operations the history holds."""
        return max(self._recorded, default=0)

    async def step(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` once and record its JSON-serialisable result.

        A replay returns the recorded result without calling ``fn``; a recorded failure is
        raised again as the same ``StepError``. ``fn`` may be sync or async.
        """
        sequence = self._next()
        recorded = self._expect(sequence, "step", name)
        if recorded:
            return self._replay_step(recorded[0])

        # The events before this step must be durable before its side effect happens.
        await self._runner.flush_in_flow()
        try:
            result = fn(*args)
            if inspect.isawaitable(result):
                result = await result
        except Exception as error:
            failed = StepFailed(sequence, name, type(error).__name__, str(error))
            return self._replay_step(self._runner.record(failed))
        try:
            encoded = msgspec.json.encode(result)
        except TypeError as error:
            reason = f"the result is not JSON-serialisable ({error}); return JSON values"
            failed = StepFailed(sequence, name, "TypeError", reason)
            return self._replay_step(self._runner.record(failed))
        completed = StepCompleted(sequence, name, msgspec.json.decode(encoded))
        return self._replay_step(self._runner.record(completed))

    def _replay_step(self, stored: StoredEvent) -> Any:
        self._now = stored.at
        event = stored.event
        if isinstance(event, StepFailed):
            raise StepError(event.name, event.error_type, event.message)
        assert isinstance(event, StepCompleted)
        return event.result

    async def pause(
        self,
        inputs: dict[str, Any] | None = None,
        outputs: dict[str, Any] | type[msgspec.Struct] | None = None,
        *,
        name: str = "pause",
    ) -> Any:
        """Stop until a resume answers with ``outputs``, and return the answer.

        ``inputs`` are shown to whoever answers (in the pause reply and notification).
        ``outputs`` declares the resume body: a dict of field name to type (the answer is
        then a dict) or a msgspec Struct type (the answer is an instance of it).
        """
        sequence = self._next()
        kind = fields.from_outputs(name, outputs or {})
        recorded = self._expect(sequence, "pause", name)
        if not recorded:
            shown = msgspec.json.decode(msgspec.json.encode(inputs or {}))
            paused = ExecutionPaused(
                sequence, name, shown, fields.describe(kind), fields.schema(kind)
            )
            recorded = [self._runner.record(paused)]
        if len(recorded) == 1:
            answer = await self._runner.suspend(sequence, name, kind)
            recorded.append(answer)
        resumed = recorded[1].event
        assert isinstance(resumed, ExecutionResumed)
        self._now = recorded[1].at
        try:
            value = fields.reload(resumed.outputs, kind, self.execution_id, f"outputs of {name}")
        except NondeterminismError as error:
            raise self._runner.fault(error) from None
        return value if isinstance(outputs, type) else msgspec.structs.asdict(value)

    def _next(self) -> int:
        self._runner.check_open()
        self._sequence += 1
        return self._sequence

    def _expect(self, sequence: int, operation: str, name: str) -> list[StoredEvent]:
        """The recorded events of ``sequence``, after checking they record this operation."""
        recorded = self._recorded.get(sequence, [])
        if not recorded:
            return []
        first = recorded[0].event
        was = _operation(first)
        if was != (operation, name):
            raise self._runner.fault(
                NondeterminismError(
                    f"execution {self.execution_id}: operation {sequence} is {operation} "
                    f"'{name}' in the code but {was[0]} '{was[1]}' in the history; the flow "
                    "code changed since the execution started: restore the old code, or "
                    "register the new code as a new flow version",
                    execution_id=self.execution_id,
                    sequence=sequence,
                    recorded=f"{was[0]} {was[1]}",
                    issued=f"{operation} {name}",
                )
            )
        return list(recorded)


def _operation(event: Event) -> tuple[str, str]:
    """The operation a recorded event answers: (kind, name)."""
    if isinstance(event, StepCompleted | StepFailed):
        return ("step", event.name)
    if isinstance(event, ExecutionPaused):
        return ("pause", event.name)
    return (type(event).__name__, getattr(event, "name", ""))
