"""Partitions: how the executions of one log are shared out among the engines serving it.

Every execution falls in one of ``PARTITIONS`` partitions, by a hash of its ID that never
changes. On a cluster each partition is held by one engine at a time (``leases``): that
engine runs the partition's commands, fires its timers and drives on what a crash left
running, so no two live engines drive one execution at once. An engine alone on its log
holds them all.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection

from .events import new_execution_id

PARTITIONS = 32
"""Partitions of a log. Fixed: an execution's partition is part of how the log is read, so
changing it needs every engine stopped. Known limit: at most this many engines share work."""


def partition_of(execution_id: str) -> int:
    """The partition an execution falls in: the same for every engine and every release."""
    return zlib.crc32(execution_id.encode("utf-8", "surrogatepass")) % PARTITIONS


def new_execution_id_in(partitions: Collection[int]) -> str:
    """A new execution ID (``events.new_execution_id``) that falls in one of ``partitions``,
    so the engine that makes it may run it. About ``PARTITIONS / len(partitions)`` tries."""
    if not partitions:
        raise ValueError("an execution ID needs at least one partition to fall in")
    while True:
        execution_id = new_execution_id()
        if partition_of(execution_id) in partitions:
            return execution_id
