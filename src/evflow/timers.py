"""Time as the engine sees it: an injectable clock, and one scheduler for every durable timer.

Every timestamp the engine records and every timer it fires comes from one ``Clock``, so a
test can substitute a ``ManualClock`` and move hours on in a millisecond.

Durable timers are facts in the log (a ``TimerStarted``, or a pause with a deadline), so the
``Scheduler`` holds only what the log says: on start it is loaded from the store, and the
engine tells it of every timer it appends afterwards. All pending timers live in one heap
driven by one task: a hundred thousand waiting executions cost a hundred thousand heap
entries, not a hundred thousand tasks.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Literal, Protocol

import msgspec

from .errors import EvflowError
from .events import ExecutionPaused, StoredEvent, TimerStarted

logger = logging.getLogger(__name__)

LONGEST_SLEEP = 60.0
"""Seconds the system clock sleeps at most before looking at the wall clock again, so a
wall clock set forward (or a machine woken from suspend) fires timers within a minute."""


class Clock(Protocol):
    """A source of the current instant, and a way to wait for a later one."""

    def now(self) -> datetime:
        """The current instant, timezone-aware, in UTC."""

    async def sleep_until(self, instant: datetime) -> None:
        """Return once ``now()`` has reached ``instant`` (perhaps a little later)."""


class SystemClock:
    """The machine's wall clock."""

    def now(self) -> datetime:
        """The current instant, timezone-aware, in UTC."""
        return datetime.now(UTC)

    async def sleep_until(self, instant: datetime) -> None:
        """Sleep until the wall clock reads ``instant``, looking again at least every minute."""
        while (left := (instant - self.now()).total_seconds()) > 0:
            await asyncio.sleep(min(left, LONGEST_SLEEP))


