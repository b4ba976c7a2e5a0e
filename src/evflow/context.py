"""The ``Context`` a flow receives: its only door to the outside world.

Every operation (``step``, ``pause``, ``wait_for``, ``wait_until``) takes the next sequence
number. When the execution's
history already holds that sequence, the operation replays it: it returns the recorded
result and runs nothing. Otherwise it is live: it decides a new event, and for a pause the
flow stops there until a resume answers (or the pause's deadline passes), and for a wait
until the engine's scheduler records that its timer fired. An operation that differs from
what the history recorded at its sequence is a non-determinism fault, never silently
accepted.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import msgspec

from . import fields
from .errors import EvflowError, NondeterminismError, PauseTimedOut, StepError
from .events import (
    Event,
    ExecutionPaused,
    ExecutionResumed,
    PauseExpired,
    StepCompleted,
    StepFailed,
    StoredEvent,
    TimerFired,
    TimerStarted,
)
from .timers import utc

if TYPE_CHECKING:
    from .runtime import Runner


class Suspended(msgspec.Struct, frozen=True):
    """Where a run settles at a pause: the flow waits for a resume (or the deadline)."""

    sequence: int
    name: str
    kind: type[msgspec.Struct]


class Sleeping(msgspec.Struct, frozen=True):
    """Where a run settles at a wait: the engine's scheduler records the firing later."""

    sequence: int
    wake_at: datetime


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
        self._last = (0, "")
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

    @property
    def last_operation(self) -> tuple[int, str]:
        """The latest operation the flow code issued: its sequence, and its name as
        ``describe`` gives it (``(0, "")`` before any). A replay that stops past the end of
        a history reports it: what the code goes on with."""
        return self._last

    def recorded_operation(self, sequence: int) -> str:
        """The operation the history records at ``sequence``, as ``describe`` names it."""
        recorded = self._recorded.get(sequence)
        return describe(recorded[0].event) if recorded else ""

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
            result = await _call(fn, args)
        except Exception as error:
            failed = StepFailed(sequence, name, type(error).__name__, str(error))
            return self._replay_step(self._runner.record_result(failed))
        try:
            encoded = msgspec.json.encode(result)
        except TypeError as error:
            reason = f"the result is not JSON-serialisable ({error}); return JSON values"
            failed = StepFailed(sequence, name, "TypeError", reason)
            return self._replay_step(self._runner.record_result(failed))
        completed = StepCompleted(sequence, name, msgspec.json.decode(encoded))
        return self._replay_step(self._runner.record_result(completed))

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
        timeout: timedelta | None = None,
        deadline: datetime | None = None,
        default: dict[str, Any] | msgspec.Struct | None = None,
    ) -> Any:
        """Stop until a resume answers with ``outputs``, and return the answer.

        ``inputs`` are shown to whoever answers (in the pause reply and notification).
        ``outputs`` declares the resume body: a dict of field name to type (the answer is
        then a dict) or a msgspec Struct type (the answer is an instance of it).

        With ``timeout`` (from now) or ``deadline`` (an aware datetime), a pause still
        unanswered then expires: the flow gets ``default`` as the answer if given, else
        ``PauseTimedOut`` is raised here. A resume after the expiry is refused as expired.
        """
        kind = fields.from_outputs(name, outputs or {})
        limit = self._deadline_of(name, timeout, deadline, default)
        fallback = self._default_of(name, kind, default)
        sequence = self._next()
        recorded = self._expect(sequence, "pause", name)
        if not recorded:
            recorded = self._record_pause(sequence, name, kind, inputs, limit, fallback)
        if len(recorded) == 1:
            answer = await self._runner.suspend(Suspended(sequence, name, kind))
            recorded.append(answer)

        self._now = recorded[1].at
        answer_outputs = self._answer_of(recorded[0].event, recorded[1].event)
        try:
            value = fields.reload(answer_outputs, kind, self.execution_id, f"outputs of {name}")
        except NondeterminismError as error:
            raise self._runner.fault(error) from None
        return value if isinstance(outputs, type) else msgspec.structs.asdict(value)

    def _record_pause(
        self,
        sequence: int,
        name: str,
        kind: type[msgspec.Struct],
        inputs: dict[str, Any] | None,
        limit: Callable[[datetime], datetime] | None,
        fallback: dict[str, Any] | None,
    ) -> list[StoredEvent]:
        """Record a new pause; one whose deadline has already passed expires at once."""
        now = self._runner.now()
        due = limit(now) if limit is not None else None
        shown = msgspec.json.decode(msgspec.json.encode(inputs or {}))
        paused = ExecutionPaused(
            sequence, name, shown, fields.describe(kind), fields.schema(kind), due, fallback
        )
        recorded = [self._runner.record(paused, at=now)]
        if due is not None and due <= now:
            recorded.append(self._runner.record(PauseExpired(sequence), at=now))
        return recorded

    def _answer_of(self, paused: Event, end: Event) -> dict[str, Any]:
        """The outputs a pause ended with: the resume's, or its default once it expired."""
        assert isinstance(paused, ExecutionPaused)
        if isinstance(end, PauseExpired):
            if paused.default is None:
                assert paused.deadline is not None
                timed_out = PauseTimedOut(
                    paused.name, paused.sequence, paused.deadline, self.execution_id
                )
                raise timed_out
            return paused.default
        assert isinstance(end, ExecutionResumed)
        return end.outputs

    def _deadline_of(
        self,
        name: str,
        timeout: timedelta | None,
        deadline: datetime | None,
        default: object,
    ) -> Callable[[datetime], datetime] | None:
        """When a pause expires, as a function of the instant it is recorded; None: never."""
        what = f"pause '{name}' of execution {self.execution_id}"
        if timeout is not None and deadline is not None:
            raise ValueError(f"{what}: give a timeout or a deadline, not both")
        if timeout is not None:
            delay = _delay(timeout, f"{what}: the timeout")
            return lambda now: _after(now, delay, f"{what}: the timeout")
        if deadline is not None:
            instant = utc(deadline, f"{what}: the deadline")
            return lambda now: instant
        if default is not None:
            raise ValueError(
                f"{what}: a default is only used when the pause expires; give a timeout or a "
                "deadline too, or leave the default out"
            )
        return None

    def _default_of(
        self, name: str, kind: type[msgspec.Struct], default: object
    ) -> dict[str, Any] | None:
        """A pause's default outputs as JSON values, once they fit the declared outputs."""
        if default is None:
            return None
        what = f"default of pause '{name}'"
        try:
            body = msgspec.json.encode(default)
            return fields.to_builtins(fields.decode(body, kind, what, self.execution_id))
        except (EvflowError, TypeError) as error:
            raise ValueError(
                f"execution {self.execution_id}: the {what} does not fit its outputs "
                f"({error}); give every declared output field a value of its type"
            ) from None

    async def wait_for(self, delay: timedelta) -> None:
        """Wait durably for ``delay``: the execution is ``waiting`` until then, across
        restarts, and costs no task while it waits. A zero delay returns at once."""
        what = f"execution {self.execution_id}: wait_for's delay"
        span = _delay(delay, what)
        await self._wait(lambda now: _after(now, span, what))

    async def wait_until(self, instant: datetime) -> None:
        """Wait durably until ``instant``, an aware datetime in any time zone (kept in UTC).

        An instant already past returns at once (its timer is still recorded). A naive
        datetime is refused: its meaning would depend on the engine machine's time zone.
        """
        wake_at = utc(instant, f"execution {self.execution_id}: wait_until's instant")
        await self._wait(lambda now: wake_at)

    async def _wait(self, wake_at: Callable[[datetime], datetime]) -> None:
        sequence = self._next()
        recorded = self._expect(sequence, "wait", "")
        if not recorded:
            now = self._runner.now()
            due = wake_at(now)
            recorded = [self._runner.record(TimerStarted(sequence, due), at=now)]
            if due <= now:
                recorded.append(self._runner.record(TimerFired(sequence), at=now))
        if len(recorded) == 1:
            started = recorded[0].event
            assert isinstance(started, TimerStarted)
            await self._runner.suspend(Sleeping(sequence, started.wake_at))
        self._now = recorded[1].at

    def _next(self) -> int:
        self._runner.check_open()
        self._sequence += 1
        return self._sequence

    def _expect(self, sequence: int, operation: str, name: str) -> list[StoredEvent]:
        """The recorded events of ``sequence``, after checking they record this operation."""
        now = (operation, name)
        self._last = (sequence, _named(now))
        recorded = self._recorded.get(sequence, [])
        if not recorded:
            return []
        was = _operation(recorded[0].event)
        if was != now:
            raise self._runner.fault(
                NondeterminismError(
                    f"execution {self.execution_id}: operation {sequence} is {_quoted(now)} "
                    f"in the code but {_quoted(was)} in the history; the flow code changed "
                    "since the execution started: restore the old code, or register the new "
                    "code as a new flow version",
                    execution_id=self.execution_id,
                    sequence=sequence,
                    recorded=_named(was),
                    issued=_named(now),
                )
            )
        return list(recorded)


