"""Hot executions: executions at a pause, kept in memory with their flow code waiting there.

A resume of a hot execution reads nothing and replays nothing: its history, its folded
state and its flow coroutine, suspended at the pause, are at hand. The cache is bounded
(the least recently used execution leaves first) and is never the truth. An entry leaves
whenever anything but its own flow appends to its execution (a timer, a cancel), and an
entry that another engine overtook is found out by the log's version check on the next
append, after which the command runs again from the log.

A hot flow holds whatever its code holds across the pause (an open connection, a lock) for
as long as it stays hot, where a cold one would have let it go at the pause. Its code may
not go on by itself meanwhile: an operation it issues, or its own timer ending the wait,
ends the runner (``Runner.check_open``, ``Runner.suspend``).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .context import Suspended
from .events import StoredEvent
from .runtime import Runner
from .state import ExecutionState

logger = logging.getLogger(__name__)

DEFAULT_CAPACITY = 4096
"""Executions kept hot by default: about 4 KB each for a small flow (16 MB in all)."""


@dataclass(slots=True, frozen=True)
class Hot:
    """An execution at a pause, ready to be answered."""

    runner: Runner
    """The flow coroutine, suspended at the pause."""
    outcome: Suspended
    """The pause it waits at, with the type of the answer its code declared."""
    history: list[StoredEvent]
    """Its events, as appended."""
    state: ExecutionState
    """Their fold."""


class HotExecutions:
    """A bounded cache of hot executions, by execution ID.

    An entry is owned by the cache while it is in it: a command takes it out (holding the
    execution's lock), and puts the execution back only if it settles at a pause again.

    Args:
        capacity: the most executions kept; 0 keeps none.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        self.capacity = capacity
        self._entries: OrderedDict[str, Hot] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def state(self, execution_id: str) -> ExecutionState | None:
        """The state of a hot execution, left in the cache; None if it is not hot."""
        hot = self._entries.get(execution_id)
        return hot.state if hot is not None else None

    def take(self, execution_id: str) -> Hot | None:
        """Take a hot execution out of the cache, to answer it; None if it is not hot, or if
        its flow code no longer waits at the pause (it then runs again from the log)."""
        hot = self._entries.pop(execution_id, None)
        if hot is not None and not hot.runner.waiting:
            hot.runner.abandon()
            logger.debug("execution %s stopped waiting while hot; it is read again", execution_id)
            return None
        return hot

    def keep(self, hot: Hot) -> None:
        """Keep an execution that settled at a pause; the least recently used one leaves
        if the cache is full."""
        execution_id = hot.state.execution_id
        self.drop(execution_id)
        if self.capacity <= 0:
            hot.runner.abandon()
            return

        self._entries[execution_id] = hot
        while len(self._entries) > self.capacity:
            _, evicted = self._entries.popitem(last=False)
            evicted.runner.abandon()

    def drop(self, execution_id: str) -> None:
        """Forget an execution, because something else changed it or it must be re-read."""
        hot = self._entries.pop(execution_id, None)
        if hot is not None:
            hot.runner.abandon()
            logger.debug("execution %s is no longer hot", execution_id)

    def drop_if_behind(self, execution_id: str, version: int) -> None:
        """Forget an execution the log holds a later event of than its entry has: another
        engine on the same log moved it on."""
        hot = self._entries.get(execution_id)
        if hot is not None and hot.state.version < version:
            self.drop(execution_id)

    def drop_where(self, concerns: Callable[[str], bool]) -> None:
        """Forget every execution ``concerns`` is true of (a partition another engine holds
        now, which may move it on)."""
        for execution_id in [e for e in self._entries if concerns(e)]:
            self.drop(execution_id)

    def close(self) -> None:
        """Forget every execution, and keep none from now on: the engine stops, and a command
        still in flight lets its flow go when it settles."""
        self.capacity = 0
        while self._entries:
            _, hot = self._entries.popitem()
            hot.runner.abandon()
