"""Appends to the JetStream log: each one atomic batch, judged by the execution's head.

An append is one atomic batch (nats-server 2.12 or later, ``allow_atomic``): the claims of
its scopes, then its events. Its first event carries ``Nats-Expected-Last-Subject-Sequence``
(the sequence of the execution's latest event, 0 for a new one): the version check. Each
claim expects its subject to be empty: a scope is claimed once, in the same step as the
events that claim it, so no crash can leave an event without its claim or the reverse.
(The issue proposed a key-value bucket for the claims; a bucket is another stream, which
an atomic batch cannot reach.) Either the whole batch is stored or none of it.

Every event carries its execution's origin (``jetstream_layout.Origin``): the first
append takes it from its ``ExecutionStarted``, later ones from the head they follow.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import msgspec
from msgspec.structs import replace

from ..errors import DuplicateCommand, EvflowError, StoreError, Unavailable
from ..events import StoredEvent
from . import check_append, version_clash
from .jetstream_layout import Claim, Entry, Layout, Origin, chained, decode_entry, origin_of
from .jetstream_requests import CATCH_UP, StreamRequests, atomic_batch, encode

_EMPTY = {"Nats-Expected-Last-Subject-Sequence": "0"}
"""A claim's header: its subject must hold nothing yet (the scope is unclaimed)."""
_INFLIGHT = 32
"""Appends published at once: the server bounds the atomic batches in flight per stream."""
_HEADS = 65_536
"""Execution heads remembered, so an append need not read its execution's latest event."""


class Head(msgspec.Struct, frozen=True):
    """Where an execution stands: its latest version, that event's hash and sequence, and
    the execution's origin."""

    version: int
    hash: str | None
    sequence: int
    origin: Origin | None = None


_NO_HEAD = Head(0, None, 0)


class Appender:
    """Appends to one log's stream, remembering the heads they leave.

    Args:
        layout: the stream's subjects.
    """

    def __init__(self, layout: Layout):
        self.layout = layout
        self._heads: OrderedDict[str, Head] = OrderedDict()
        self._inflight = asyncio.Semaphore(_INFLIGHT)

    def forget(self) -> None:
        """Drop the heads remembered (the log was written some other way: an import)."""
        self._heads.clear()

    async def append(
        self,
        wire: StreamRequests,
        execution_id: str,
        expected_version: int,
        events: Sequence[StoredEvent],
    ) -> list[StoredEvent]:
        """Durably append ``events`` after ``expected_version``; see ``EventStore``."""
        check_append(execution_id, expected_version, events)
        subject = self.layout.execution(execution_id)
        head = await self._head(wire, execution_id, expected_version)
        if head.version != expected_version:
            raise version_clash(execution_id, head.version, expected_version)

        origin = head.origin if expected_version else origin_of(events[0])
        entries = chained(events, head.hash, origin)
        claims = [(entry.scope, item) for entry, item in zip(entries, events, strict=True)]
        claims = [(scope, item) for scope, item in claims if scope is not None]
        messages = [
            (self.layout.claim(scope), encode(Claim(execution_id, item.version)), _EMPTY)
            for scope, item in claims
        ]
        for index, entry in enumerate(entries):
            headers = {"Nats-Msg-Id": f"{execution_id}:{entry.version}"}
            if index == 0:
                headers["Nats-Expected-Last-Subject-Sequence"] = str(head.sequence)
            messages.append((subject, encode(entry), headers))

        try:
            async with self._inflight:
                ack = await atomic_batch(wire.nc, messages, wire.timeout, wire.stream)
        except Unavailable as unanswered:
            landed = await self._landed(wire, execution_id, expected_version, entries, unanswered)
            ack = {"seq": landed}
        if "error" in ack:
            self._heads.pop(execution_id, None)
            raise await self._refusal(wire, execution_id, expected_version, claims, ack["error"])

        last, first = ack["seq"], ack["seq"] - len(entries) + 1  # the events end the batch
        stored = [
            replace(item, position=first + offset, prev_hash=entry.prev_hash, hash=entry.hash)
            for offset, (item, entry) in enumerate(zip(events, entries, strict=True))
        ]
        self._remember(execution_id, Head(stored[-1].version, stored[-1].hash, last, origin))
        return stored

    async def _landed(
        self,
        wire: StreamRequests,
        execution_id: str,
        expected: int,
        entries: list[Entry],
        unanswered: Unavailable,
    ) -> int:
        """The sequence of an append's last event when JetStream stored it but its answer
        was lost (a node restarting): the leader's head for the execution is that event.
        Asked a few times, as an election may be under way. Otherwise the append is
        refused as the log shows it: moved on by another writer, or still not stored (then
        ``unanswered`` is raised, which says it may yet land: read the execution again)."""
        self._heads.pop(execution_id, None)
        for delay in CATCH_UP:
            await asyncio.sleep(delay)
            try:
                head = await self.read_head(wire, execution_id)
            except Unavailable:
                continue
            if head.hash == entries[-1].hash:
                return head.sequence
            if head.version != expected:
                raise version_clash(execution_id, head.version, expected)
        raise unanswered

    async def _head(self, wire: StreamRequests, execution_id: str, expected_version: int) -> Head:
        """The head an append is judged against: the one remembered if it agrees, else the
        execution's latest event, read."""
        if expected_version == 0 and execution_id not in self._heads:
            return _NO_HEAD
        known = self._heads.get(execution_id)
        if known is not None and known.version == expected_version:
            return known
        return await self.read_head(wire, execution_id)

    async def read_head(self, wire: StreamRequests, execution_id: str) -> Head:
        """The execution's latest event, as the stream's leader holds it."""
        found = await wire.leader_last(self.layout.execution(execution_id))
        if found is None:
            return _NO_HEAD
        entry = decode_entry(found.data)
        return Head(entry.version, entry.hash, found.sequence, entry.origin)

    def _remember(self, execution_id: str, head: Head) -> None:
        self._heads[execution_id] = head
        self._heads.move_to_end(execution_id)
        if len(self._heads) > _HEADS:
            self._heads.popitem(last=False)

    async def _refusal(
        self,
        wire: StreamRequests,
        execution_id: str,
        expected_version: int,
        claims: list[tuple[Any, StoredEvent]],
        error: dict[str, Any],
    ) -> EvflowError:
        """Why JetStream refused an append: the version moved on (also when another engine
        appends the same version at that moment: its message IDs are then in process), or a
        scope was claimed, or else what JetStream said."""
        head = await self.read_head(wire, execution_id)
        if head.version != expected_version:
            return version_clash(execution_id, head.version, expected_version)
        for scope, item in claims:
            if await wire.leader_last(self.layout.claim(scope)) is not None:
                return DuplicateCommand(
                    f"idempotency scope {scope} was already claimed",
                    execution_id=item.execution_id,
                    scope=scope,
                )
        return StoreError(
            f"JetStream refused an append to execution {execution_id} "
            f"({error.get('description')}) though its version and scopes are free; "
            "nothing was appended: try again",
            execution_id=execution_id,
        )
