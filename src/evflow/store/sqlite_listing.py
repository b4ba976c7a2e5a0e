"""The SQLite log's listing of executions, the most recently changed first.

Nothing is kept beside the log for it: each execution's row comes from its first event
(flow, flow version, start) and its latest one (version, status, time of last change).

A listing is a snapshot: only events up to ``as_of_position`` count, so pages taken while
the log grows all describe the log as it stood then. The log is walked back by position
from where the page starts, keeping each event that was its execution's latest then (one
look-up in the (execution_id, version) index per event), until a page is full; only the
first events of the rows kept have their JSON read. A page thus costs about the events
appended since its oldest row, whatever the size of the log.

Known limit: the flow and flow version are read from the first event's raw JSON, so a
change of ``ExecutionStarted``'s shape that an upcaster lifts must change this SQL too.

Known limit: a filter that few executions match walks further, up to the whole log when
fewer than a page match (some 40 ms per 400,000 events on a laptop). A projection rebuilt
from the log would bound it, should listings of rare statuses in huge logs need it.
"""

from __future__ import annotations

from datetime import datetime

from ..state import Status, event_types_of, status_after
from . import MAX_POSITION, ExecutionSummary
from .rows import Query

_LISTING = (
    "SELECT e.execution_id, json_extract(s.data, '$.flow'),"
    " coalesce(json_extract(s.data, '$.flow_version'), 1), e.type, e.version, s.at, e.at,"
    " e.position FROM events e"
    " JOIN events s ON s.execution_id = e.execution_id AND s.version = 1"
    " WHERE e.position < ? AND e.position <= ? {status}"
    " AND NOT EXISTS (SELECT 1 FROM events n"
    " WHERE n.execution_id = e.execution_id AND n.version = e.version + 1 AND n.position <= ?)"
    " AND (? IS NULL OR json_extract(s.data, '$.flow') = ?)"
    " ORDER BY e.position DESC LIMIT ?"
)

_END = MAX_POSITION
"""A position past every event: where the first page starts."""


async def list_executions(
    query: Query,
    flow: str | None,
    status: Status | None,
    limit: int,
    before_position: int | None,
    as_of_position: int | None = None,
) -> list[ExecutionSummary]:
    """At most ``limit`` executions whose latest event as of ``as_of_position`` lies before
    ``before_position``, newest first, of ``flow`` and in ``status`` when given."""
    types = event_types_of(status) if status is not None else ()
    where = f"AND e.type IN ({','.join('?' * len(types))})" if types else ""
    before = before_position if before_position is not None else _END
    as_of = as_of_position if as_of_position is not None else _END

    # LIMIT -1 means no limit to SQLite: a limit below one lists nothing instead.
    params = (before, as_of, *types, as_of, flow, flow, max(limit, 0))
    rows = await query(_LISTING.format(status=where), params)
    return [_summary(*row) for row in rows]


def _summary(
    execution_id: str,
    flow: str,
    flow_version: int,
    latest_type: str,
    version: int,
    started_at: str,
    updated_at: str,
    position: int,
) -> ExecutionSummary:
    """A listing row from the columns of ``_LISTING``."""
    return ExecutionSummary(
        execution_id=execution_id,
        flow=flow,
        flow_version=flow_version,
        status=status_after(latest_type),
        version=version,
        started_at=datetime.fromisoformat(started_at),
        updated_at=datetime.fromisoformat(updated_at),
        position=position,
    )
