"""The log on NATS JetStream: one replicated stream, for several engines on a NATS cluster.

Selected with ``--store jetstream`` or ``nats://HOST:PORT,...`` (``store.open_store``). It
passes the store contract on one nats-server and runs engines on a three-node cluster in
the tests. TODO(#7): the start-up scans and the listing read the whole log (see ``_ends``).

Layout, in the stream ``EVFLOW_LOG`` (file storage, replicas configurable):

- ``evflow.log.ex.<execution_id>``: the execution's events, one message each, in version
  order. A message's stream sequence is the event's position in the log.
- ``evflow.log.key.<sha256 of scope>``: an idempotency scope's claim, naming the execution
  and version of the event that claimed it.
- ``evflow.log.gap``: empty messages that keep an import's positions where its source had
  none (see ``import_records``).

An append is one atomic batch (nats-server 2.12 or later, ``allow_atomic``): the claims of
its scopes, then its events. Its first event carries ``Nats-Expected-Last-Subject-Sequence``
(the sequence of the execution's latest event, 0 for a new one): the version check. Each
claim expects its subject to be empty: a scope is claimed once, in the same step as the
events that claim it, so no crash can leave an event without its claim or the reverse.
(The issue proposed a key-value bucket for the claims; a bucket is another stream, which
an atomic batch cannot reach.) Either the whole batch is stored or none of it.

The message body is the event as the SQLite log stores it, with its hash chain: an
export of either log is verified the same way. Reads use direct gets (``allow_direct``),
which any replica answers, in batches; what a read must reach (an execution's latest
event, the log's last position, a claim) is asked of the stream's leader first, and a
replica still catching up is read again until it has it.

Checkpoints live in the key-value bucket ``EVFLOW_CHECKPOINTS``; a save moves one forward
by compare-and-set, so two engines never move it back.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Collection, Sequence
from typing import Any

import msgspec
import nats
from msgspec import Raw
from msgspec.structs import replace
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from ..chain import Record
from ..errors import DuplicateCommand, EvflowError, StoreError, Unavailable
from ..events import SETTLING, ExecutionStarted, StoredEvent
from ..partitions import partition_of
from ..state import Status, status_after
from ..subjects import token
from ..timers import Timer, pending_timer
from . import ExecutionSummary, check_append, version_clash
from .jetstream_requests import (
    DIRECT_BATCH,
    StreamRequests,
    atomic_batch,
    bucket_if_any,
    encode,
    sequence_of,
    stored_at,
)
from .rows import chained_row, record, stored_event

logger = logging.getLogger(__name__)

_EMPTY = {"Nats-Expected-Last-Subject-Sequence": "0"}
"""A claim's header: its subject must hold nothing yet (the scope is unclaimed)."""
_CATCH_UP = (0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
"""Seconds between reads of an execution a replica answered from behind this store's own
appends."""
_INFLIGHT = 32
"""Appends published at once: the server bounds the atomic batches in flight per stream."""
_HEADS = 65_536
"""Execution heads remembered, so an append need not read its execution's latest event."""


class _Entry(msgspec.Struct, array_like=True, frozen=True):
    """An event's message body: the columns the SQLite log stores for it."""

    execution_id: str
    version: int
    type: str
    schema_version: int
    at: str
    data: Raw
    prev_hash: str | None
    hash: str | None
    scope: str | None


class _Claim(msgspec.Struct, frozen=True):
    """A scope claim's message body: which event claimed it."""

    execution_id: str
    version: int


class _Head(msgspec.Struct, frozen=True):
    """Where an execution stands: its latest version, that event's hash and sequence."""

    version: int
    hash: str | None
    sequence: int


_NO_HEAD = _Head(0, None, 0)
_decode_entry = msgspec.json.Decoder(_Entry).decode
_decode_claim = msgspec.json.Decoder(_Claim).decode


class JetStreamStore:
    """The log in a JetStream stream; see the module's docstring.

    Args:
        servers: NATS URLs (several for a cluster: the client fails over between them).
        replicas: copies JetStream keeps of the stream and the checkpoint bucket.
        timeout: seconds to wait for JetStream to answer one request.
        name: the log's name: ``EVFLOW`` gives the stream ``EVFLOW_LOG``, its subjects
            ``evflow.log.>`` and the bucket ``EVFLOW_CHECKPOINTS``; another name gives a
            separate log on the same servers.
    """

    def __init__(
        self,
        servers: str | list[str],
        replicas: int = 1,
        timeout: float = 5.0,
        name: str = "EVFLOW",
        read_only: bool = False,
    ):
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        self.replicas = replicas
        self.timeout = timeout
        self.read_only = read_only
        self.stream = f"{token(name, 'log name')}_LOG"
        self.bucket = f"{name}_CHECKPOINTS"
        self.leases = f"{name}_LEASES"
        """The key-value bucket where engines sharing this log keep partition leases."""
        self._events = f"{name.lower()}.log.ex"
        self._claims = f"{name.lower()}.log.key"
        self._gaps = f"{name.lower()}.log.gap"
        self._nc: NATS | None = None
        self._kv: Any = None
        self._heads: OrderedDict[str, _Head] = OrderedDict()
        self._inflight = asyncio.Semaphore(_INFLIGHT)
        self._appending = 0  # appends under way, which close lets finish
        self._finished = asyncio.Event()
        self._closing = False

    async def open(self) -> None:
        """Connect, and create the stream and the checkpoint bucket if they are missing."""
        self._closing = False
        try:
            self._nc = await nats.connect(servers=self.servers, max_reconnect_attempts=-1)
        except Exception as error:
            raise StoreError(
                f"cannot reach NATS at {', '.join(self.servers)} for the JetStream log "
                f"({error}); start nats-server with -js, or check the URL"
            ) from error
        js = self._nc.jetstream(timeout=self.timeout)
        if self.read_only:
            await self._find_stream()
            self._kv = await bucket_if_any(js, self.bucket)
        else:
            await self._ensure_stream()
            self._kv = await js.create_key_value(
                bucket=self.bucket, history=1, replicas=self.replicas
            )
        logger.info(
            "opened the JetStream log %s on %s%s",
            self.stream,
            ", ".join(self.servers),
            " read-only" if self.read_only else "",
        )

    async def _find_stream(self) -> None:
        reply = await self._wire("asking JetStream").api(f"$JS.API.STREAM.INFO.{self.stream}", {})
        if "error" in reply:
            await self.close()
            raise StoreError(
                f"there is no JetStream log {self.stream} on {', '.join(self.servers)} "
                f"({reply['error'].get('description')}); check --store"
            )

    async def _ensure_stream(self) -> None:
        config = {
            "name": self.stream,
            "subjects": [f"{self._events}.*", f"{self._claims}.*", self._gaps],
            "storage": "file",
            "num_replicas": self.replicas,
            "allow_atomic": True,
            "allow_direct": True,
            "deny_delete": True,
            "deny_purge": True,
            "duplicate_window": 120_000_000_000,
        }
        create = f"$JS.API.STREAM.CREATE.{self.stream}"
        reply = await self._wire("creating the stream").api(create, config)
        error = reply.get("error")
        if error and error.get("err_code") != 10058:  # 10058: it exists, perhaps as configured
            refused = error.get("description")
            raise StoreError(
                f"JetStream refused to create the stream {self.stream} ({refused}); the "
                "server must be nats-server 2.12 or later with JetStream enabled"
            )

    @property
    def connection(self) -> NATS:
        """The connection to the log's NATS servers (engines keep their leases there)."""
        return self._connected("keeping leases")

    async def close(self) -> None:
        """Refuse new appends, let those under way finish, then disconnect."""
        if self._nc is None:
            return
        self._closing = True
        while self._appending:
            self._finished.clear()
            await self._finished.wait()
        nc, self._nc = self._nc, None
        await nc.drain()

    # appending

    async def append(
        self, execution_id: str, expected_version: int, events: Sequence[StoredEvent]
    ) -> list[StoredEvent]:
        """Durably append ``events`` after ``expected_version``; see ``EventStore``."""
        self._writable("appending")
        if self._closing:
            raise StoreError("the JetStream log is closing; open it again before appending")
        self._appending += 1
        try:
            return await self._append(execution_id, expected_version, events)
        finally:
            self._appending -= 1
            self._finished.set()

    async def _append(
        self, execution_id: str, expected_version: int, events: Sequence[StoredEvent]
    ) -> list[StoredEvent]:
        nc = self._connected("appending")
        check_append(execution_id, expected_version, events)
        subject = self._subject(execution_id)
        head = await self._head(execution_id, expected_version)
        if head.version != expected_version:
            raise version_clash(execution_id, head.version, expected_version)

        entries = _chained(events, head.hash)
        claims = [(entry.scope, item) for entry, item in zip(entries, events, strict=True)]
        claims = [(scope, item) for scope, item in claims if scope is not None]
        messages = [
            (self._claim_subject(scope), encode(_Claim(execution_id, item.version)), _EMPTY)
            for scope, item in claims
        ]
        for index, entry in enumerate(entries):
            headers = {"Nats-Msg-Id": f"{execution_id}:{entry.version}"}
            if index == 0:
                headers["Nats-Expected-Last-Subject-Sequence"] = str(head.sequence)
            messages.append((subject, encode(entry), headers))

        try:
            async with self._inflight:
                ack = await atomic_batch(nc, messages, self.timeout, self.stream)
        except Unavailable as unanswered:
            ack = {"seq": await self._landed(execution_id, expected_version, entries, unanswered)}
        if "error" in ack:
            self._heads.pop(execution_id, None)
            raise await self._refusal(execution_id, expected_version, claims, ack["error"])

        last, first = ack["seq"], ack["seq"] - len(entries) + 1  # the events end the batch
        stored = [
            replace(item, position=first + offset, prev_hash=entry.prev_hash, hash=entry.hash)
            for offset, (item, entry) in enumerate(zip(events, entries, strict=True))
        ]
        self._remember(execution_id, _Head(stored[-1].version, stored[-1].hash, last))
        return stored

    async def _landed(
        self, execution_id: str, expected: int, entries: list[_Entry], unanswered: Unavailable
    ) -> int:
        """The sequence of an append's last event when JetStream stored it but its answer
        was lost (a node restarting): the leader's head for the execution is that event.
        Asked a few times, as an election may be under way. Otherwise the append is
        refused as the log shows it: moved on by another writer, or still not stored (then
        ``unanswered`` is raised, which says it may yet land: read the execution again)."""
        self._heads.pop(execution_id, None)
        for delay in _CATCH_UP:
            await asyncio.sleep(delay)
            try:
                head = await self._read_head(execution_id)
            except Unavailable:
                continue
            if head.hash == entries[-1].hash:
                return head.sequence
            if head.version != expected:
                raise version_clash(execution_id, head.version, expected)
        raise unanswered

    async def _head(self, execution_id: str, expected_version: int) -> _Head:
        """The head an append is judged against: the one remembered if it agrees, else the
        execution's latest event, read."""
        if expected_version == 0:
            return (
                _NO_HEAD if execution_id not in self._heads else await self._read_head(execution_id)
            )
        known = self._heads.get(execution_id)
        if known is not None and known.version == expected_version:
            return known
        return await self._read_head(execution_id)

    async def _read_head(self, execution_id: str) -> _Head:
        """The execution's latest event, as the stream's leader holds it."""
        found = await self._wire("reading").leader_last(self._subject(execution_id))
        if found is None:
            return _NO_HEAD
        sequence, data = found
        entry = _decode_entry(data)
        return _Head(entry.version, entry.hash, sequence)

    def _remember(self, execution_id: str, head: _Head) -> None:
        self._heads[execution_id] = head
        self._heads.move_to_end(execution_id)
        if len(self._heads) > _HEADS:
            self._heads.popitem(last=False)

    async def _refusal(
        self,
        execution_id: str,
        expected_version: int,
        claims: list[tuple[Any, StoredEvent]],
        error: dict[str, Any],
    ) -> EvflowError:
        """Why JetStream refused an append: the version moved on (also when another engine
        appends the same version at that moment: its message IDs are then in process), or a
        scope was claimed, or else what JetStream said."""
        head = await self._read_head(execution_id)
        if head.version != expected_version:
            return version_clash(execution_id, head.version, expected_version)
        for scope, item in claims:
            if await self.find_command(scope) is not None:
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

    # reading

    async def read(self, execution_id: str, to_version: int | None = None) -> list[StoredEvent]:
        """One execution's events in version order, up to ``to_version`` if given.

        The events come by direct gets, which any replica answers, and one catching up (a
        node back from a restart) may not hold the latest yet: the stream's leader says
        which version is the latest, and the read is made again until it reaches it. A
        decision taken on a read (a step about to run, a command judged) thus never rests
        on a replica that is behind.
        """
        subject = self._subject(execution_id)
        want = (await self._read_head(execution_id)).version
        if to_version is not None:
            want = min(want, to_version)
        for delay in _CATCH_UP:
            found = await self._wire("reading").direct_all(subject, 1, to_version)
            events = [_stored(msg) for msg in found]
            if (events[-1].version if events else 0) >= want:
                return events
            await asyncio.sleep(delay)
        raise Unavailable(
            f"execution {execution_id}: the JetStream replicas answering reads stay behind "
            f"its version {want}; try again when the cluster has caught up",
            execution_id=execution_id,
        )

    async def read_many(self, execution_ids: Sequence[str]) -> dict[str, list[StoredEvent]]:
        """Several executions' events at once; see ``EventStore``."""
        found = {}
        for execution_id in dict.fromkeys(execution_ids):
            events = await self.read(execution_id)
            if events:
                found[execution_id] = events
        return found

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """Events of all executions in global order, after ``after_position``."""
        wire = self._wire("reading")
        messages = await wire.direct_all(f"{self._events}.*", after_position + 1, limit)
        return [_stored(msg) for msg in messages]

    async def records(
        self, after_position: int = 0, limit: int = 1000, execution_id: str | None = None
    ) -> list[Record]:
        """Events exactly as stored, in log order; see ``EventStore``."""
        subject = self._subject(execution_id) if execution_id is not None else f"{self._events}.*"
        messages = await self._wire("reading").direct_all(subject, after_position + 1, limit)
        return [_record(msg) for msg in messages]

    async def is_empty(self) -> bool:
        """True when the log holds no event."""
        return await self.last_position() == 0

    async def last_position(self) -> int:
        """The position of the latest event in the log (as its leader holds it); 0 when it
        is empty."""
        found = await self._wire("reading").leader_last(f"{self._events}.*")
        return 0 if found is None else found[0]

    async def find_command(self, scope: str) -> StoredEvent | None:
        """The event that claimed an idempotency scope, if any."""
        found = await self._wire("reading").leader_last(self._claim_subject(scope))
        if found is None:
            return None
        claim = _decode_claim(found[1])
        events = await self.read(claim.execution_id, claim.version)
        return events[-1] if events and events[-1].version == claim.version else None

    # checkpoints

    async def load_checkpoint(self, name: str) -> int:
        """The position checkpoint ``name`` was saved at, 0 if never; see ``EventStore``."""
        self._connected("loading a checkpoint")
        if self._kv is None:
            return 0
        try:
            entry = await self._kv.get(name)
        except KeyNotFoundError:
            return 0
        return int(entry.value or b"0")

    async def save_checkpoint(self, name: str, position: int) -> None:
        """Move checkpoint ``name`` forward to ``position``, never back (compare-and-set)."""
        self._writable("saving a checkpoint")
        self._connected("saving a checkpoint")
        while True:
            try:
                entry = await self._kv.get(name)
            except KeyNotFoundError:
                try:
                    await self._kv.create(name, str(position).encode())
                    return
                except KeyWrongLastSequenceError:
                    continue  # another engine created it first: judge against its value
            if int(entry.value or b"0") >= position:
                return
            try:
                await self._kv.update(name, str(position).encode(), last=entry.revision)
                return
            except KeyWrongLastSequenceError:
                continue

    # scans: start-up and listing

    async def unsettled(self, partitions: Collection[int] | None = None) -> list[str]:
        """Executions whose last event leaves them running, in the order of those events."""
        ends = await self._ends(None, partitions)
        latest = sorted(ends.values(), key=lambda end: end[1].position)
        return [last.execution_id for _, last in latest if not isinstance(last.event, SETTLING)]

    async def pending_timers(self, partitions: Collection[int] | None = None) -> list[Timer]:
        """The timer of every execution whose latest event starts one; see ``EventStore``."""
        timers = []
        for first, last in (await self._ends(None, partitions)).values():
            assert isinstance(first.event, ExecutionStarted)
            timer = pending_timer(first.event.flow, last)
            if timer is not None:
                timers.append(timer)
        return timers

    async def list_executions(
        self,
        flow: str | None = None,
        status: Status | None = None,
        limit: int = 100,
        before_position: int | None = None,
        as_of_position: int | None = None,
    ) -> list[ExecutionSummary]:
        """Executions as the log stood at ``as_of_position``, newest change first; see
        ``EventStore``."""
        rows = [
            _summary(first, last)
            for first, last in (await self._ends(as_of_position)).values()
            if before_position is None or last.position < before_position
        ]
        rows = [
            row
            for row in rows
            if (flow is None or row.flow == flow) and (status is None or row.status is status)
        ]
        rows.sort(key=lambda row: row.position, reverse=True)
        return rows[: max(limit, 0)]

    async def _ends(
        self, as_of_position: int | None, partitions: Collection[int] | None = None
    ) -> dict[str, tuple[StoredEvent, StoredEvent]]:
        """Each execution's first and latest events, as of a position (the end if None), of
        the executions in ``partitions`` if given.

        Known limit: this reads the whole log, a page at a time, so start-up and each
        listing cost time in proportion to the log's size; a projection kept in a
        key-value bucket, rebuilt from the log, would bound it (issue 7).
        """
        ends: dict[str, tuple[StoredEvent, StoredEvent]] = {}
        end = await self.last_position()  # the leader's: a replica behind is read again
        if as_of_position is not None:
            end = min(end, as_of_position)
        after = 0
        for delay in (0.0, *_CATCH_UP):
            await asyncio.sleep(delay)
            while after < end:
                page = await self.read_all(after, DIRECT_BATCH * 4)
                for stored in page:
                    if stored.position > end:
                        return ends
                    if partitions is not None and partition_of(stored.execution_id) not in (
                        partitions
                    ):
                        continue
                    first = ends.get(stored.execution_id, (stored, stored))[0]
                    ends[stored.execution_id] = (first, stored)
                if not page:
                    break
                after = page[-1].position
            if after >= end:
                return ends
        raise Unavailable(
            f"the JetStream replicas answering reads of {self.stream} stay behind position "
            f"{end}; try again when the cluster has caught up"
        )

    # import

    async def import_records(self, records: Sequence[Record]) -> None:
        """Write exported records into this empty log, positions and hashes kept.

        Each record is stored at its position: a position the source skipped (a claim in a
        JetStream source) is filled by a message on the gap subject. The claims of the
        records' scopes follow the last record. Each message expects the stream's last
        sequence to be the one before it, so nothing else can slip in between.

        Known limit: unlike SQLite's, this import is not one transaction. A failure part
        way leaves a partial log; remove the stream (``nats stream rm``) and import again.
        """
        self._writable("importing")
        nc = self._connected("importing")
        if await self._stream_last() != 0:
            raise StoreError(
                f"the JetStream log {self.stream} is not empty; import only into a new log"
            )
        js = nc.jetstream(timeout=self.timeout)
        last = 0
        for item in records:
            if item.position <= last:
                raise StoreError(
                    f"record of execution {item.execution_id} version {item.version} is at "
                    f"position {item.position}, not after {last}: import records in log order",
                    execution_id=item.execution_id,
                )
            while last + 1 < item.position:
                last = await stored_at(js, self._gaps, b"", last)
            entry = _Entry(
                item.execution_id, item.version, item.type, item.schema_version, item.at,
                item.data, item.prev_hash, item.hash, item.scope,
            )  # fmt: skip
            last = await stored_at(js, self._subject(item.execution_id), encode(entry), last)
        for item in records:
            if item.scope is not None:
                claim = encode(_Claim(item.execution_id, item.version))
                await stored_at(js, self._claim_subject(item.scope), claim, None)
        self._heads.clear()

    async def _stream_last(self) -> int:
        reply = await self._wire("asking JetStream").api(f"$JS.API.STREAM.INFO.{self.stream}", {})
        return int(reply.get("state", {}).get("last_seq", 0))

    # NATS requests

    def _subject(self, execution_id: str) -> str:
        """The subject of an execution's events."""
        try:
            return f"{self._events}.{token(execution_id, 'execution_id')}"
        except EvflowError as error:
            raise StoreError(error.message, execution_id=execution_id) from None

    def _claim_subject(self, scope: str) -> str:
        """The subject of a scope's claim: any scope text becomes one token."""
        return f"{self._claims}.{hashlib.sha256(scope.encode()).hexdigest()}"

    def _writable(self, doing: str) -> None:
        if self.read_only:
            raise StoreError(
                f"the JetStream log {self.stream} was opened read-only; {doing} is refused"
            )

    def _connected(self, doing: str) -> NATS:
        if self._nc is None or self._nc.is_closed:
            raise StoreError(f"the JetStream log is closed; open it before {doing}")
        return self._nc

    def _wire(self, doing: str) -> StreamRequests:
        """Requests about the log's stream, on the open connection."""
        return StreamRequests(self._connected(doing), self.stream, self.timeout)


def _stored(msg: Msg) -> StoredEvent:
    entry = _decode_entry(msg.data)
    return stored_event(
        sequence_of(msg), entry.execution_id, entry.version, entry.type, entry.schema_version,
        entry.at, bytes(entry.data).decode(), entry.prev_hash, entry.hash,
    )  # fmt: skip


def _record(msg: Msg) -> Record:
    entry = _decode_entry(msg.data)
    return record(
        sequence_of(msg), entry.execution_id, entry.version, entry.type, entry.schema_version,
        entry.at, bytes(entry.data).decode(), entry.prev_hash, entry.hash, entry.scope,
    )  # fmt: skip


def _chained(events: Sequence[StoredEvent], prev_hash: str | None) -> list[_Entry]:
    """The message bodies of an append's events, each hash chained to the one before."""
    entries = []
    for item in events:
        values = chained_row(item, prev_hash)  # the SQLite log's columns, in its order
        entry = _Entry(*values[:5], Raw(values[5]), *values[6:])  # type: ignore[arg-type]
        entries.append(entry)
        prev_hash = entry.hash
    return entries


def _summary(first: StoredEvent, last: StoredEvent) -> ExecutionSummary:
    """A listing row from an execution's first and latest events."""
    started = first.event
    assert isinstance(started, ExecutionStarted)
    return ExecutionSummary(
        execution_id=first.execution_id,
        flow=started.flow,
        flow_version=started.flow_version,
        status=status_after(type(last.event).__name__),
        version=last.version,
        started_at=first.at,
        updated_at=last.at,
        position=last.position,
    )
