"""The log on NATS JetStream: one replicated stream, for several engines on a NATS cluster.

Selected with ``--store jetstream`` or ``nats://HOST:PORT,...`` (``store.open_store``). It
passes the store contract on one nats-server and runs engines on a three-node cluster in
the tests.

The log is the stream ``EVFLOW_LOG`` (file storage, replicas configurable), its subjects
and message bodies laid out as ``jetstream_layout`` says: each execution's events on a
subject of their own, under their partition's. Appends are atomic batches judged by the
execution's latest event (``jetstream_appends``). The start-up scans and the listing read
each execution's latest event only, a partition at a time (``jetstream_scans``).

Reads use direct gets (``allow_direct``), which any replica answers, in batches; what a
read must reach (an execution's latest event, the log's last position, a claim) is asked
of the stream's leader first, and a replica still catching up is read again until it has
it.

Checkpoints live in the key-value bucket ``EVFLOW_CHECKPOINTS``; a save moves one forward
by compare-and-set, so two engines never move it back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Sequence
from contextlib import suppress
from typing import Any

from nats.aio.client import Client as NATS
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from ..chain import Record
from ..connection import connect
from ..errors import StoreError, Unavailable
from ..events import StoredEvent
from ..state import Status
from ..subjects import token
from ..timers import Timer
from . import ExecutionSummary, jetstream_scans
from .jetstream_appends import Appender
from .jetstream_layout import (
    Claim,
    Layout,
    Origin,
    as_record,
    decode_claim,
    first_origin,
    imported,
    stored,
)
from .jetstream_requests import (
    CATCH_UP,
    StreamRequests,
    bucket_if_any,
    encode,
    refusal_may_pass,
    stored_at,
)

logger = logging.getLogger(__name__)

_REPLICAS_NOT_SUPPORTED = 10074
"""JetStream's error code for replicas asked of a server that is not in a cluster."""


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
        self._layout = Layout(name)
        self._appender = Appender(self._layout)
        self._nc: NATS | None = None
        self._kv: Any = None
        self._appending = 0  # appends under way, which close lets finish
        self._finished = asyncio.Event()
        self._closing = False

    async def open(self) -> None:
        """Connect, and create the stream and the checkpoint bucket if they are missing.

        Raises ``Unavailable`` when NATS or JetStream does not answer; an open that failed
        so may be called again."""
        self._closing = False
        if self._nc is None or self._nc.is_closed:
            hint = "start nats-server with -js, or check the URL"
            self._nc = await connect(
                ",".join(self.servers), timeout=self.timeout, hint=hint, name="evflow-log"
            )
        js = self._nc.jetstream(timeout=self.timeout)
        try:
            if not self.read_only:
                await self._create_stream()
            await self._check_stream()
        except (StoreError, Unavailable):
            await self.close()
            raise
        if self.read_only:
            self._kv = await bucket_if_any(js, self.bucket)
        else:
            self._kv = await js.create_key_value(
                bucket=self.bucket, history=1, replicas=self.replicas
            )
        logger.info(
            "opened the JetStream log %s on %s%s",
            self.stream,
            ", ".join(self.servers),
            " read-only" if self.read_only else "",
        )

    async def _create_stream(self) -> None:
        config = {
            "name": self.stream,
            "subjects": self._layout.subjects(),
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
        if error and error.get("err_code") != 10058:  # 10058: it exists, checked next
            refused = error.get("description")
            if refusal_may_pass(error.get("code"), error.get("err_code")):
                raise Unavailable(
                    f"JetStream could not create the stream {self.stream} yet ({refused}); "
                    "the cluster is electing a leader or lacks a quorum: bring a majority "
                    "of its nodes up, and the start tries again within --startup-timeout"
                )
            if error.get("err_code") == _REPLICAS_NOT_SUPPORTED:
                raise StoreError(
                    f"JetStream refused to create the stream {self.stream} ({refused}): one "
                    f"nats-server keeps one copy; give --store 'jetstream?replicas=1', or run "
                    "a cluster of at least as many nodes as replicas"
                )
            raise StoreError(
                f"JetStream refused to create the stream {self.stream} ({refused}); the "
                "server must be nats-server 2.12 or later with JetStream enabled"
            )

    @property
    def connection(self) -> NATS:
        """The connection to the log's NATS servers (engines keep their leases there)."""
        return self._connected("keeping leases")

    async def _check_stream(self) -> None:
        """Refuse a stream that is missing, or laid out otherwise than this release reads."""
        info = f"$JS.API.STREAM.INFO.{self.stream}"
        reply = await self._wire("asking JetStream").api(info, {})
        if "error" in reply:
            raise StoreError(
                f"there is no JetStream log {self.stream} on {', '.join(self.servers)} "
                f"({reply['error'].get('description')}); check --store"
            )
        config = reply.get("config", {})
        subjects = config.get("subjects") or []
        if sorted(subjects) == sorted(self._layout.subjects()):
            self._check_replicas(config.get("num_replicas", 1))
            return
        earlier = self._layout.old_events in subjects
        raise StoreError(
            f"the JetStream log {self.stream} holds the subjects {', '.join(subjects)}, "
            f"not {', '.join(self._layout.subjects())}: "
            + ("an earlier evflow wrote it, before events were filed by partition" if earlier
               else "another evflow release, or something else, wrote it")
            + f". Export it with the release that wrote it (evflow export --store URL -o "
            f"FILE), remove the stream (nats stream rm {self.stream}), and import the export "
            "with this one (evflow import --store URL FILE)"
        )  # fmt: skip

    def _check_replicas(self, kept: int) -> None:
        """Refuse to write to a log that keeps another number of copies than asked: every
        engine on a log must agree on it, rather than the last one started deciding."""
        if self.read_only or kept == self.replicas:
            return
        raise StoreError(
            f"the JetStream log {self.stream} keeps {kept} copies, not the {self.replicas} "
            f"this store URL asks for; give every engine on it --store "
            f"'jetstream?replicas={kept}', or change the copies of the stream and its "
            f"buckets with nats stream edit first"
        )

    async def close(self) -> None:
        """Refuse new appends, let those under way finish, then disconnect."""
        if self._nc is None:
            return
        self._closing = True
        while self._appending:
            self._finished.clear()
            await self._finished.wait()
        nc, self._nc = self._nc, None
        try:
            await nc.drain()
        except Exception as error:  # NATS out of reach: nothing in flight can be drained
            logger.warning("the JetStream log's connection did not drain (%s); closing it", error)
            with suppress(OSError):  # nats-py flushes on close, which fails with NATS gone
                await nc.close()

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
            wire = self._wire("appending")
            return await self._appender.append(wire, execution_id, expected_version, events)
        finally:
            self._appending -= 1
            self._finished.set()

    # reading

    async def read(self, execution_id: str, to_version: int | None = None) -> list[StoredEvent]:
        """One execution's events in version order, up to ``to_version`` if given.

        The events come by direct gets, which any replica answers, and one catching up (a
        node back from a restart) may not hold the latest yet: the stream's leader says
        which version is the latest, and the read is made again until it reaches it. A
        decision taken on a read (a step about to run, a command judged) thus never rests
        on a replica that is behind.
        """
        wire = self._wire("reading")
        subject = self._layout.execution(execution_id)
        want = (await self._appender.read_head(wire, execution_id)).version
        if to_version is not None:
            want = min(want, to_version)
        for delay in CATCH_UP:
            events = [stored(msg) for msg in await wire.direct_all(subject, 1, to_version)]
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
        messages = await wire.direct_all(self._layout.events, after_position + 1, limit)
        return [stored(msg) for msg in messages]

    async def records(
        self, after_position: int = 0, limit: int = 1000, execution_id: str | None = None
    ) -> list[Record]:
        """Events exactly as stored, in log order; see ``EventStore``."""
        subject = (
            self._layout.execution(execution_id)
            if execution_id is not None
            else self._layout.events
        )
        messages = await self._wire("reading").direct_all(subject, after_position + 1, limit)
        return [as_record(msg) for msg in messages]

    async def is_empty(self) -> bool:
        """True when the log holds no event."""
        return await self.last_position() == 0

    async def last_position(self) -> int:
        """The position of the latest event in the log (as its leader holds it); 0 when it
        is empty."""
        found = await self._wire("reading").leader_last(self._layout.events)
        return 0 if found is None else found.sequence

    async def find_command(self, scope: str) -> StoredEvent | None:
        """The event that claimed an idempotency scope, if any."""
        found = await self._wire("reading").leader_last(self._layout.claim(scope))
        if found is None:
            return None
        claim = decode_claim(found.data)
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
        """Executions whose last event leaves them running, in the order of those events;
        of ``partitions`` only if given. Reads each execution's latest event only."""
        return await jetstream_scans.unsettled(self._wire("scanning"), self._layout, partitions)

    async def pending_timers(self, partitions: Collection[int] | None = None) -> list[Timer]:
        """The timer of every execution whose latest event starts one; see ``EventStore``.
        Reads each execution's latest event only."""
        wire = self._wire("scanning")
        return await jetstream_scans.pending_timers(wire, self._layout, partitions)

    async def list_executions(
        self,
        flow: str | None = None,
        status: Status | None = None,
        limit: int = 100,
        before_position: int | None = None,
        as_of_position: int | None = None,
    ) -> list[ExecutionSummary]:
        """Executions as the log stood at ``as_of_position``, newest change first; see
        ``EventStore`` and ``jetstream_scans.list_executions``."""
        return await jetstream_scans.list_executions(
            self._wire("listing"), self._layout, flow, status, limit, before_position,
            as_of_position,
        )  # fmt: skip

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
        origins: dict[str, Origin | None] = {}
        last = 0
        for item in records:
            if item.position <= last:
                raise StoreError(
                    f"record of execution {item.execution_id} version {item.version} is at "
                    f"position {item.position}, not after {last}: import records in log order",
                    execution_id=item.execution_id,
                )
            while last + 1 < item.position:
                last = await stored_at(js, self._layout.gaps, b"", last)
            origin = origins.setdefault(item.execution_id, first_origin(item))
            body = encode(imported(item, origin))
            last = await stored_at(js, self._layout.execution(item.execution_id), body, last)
        for item in records:
            if item.scope is not None:
                claim = encode(Claim(item.execution_id, item.version))
                await stored_at(js, self._layout.claim(item.scope), claim, None)
        self._appender.forget()

    async def _stream_last(self) -> int:
        reply = await self._wire("asking JetStream").api(f"$JS.API.STREAM.INFO.{self.stream}", {})
        return int(reply.get("state", {}).get("last_seq", 0))

    # NATS requests

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