class ManualClock:
    """A clock that moves only when told to: tests of hours-long waits take milliseconds.

    Args:
        start: the instant the clock reads at first (timezone-aware).
    """

    def __init__(self, start: datetime):
        self._now = utc(start, "the start of a ManualClock")
        self._sleepers: list[tuple[datetime, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now(self) -> datetime:
        """The instant the clock was last set to."""
        return self._now

    async def sleep_until(self, instant: datetime) -> None:
        """Return once the clock has been moved to ``instant`` or past it."""
        if instant <= self._now:
            return
        waiter = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (instant, next(self._order), waiter))
        await waiter

    def advance(self, delta: timedelta) -> None:
        """Move the clock forward by ``delta`` and wake whoever waited for that instant."""
        self.set(self._now + delta)

    def set(self, instant: datetime) -> None:
        """Move the clock to ``instant`` (never backwards) and wake who waited for it."""
        instant = utc(instant, "the instant a ManualClock is set to")
        if instant < self._now:
            raise ValueError(f"a ManualClock never goes back: it reads {self._now}, not {instant}")
        self._now = instant
        while self._sleepers and self._sleepers[0][0] <= instant:
            _, _, waiter = heapq.heappop(self._sleepers)
            if not waiter.done():
                waiter.set_result(None)


def utc(instant: datetime, what: str) -> datetime:
    """``instant`` in UTC; a naive datetime is refused, since its meaning depends on a guess."""
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError(
            f"{what} is a naive datetime ({instant.isoformat()}); give it a time zone, e.g. "
            "datetime(..., tzinfo=ZoneInfo('Europe/Paris')) or datetime.now(UTC)"
        )
    return instant.astimezone(UTC)


class Timer(msgspec.Struct, frozen=True, gc=False):
    """A timer pending in the log: a wait's wake-up or a pause's deadline."""

    due: datetime
    """When it fires (UTC)."""
    execution_id: str
    """The execution that waits."""
    flow: str
    """Its flow."""
    version: int
    """Version of the event that started the timer: the execution must still be there."""
    sequence: int
    """The operation that waits (the wait or the pause)."""
    kind: Literal["wait", "deadline"]
    """``wait`` wakes a ``wait_for``/``wait_until``; ``deadline`` expires a pause."""


def pending_timer(flow: str, stored: StoredEvent) -> Timer | None:
    """The timer an execution waits on when ``stored`` is its latest event, if any."""
    event = stored.event
    if isinstance(event, TimerStarted):
        due, kind = event.wake_at, "wait"
    elif isinstance(event, ExecutionPaused) and event.deadline is not None:
        due, kind = event.deadline, "deadline"
    else:
        return None
    return Timer(due, stored.execution_id, flow, stored.version, event.sequence, kind)


RETRY_AFTER = 5.0
"""Seconds before a timer whose firing failed (the log busy, say) is fired again."""

Fire = Callable[[Timer], Awaitable[None]]
"""Fires one due timer; the scheduler never calls it twice for one timer."""


class Scheduler:
    """Fires each pending timer once its due time has come, earliest first.

    At most one timer is pending per execution (a flow waits on one thing at a time): a
    newer one for the same execution replaces the older, and ``forget`` drops it when the
    execution moves on some other way (resumed, cancelled). Dropped entries stay in the heap
    until they surface or the heap is compacted, and are skipped.

    Args:
        clock: the clock that says when a timer is due.
        fire: fires one timer (the engine appends its event and drives the flow on).
        concurrency: timers being fired at once; each is started in due order.
    """

    def __init__(self, clock: Clock, fire: Fire, *, concurrency: int = 64):
        self._clock = clock
        self._fire = fire
        self._concurrency = concurrency
        self._heap: list[tuple[datetime, int, Timer]] = []
        self._pending: dict[str, Timer] = {}
        self._order = itertools.count()
        self._changed = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._firing: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self.fired = 0
        """Timers fired since start."""

    def __len__(self) -> int:
        return len(self._pending)

    def next_due(self) -> datetime | None:
        """When the earliest pending timer fires, if any is pending."""
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def add(self, timer: Timer) -> None:
        """Hold ``timer`` until it is due, in place of any older timer of its execution."""
        self._pending[timer.execution_id] = timer
        heapq.heappush(self._heap, (timer.due, next(self._order), timer))
        if self._heap[0][2] is timer:
            self._changed.set()  # it is the earliest: the loop must sleep less
        self._compact()

    def add_all(self, timers: Iterable[Timer]) -> None:
        """Hold many timers at once (the pending timers read from the log at start)."""
        for timer in timers:
            self._pending[timer.execution_id] = timer
            self._heap.append((timer.due, next(self._order), timer))
        heapq.heapify(self._heap)
        self._changed.set()

    def pending(self, execution_id: str) -> Timer | None:
        """The timer held for an execution, if any."""
        return self._pending.get(execution_id)

    def forget(self, execution_id: str) -> None:
        """Drop the timer of an execution that moved on without it."""
        self._pending.pop(execution_id, None)

    def forget_where(self, concerns: Callable[[str], bool]) -> None:
        """Drop the timers of every execution ``concerns`` is true of (a partition that
        another engine holds now)."""
        for execution_id in [e for e in self._pending if concerns(e)]:
            del self._pending[execution_id]

    def start(self) -> None:
        """Start firing timers as they fall due."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="evflow-timers")
            logger.info("timer scheduler started with %d pending timers", len(self._pending))

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop firing; a firing still under way after ``timeout`` seconds is cancelled.

        A cancelled firing either never reached the log (the timer fires on the next start)
        or did (the next start drives its execution on).
        """
        if self._task is None:
            return
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        if self._firing:
            _, late = await asyncio.wait(self._firing, timeout=timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def _run(self) -> None:
        """Start each due timer's firing in due order, at most ``concurrency`` at a time."""
        while True:
            timer = self._take_due()
            if timer is None:
                await self._sleep(self.next_due())
                continue
            await self._slots.acquire()
            task = asyncio.create_task(self._fire_one(timer))
            self._firing.add(task)
            task.add_done_callback(self._firing.discard)

    def _take_due(self) -> Timer | None:
        """The earliest pending timer, if it is due."""
        due = self.next_due()
        if due is None or due > self._clock.now():
            return None
        _, _, timer = heapq.heappop(self._heap)
        del self._pending[timer.execution_id]
        return timer

    async def _fire_one(self, timer: Timer) -> None:
        try:
            await self._fire(timer)
            self.fired += 1
        except Exception as error:  # one timer's fault must not stop the others
            logger.warning(
                "firing the %s timer of execution %s failed (%s); trying again in %g s",
                timer.kind,
                timer.execution_id,
                error or type(error).__name__,
                RETRY_AFTER,
                exc_info=not isinstance(error, EvflowError),
            )
            if timer.execution_id not in self._pending:
                later = self._clock.now() + timedelta(seconds=RETRY_AFTER)
                self.add(msgspec.structs.replace(timer, due=later))
        finally:
            self._slots.release()

    async def _sleep(self, until: datetime | None) -> None:
        """Wait until ``until`` or until an earlier timer is added, whichever comes first."""
        self._changed.clear()
        waits = [asyncio.ensure_future(self._changed.wait())]
        if until is not None:
            waits.append(asyncio.ensure_future(self._clock.sleep_until(until)))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    def _drop_stale(self) -> None:
        """Pop heap entries whose execution has moved on or has a newer timer."""
        while self._heap and not self._live(self._heap[0][2]):
            heapq.heappop(self._heap)

    def _live(self, timer: Timer) -> bool:
        return self._pending.get(timer.execution_id) is timer

    def _compact(self) -> None:
        """Rebuild the heap when dropped entries outnumber the live ones."""
        if len(self._heap) > 2 * len(self._pending) + 1024:
            self._heap = [entry for entry in self._heap if self._live(entry[2])]
            heapq.heapify(self._heap)
