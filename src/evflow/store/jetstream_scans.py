"""The JetStream log's scans of every execution's latest event: what an engine drives on and
the timers it arms when it starts or takes over partitions, and the listing.

A scan reads each execution's latest event only, never the events before it: one direct
get of the latest message of every subject matching a partition's filter (``multi_last``,
nats-server 2.11 or later) answers for up to ``MULTI_LAST`` executions at once. A request
matching more is refused by the server; the scan then halves the partitions it asks about
at once, and for a single partition still too big it lists the partition's executions
from the leader and asks for them ``MULTI_LAST`` at a time. The execution's flow comes
with its latest event (the body's origin), so no first event is read either.

Every read is bounded by a position, the log's end as the stream's leader holds it (or
``as_of_position``), and also asks for the latest message on the subject of the message
there. Direct gets are answered by any replica, and one that holds that message holds all
before it; an answer without it came from a replica still catching up, and is asked
again until one has it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection

from nats.aio.msg import Msg

from ..errors import StoreError, Unavailable
from ..events import SETTLING
from ..partitions import PARTITIONS
from ..state import Status, status_after
from ..timers import Timer, pending_timer
from . import ExecutionSummary
from .jetstream_layout import (
    Entry,
    Layout,
    Origin,
    as_stored,
    decode_entry,
    moment,
)
from .jetstream_requests import (
    CATCH_UP,
    MULTI_LAST,
    Message,
    StreamRequests,
    TooManySubjects,
    sequence_of,
)

logger = logging.getLogger(__name__)

_SETTLING_TYPES = frozenset(cls.__name__ for cls in SETTLING)
_TIMER_TYPES = frozenset({"TimerStarted", "ExecutionPaused"})
"""Latest events that may start a timer (a pause only with a deadline)."""

Latest = list[tuple[int, Entry]]
"""Executions' latest events: each one's position and message body, in log order."""


async def unsettled(
    wire: StreamRequests, layout: Layout, partitions: Collection[int] | None
) -> list[str]:
    """Executions whose latest event leaves them running, in the order of those events."""
    latest = await latest_events(wire, layout, partitions, None)
    return [entry.execution_id for _, entry in latest if entry.type not in _SETTLING_TYPES]


async def pending_timers(
    wire: StreamRequests, layout: Layout, partitions: Collection[int] | None
) -> list[Timer]:
    """The timer of every execution whose latest event starts one; see ``EventStore``."""
    latest = await latest_events(wire, layout, partitions, None)
    latest = [(position, entry) for position, entry in latest if entry.type in _TIMER_TYPES]
    origins = _origins(latest)
    timers = []
    for position, entry in latest:
        timer = pending_timer(origins[entry.execution_id].flow, as_stored(position, entry))
        if timer is not None:
            timers.append(timer)
    return timers


async def list_executions(
    wire: StreamRequests,
    layout: Layout,
    flow: str | None,
    status: Status | None,
    limit: int,
    before_position: int | None,
    as_of_position: int | None,
) -> list[ExecutionSummary]:
    """Executions as the log stood at ``as_of_position``, newest change first; see
    ``EventStore``.

    Known limit: each page reads the latest event of every execution in the log (not every
    event), so a page costs time in proportion to the number of executions, and paging
    through them all in proportion to its square over the page size.
    """
    latest = await latest_events(wire, layout, None, as_of_position)
    latest = [
        (position, entry)
        for position, entry in latest
        if (before_position is None or position < before_position)
        and (status is None or status_after(entry.type) is status)
    ]
    origins = _origins(latest)
    rows = [
        _summary(position, entry, origins[entry.execution_id])
        for position, entry in reversed(latest)
        if flow is None or origins[entry.execution_id].flow == flow
    ]
    return rows[: max(limit, 0)]


async def latest_events(
    wire: StreamRequests,
    layout: Layout,
    partitions: Collection[int] | None,
    as_of_position: int | None,
) -> Latest:
    """The latest event, as of ``as_of_position`` (the log's end if None), of each
    execution in ``partitions`` (all if None; one that does not exist holds none), in log
    order."""
    everyone = range(PARTITIONS)
    asked = list(everyone) if partitions is None else sorted(set(partitions) & set(everyone))
    if not asked:
        return []
    end = await _end(wire, layout, as_of_position)
    if end is None:
        return []

    found: dict[str, Msg] = {}
    await _read_partitions(wire, layout, asked, end, found)

    wanted = set(asked)
    latest = [
        (sequence_of(msg), decode_entry(msg.data))
        for subject, msg in found.items()
        if layout.partition_of_subject(subject) in wanted
    ]
    return sorted(latest, key=lambda item: item[0])


async def _end(wire: StreamRequests, layout: Layout, as_of: int | None) -> Message | None:
    """The message a scan reads up to: the log's latest event, as the stream's leader holds
    it, or the message at ``as_of`` if that is earlier. None when there is nothing."""
    last = await wire.leader_last(layout.events)
    if last is None or as_of is None or as_of >= last.sequence:
        return last
    return await wire.leader_at(as_of) if as_of > 0 else None


async def _read_partitions(
    wire: StreamRequests,
    layout: Layout,
    partitions: list[int],
    end: Message,
    found: dict[str, Msg],
) -> None:
    """Add the latest event of each execution in ``partitions`` to ``found``, by subject:
    all of them in one request if the server allows it, else halves of them, else (one
    partition holding too many executions) its executions listed and asked for in turn."""
    try:
        await _read_caught_up(wire, [layout.partition(p) for p in partitions], end, found)
        return
    except TooManySubjects:
        if len(partitions) > 1:
            half = len(partitions) // 2
            await asyncio.gather(
                _read_partitions(wire, layout, partitions[:half], end, found),
                _read_partitions(wire, layout, partitions[half:], end, found),
            )
            return
    subjects = await wire.leader_subjects(layout.partition(partitions[0]))
    logger.debug(
        "partition %d of %s holds %d executions, more than one read answers: reading them "
        "%d at a time", partitions[0], wire.stream, len(subjects), MULTI_LAST - 1,
    )  # fmt: skip
    step = MULTI_LAST - 1  # one place for the subject of ``end``
    for first in range(0, len(subjects), step):
        await _read_caught_up(wire, subjects[first : first + step], end, found)


async def _read_caught_up(
    wire: StreamRequests, subjects: list[str], end: Message, found: dict[str, Msg]
) -> None:
    """Add the latest message up to ``end`` of each subject matching ``subjects`` to
    ``found``, from a replica that holds ``end`` (see the module's docstring)."""
    for delay in (0.0, *CATCH_UP):
        await asyncio.sleep(delay)
        messages = await wire.latest([*subjects, end.subject], end.sequence)
        if any(sequence_of(msg) == end.sequence for msg in messages):
            found.update((_subject(msg), msg) for msg in messages)
            return
    raise Unavailable(
        f"the JetStream replicas answering reads of {wire.stream} stay behind position "
        f"{end.sequence}; try again when the cluster has caught up"
    )


def _origins(latest: Latest) -> dict[str, Origin]:
    """The origin of each execution in ``latest``, which its latest event carries."""
    origins = {}
    for _, entry in latest:
        if entry.origin is None:
            raise StoreError(
                f"execution {entry.execution_id}: its latest event does not say which flow it "
                "runs, as its first event is missing or no ExecutionStarted; the log was "
                "damaged, edited, or imported from a partial export: run evflow verify",
                execution_id=entry.execution_id,
            )
        origins[entry.execution_id] = entry.origin
    return origins


def _summary(position: int, entry: Entry, origin: Origin) -> ExecutionSummary:
    """A listing row from an execution's latest event and its origin."""
    return ExecutionSummary(
        execution_id=entry.execution_id,
        flow=origin.flow,
        flow_version=origin.flow_version,
        status=status_after(entry.type),
        version=entry.version,
        started_at=moment(origin.started_at, entry.execution_id),
        updated_at=moment(entry.at, entry.execution_id),
        position=position,
    )


def _subject(msg: Msg) -> str:
    assert msg.headers is not None
    return msg.headers["Nats-Subject"]