def describe(event: Event) -> str:
    """The operation a recorded event answers, as errors and reports name it: ``step
    charge``, ``pause approve``, ``wait``; other events by their type."""
    return _named(_operation(event))


def _named(operation: tuple[str, str]) -> str:
    return " ".join(filter(None, operation))


def _operation(event: Event) -> tuple[str, str]:
    """The operation a recorded event answers: (kind, name)."""
    if isinstance(event, StepCompleted | StepFailed):
        return ("step", event.name)
    if isinstance(event, ExecutionPaused):
        return ("pause", event.name)
    if isinstance(event, TimerStarted):
        return ("wait", "")
    return (type(event).__name__, getattr(event, "name", ""))


def _quoted(operation: tuple[str, str]) -> str:
    """An operation as messages name it: ``step 'charge'``, ``pause 'approve'``, ``wait``."""
    kind, name = operation
    return f"{kind} '{name}'" if name else kind


def _delay(delay: object, what: str) -> timedelta:
    """A delay, once it is known to be a timedelta that does not point back in time."""
    if not isinstance(delay, timedelta):
        raise TypeError(f"{what} must be a datetime.timedelta, not {type(delay).__name__}")
    if delay < timedelta(0):
        seconds = f"{delay.total_seconds():g} s"
        raise ValueError(f"{what} is negative ({seconds}); give a delay of zero or more")
    return delay


def _after(now: datetime, delay: timedelta, what: str) -> datetime:
    """``now + delay``, or an error saying the delay reaches past what a datetime holds."""
    try:
        return now + delay
    except OverflowError:
        raise ValueError(
            f"{what} ({delay.days} days) ends after the year 9999; give a shorter delay"
        ) from None


async def _call(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """Call a step's function: a coroutine function on the event loop, any other function
    in a worker thread, so a blocking call (an HTTP client, a sleep) holds up no other
    execution, timer or request. Known limit: sync step functions share the default
    thread pool, so at most that many run at once; the rest wait for a thread."""
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    result = await asyncio.to_thread(fn, *args)
    if inspect.isawaitable(result):
        result = await result
    return result
