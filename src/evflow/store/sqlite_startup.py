"""The scans an engine makes of the SQLite log when it starts: executions a crash left
running, and the timers still pending."""

from __future__ import annotations

from datetime import datetime

from ..events import SETTLING
from ..timers import Timer
from .rows import Query

_SETTLING_TYPES = tuple(cls.__name__ for cls in SETTLING)


async def unsettled(query: Query) -> list[str]:
    """Executions whose last event leaves them running.

    This scans the latest event of every execution: start-up cost grows with the number
    of executions in the log (to be bounded by issue 6).
    """
    marks = ",".join("?" * len(_SETTLING_TYPES))
    rows = await query(
        "SELECT e.execution_id FROM events e"
        " JOIN (SELECT execution_id, max(version) AS v FROM events GROUP BY execution_id) m"
        " ON e.execution_id = m.execution_id AND e.version = m.v"
        f" WHERE e.type NOT IN ({marks}) ORDER BY e.position",
        _SETTLING_TYPES,
    )
    return [row[0] for row in rows]


async def pending_timers(query: Query) -> list[Timer]:
    """The timers of executions whose latest event starts one; see ``EventStore``.

    Like ``unsettled``, this scans the latest event of every execution once, at start.
    Only the fields a timer needs are read, so a hundred thousand of them load in well
    under a second and leave little garbage behind.
    """
    rows = await query(
        "SELECT e.execution_id, e.version, e.type, json_extract(e.data, '$.sequence'),"
        " coalesce(json_extract(e.data, '$.wake_at'), json_extract(e.data, '$.deadline')),"
        " json_extract(s.data, '$.flow')"
        " FROM events e"
        " JOIN (SELECT execution_id, max(version) AS v FROM events GROUP BY execution_id) m"
        " ON e.execution_id = m.execution_id AND e.version = m.v"
        " JOIN events s ON s.execution_id = e.execution_id AND s.version = 1"
        " WHERE e.type = 'TimerStarted' OR (e.type = 'ExecutionPaused'"
        " AND json_extract(e.data, '$.deadline') IS NOT NULL)",
    )
    flows: dict[str, str] = {}
    return [
        Timer(
            due=datetime.fromisoformat(due),
            execution_id=execution_id,
            flow=flows.setdefault(flow, flow),
            version=version,
            sequence=sequence,
            kind="wait" if kind == "TimerStarted" else "deadline",
        )
        for execution_id, version, kind, sequence, due, flow in rows
    ]
