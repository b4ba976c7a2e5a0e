"""The append-only log: one protocol, one module per backend.

A store keeps every execution's events in order and answers the few look-ups the engine
needs. Appends name the version they expect to follow, so two writers can never both
extend the same history: the second gets ``ConcurrencyError``. An idempotency key claims
a unique scope in the log, so a repeated command is found again after a restart.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import msgspec

from ..chain import Record
from ..events import Event, ExecutionCancelled, ExecutionResumed, ExecutionStarted, StoredEvent
from ..state import Status
from ..timers import Timer

if TYPE_CHECKING:
    from ..errors import ConcurrencyError


class ExecutionSummary(msgspec.Struct, frozen=True):
    """One row of a listing: an execution as its first and latest events describe it."""

    execution_id: str
    """The execution."""
    flow: str
    """Name of its flow."""
    flow_version: int
    """Version of the flow code it started on."""
    status: Status
    """Where it stands, from the type of its latest event (``state.status_after``)."""
    version: int
    """Version of its latest event."""
    started_at: datetime
    """When it was invoked."""
    updated_at: datetime
    """When its latest event happened."""
    position: int
    """Position of its latest event in the whole log: where a listing page ends."""


MAX_POSITION = 2**63 - 1
"""The highest log position or version a store can hold (SQLite's largest integer)."""


class EventStore(Protocol):
    """What the engine asks of a log backend."""

    async def open(self) -> None:
        """Connect and create or migrate the schema."""

    async def close(self) -> None:
        """Finish pending appends and release the backend."""

    async def append(
        self, execution_id: str, expected_version: int, events: Sequence[StoredEvent]
    ) -> list[StoredEvent]:
        """Durably append ``events`` (versions expected+1, expected+2, ...) in one go.

        Returns them with their global positions. Raises ``ConcurrencyError`` when the
        execution's version is not ``expected_version``, and ``DuplicateCommand`` when an
        event's idempotency scope was already claimed; either way nothing is appended.
        """

    async def read(self, execution_id: str, to_version: int | None = None) -> list[StoredEvent]:
        """One execution's events in version order, up to ``to_version`` if given."""

    async def read_many(self, execution_ids: Sequence[str]) -> dict[str, list[StoredEvent]]:
        """Several executions' events at once, each in version order; an execution the log
        does not hold is left out. For readers of many histories (replay checks)."""

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """Events of all executions in global order, after ``after_position``."""

    async def records(
        self, after_position: int = 0, limit: int = 1000, execution_id: str | None = None
    ) -> list[Record]:
        """Events exactly as stored (data, schema version and hashes untouched), in log order
        after ``after_position``, of one execution if given: what export and verify read."""

    async def import_records(self, records: Sequence[Record]) -> None:
        """Write records exported from another log as they are, positions and hashes kept,
        in one transaction. Only for a log no engine serves; ``evflow import`` checks it is
        empty first."""

    async def is_empty(self) -> bool:
        """True when the log holds no event."""

    async def find_command(self, scope: str) -> StoredEvent | None:
        """The event that claimed an idempotency scope, if any."""

    async def unsettled(self, partitions: Collection[int] | None = None) -> list[str]:
        """Executions whose last event leaves them running: the engine must drive them on.
        Only those in ``partitions`` (``partitions.partition_of``) when given."""

    async def pending_timers(self, partitions: Collection[int] | None = None) -> list[Timer]:
        """The timer of every execution whose latest event starts one: a wait not yet fired,
        or a pause with a deadline not yet answered. The engine's scheduler starts from it.
        Only those of executions in ``partitions`` when given."""

    async def list_executions(
        self,
        flow: str | None = None,
        status: Status | None = None,
        limit: int = 100,
        before_position: int | None = None,
        as_of_position: int | None = None,
    ) -> list[ExecutionSummary]:
        """At most ``limit`` executions, the most recently changed first, of one flow and
        in one status if given, as the log stood at ``as_of_position`` (its end if None).

        The order is the position of each execution's latest event, newest first. Passing
        the ``position`` of a page's last row as ``before_position``, with the same
        ``as_of_position``, gives the next page of the same snapshot: every execution that
        existed then is listed exactly once, in the state it had then, however the log
        grows meanwhile. The status is derived from the latest event's type, never stored
        beside the log.
        """

    async def last_position(self) -> int:
        """The position of the latest event in the log; 0 when it is empty."""

    async def load_checkpoint(self, name: str) -> int:
        """The global position checkpoint ``name`` was last saved at; 0 if never saved."""

    async def save_checkpoint(self, name: str, position: int) -> None:
        """Durably move checkpoint ``name`` to ``position``; a lower position changes nothing.

        The outbox keeps its place in the log here, so a restart publishes from where the
        last run stopped rather than from the beginning.
        """


def idempotency_scope(stored: StoredEvent) -> str | None:
    """The unique scope an event claims in the log, from its idempotency key.

    An invoke key is scoped to its flow, a resume or cancel key to its execution, so the
    same key may be used for unrelated commands without colliding.
    """
    return event_scope(stored.execution_id, stored.event)


def event_scope(execution_id: str, event: Event) -> str | None:
    """The scope ``event`` of ``execution_id`` claims; see ``idempotency_scope``."""
    if isinstance(event, ExecutionStarted) and event.idempotency_key is not None:
        return invoke_scope(event.flow, event.idempotency_key)
    if isinstance(event, ExecutionResumed) and event.idempotency_key is not None:
        return resume_scope(execution_id, event.idempotency_key)
    if isinstance(event, ExecutionCancelled) and event.idempotency_key is not None:
        return cancel_scope(execution_id, event.idempotency_key)
    return None


def check_append(execution_id: str, expected_version: int, events: Sequence[StoredEvent]) -> None:
    """Refuse an append whose events do not all extend ``execution_id`` one version at a time.

    Backends call this before touching their log, so a malformed append fails alone and
    cannot slip events of another execution past the version check of this one.
    """
    from ..errors import StoreError

    if not events:
        raise StoreError(f"execution {execution_id}: an append needs at least one event")

    for offset, item in enumerate(events, start=1):
        if item.execution_id != execution_id:
            raise StoreError(
                f"an append to execution {execution_id} holds an event of execution "
                f"{item.execution_id}; append each execution's events on their own",
                execution_id=execution_id,
            )
        if item.version != expected_version + offset:
            raise StoreError(
                f"execution {execution_id}: event versions must follow {expected_version} "
                f"without gaps, got {item.version}",
                execution_id=execution_id,
            )


def version_clash(execution_id: str, current: int, expected: int) -> ConcurrencyError:
    """The refusal of an append that expected ``expected`` where the log is at ``current``."""
    from ..errors import ConcurrencyError

    return ConcurrencyError(
        f"execution {execution_id} is at version {current}, not {expected}: another writer "
        "appended first; re-read it",
        execution_id=execution_id,
        version=current,
    )


def invoke_scope(flow: str, key: str) -> str:
    """Idempotency scope of an invoke of ``flow`` with ``key``."""
    return f"invoke/{flow}/{key}"


def resume_scope(execution_id: str, key: str) -> str:
    """Idempotency scope of a resume of ``execution_id`` with ``key``."""
    return f"resume/{execution_id}/{key}"


def cancel_scope(execution_id: str, key: str) -> str:
    """Idempotency scope of a cancel of ``execution_id`` with ``key``."""
    return f"cancel/{execution_id}/{key}"


_STORE_FORMS = (
    "use sqlite:///PATH (for example sqlite:///evflow.db), nats://HOST:PORT[,HOST:PORT...] "
    "for a JetStream log on those servers (add ?replicas=3 on a cluster), or jetstream for "
    "one on the NATS server evflow connects to"
)


class SqliteLog(msgspec.Struct, frozen=True):
    """A store URL naming an SQLite file."""

    path: Path


class JetStreamLog(msgspec.Struct, frozen=True):
    """A store URL naming a JetStream log: on ``servers``, or on evflow's own NATS if None."""

    servers: list[str] | None
    replicas: int = 1


def parse_store(url: str) -> SqliteLog | JetStreamLog:
    """What a store URL names: ``sqlite:///PATH`` (relative) or ``sqlite:////PATH``, a
    JetStream log as ``nats://HOST:PORT,...[?replicas=N]``, or ``jetstream[?replicas=N]``."""
    from ..errors import StoreError

    base, _, query = url.partition("?")
    if base == "jetstream" or base.startswith("nats://"):
        servers = None if base == "jetstream" else [s.strip() for s in base.split(",")]
        if servers is not None:
            servers = [s if "://" in s else f"nats://{s}" for s in servers if s]
        return JetStreamLog(servers, _replicas(url, query))
    path = url.removeprefix("sqlite:///")
    if not url.startswith("sqlite:///") or not path:
        raise StoreError(f"store URL '{url}' is not supported; {_STORE_FORMS}")
    return SqliteLog(Path(path))


def _replicas(url: str, query: str) -> int:
    from ..errors import StoreError

    options = dict(part.partition("=")[::2] for part in query.split("&") if part)
    unknown = set(options) - {"replicas"}
    replicas = options.get("replicas", "1")
    if unknown or not replicas.isascii() or not replicas.isdigit() or not 1 <= int(replicas) <= 5:
        raise StoreError(
            f"store URL '{url}': the only option is replicas, from 1 to 5 (?replicas=3)"
        )
    return int(replicas)


def store_path(url: str) -> Path:
    """The file an SQLite store URL names; any other store URL is refused."""
    from ..errors import StoreError

    log = parse_store(url)
    if not isinstance(log, SqliteLog):
        raise StoreError(f"store URL '{url}' names a JetStream log, not an SQLite file")
    return log.path


async def open_store(
    url: str, *, read_only: bool = False, nats_url: str = "nats://127.0.0.1:4222"
) -> EventStore:
    """Open the store a URL names (see ``parse_store``), creating a new log if there is
    none; ``read_only`` for auditors, who must find the log there and can change nothing in
    it. ``nats_url`` is where ``jetstream`` finds its servers."""
    store = store_at(url, read_only=read_only, nats_url=nats_url)
    await store.open()
    return store


def store_at(
    url: str, *, read_only: bool = False, nats_url: str = "nats://127.0.0.1:4222"
) -> EventStore:
    """The store a URL names, not yet opened: for a caller that retries ``open`` (an
    engine starting while NATS elects its leaders); see ``open_store``."""
    log = parse_store(url)
    if isinstance(log, JetStreamLog):
        from .jetstream import JetStreamStore

        servers = log.servers or [s.strip() for s in nats_url.split(",") if s.strip()]
        return JetStreamStore(servers, replicas=log.replicas, read_only=read_only)

    from .sqlite import SqliteStore

    return SqliteStore(log.path, read_only=read_only)


__all__ = [
    "MAX_POSITION",
    "EventStore",
    "ExecutionSummary",
    "JetStreamLog",
    "SqliteLog",
    "cancel_scope",
    "check_append",
    "event_scope",
    "idempotency_scope",
    "invoke_scope",
    "open_store",
    "parse_store",
    "resume_scope",
    "store_at",
    "store_path",
    "version_clash",
]
