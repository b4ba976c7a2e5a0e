"""The hash chain that makes the log tamper-evident.

Every stored event carries ``hash``, a sha256 over its stored form, and ``prev_hash``, the
hash of the event before it in the same execution (None for version 1). Editing, deleting or
inserting an event breaks a link that ``verify`` finds, without the engine, the database or
the flow code: an exported copy is checked the same way as the live log.

What is hashed is one line of JSON, a newline, then the stored event data byte for byte:

    [execution_id, version, type, schema_version, at, prev_hash]\n{...data...}

The line has no spaces and writes non-ASCII characters as UTF-8, as Python's
``json.dumps(line, separators=(",", ":"), ensure_ascii=False)`` does; ``at`` is the stored
timestamp text. Hashing the data as stored, not a re-encoding of it, means any change to
it, even one a JSON parser would not see (a repeated key, say), breaks the hash, and any
language with sha256 can recheck a copy without re-encoding JSON.

Not hashed: the log position, which a store assigns when it commits (a renumbering shows in
the digest and in positions that stop rising with versions), and the idempotency index,
which is derived from the events and checked against them by ``audit``.

Limit: a chain proves each execution's history consistent with itself. Someone able to
rewrite a history and recompute every hash after it, or to drop an execution's latest
events, is caught only by comparing with a digest kept from before (``Verdict.digest``).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterable, Callable, Iterable
from typing import Annotated

import msgspec


class Record(msgspec.Struct, frozen=True):
    """One event exactly as the log stores it: the unit of export, import and verification."""

    position: int
    """Position in the whole log."""
    execution_id: str
    """The execution the event belongs to."""
    version: int
    """Position in the execution, 1, 2, 3 ... without gaps."""
    type: str
    """The event's type, as its ``type`` tag in ``data`` also says."""
    schema_version: int
    """Shape version of ``data`` when it was stored."""
    at: str
    """When the engine decided the event, RFC 3339 text as stored."""
    data: Annotated[msgspec.Raw, msgspec.Meta(extra_json_schema={"type": "object"})]
    """The event object, byte for byte as stored (in the shape of its schema version)."""
    prev_hash: str | None
    """Hash of the execution's previous event; null for version 1."""
    hash: str | None
    """sha256 of this event's stored form, hex."""
    scope: str | None = None
    """The idempotency scope the log's index holds for the event. Derived from the event's
    key, so not hashed; ``verify`` checks that it agrees with the event."""


def link_hash(
    execution_id: str,
    version: int,
    type_: str,
    schema_version: int,
    at: str,
    data: bytes | str,
    prev_hash: str | None,
) -> str:
    """The hash of an event with these stored fields and this predecessor."""
    line = msgspec.json.encode([execution_id, version, type_, schema_version, at, prev_hash])
    stored = data.encode() if isinstance(data, str) else data
    return hashlib.sha256(line + b"\n" + stored).hexdigest()


def record_hash(record: Record) -> str:
    """What ``record``'s hash must be, given its content and its recorded predecessor."""
    return link_hash(
        record.execution_id,
        record.version,
        record.type,
        record.schema_version,
        record.at,
        bytes(record.data),
        record.prev_hash,
    )


class Break(msgspec.Struct, frozen=True):
    """The first broken link of one execution's chain."""

    execution_id: str
    version: int
    """The version at which the chain stops holding."""
    position: int
    """The log position of the event found there."""
    problem: str
    """What differs, in words an auditor can act on."""


class Verdict(msgspec.Struct):
    """What walking the chains found."""

    events: int = 0
    """How many events were checked."""
    executions: int = 0
    """How many executions they belong to."""
    breaks: list[Break] = msgspec.field(default_factory=list)
    """The first broken link of each execution that has one."""
    digest: str = ""
    """sha256 over every execution's latest version, position and hash, in execution order:
    keep it with a copy, and a later ``verify`` printing another digest shows it changed."""

    @property
    def intact(self) -> bool:
        """True when every chain holds."""
        return not self.breaks


Inspect = Callable[[Record], str | None]
"""A check of one record's content beyond the chain; returns what is wrong, if anything."""


class _Head(msgspec.Struct):
    version: int
    position: int
    hash: str | None
    broken: bool = False


class Verifier:
    """Walks records in log order and checks each against its execution's chain so far.

    Memory grows with the number of executions (one head each), not with events.

    Args:
        inspect: an extra check of each record whose chain link holds (``audit`` checks
            that the event decodes and that the log's derived columns agree with it).
    """

    def __init__(self, inspect: Inspect | None = None) -> None:
        self._heads: dict[str, _Head] = {}
        self._inspect = inspect
        self._position = 0
        self.verdict = Verdict()

    def check(self, record: Record) -> Break | None:
        """Check one record; return the break it shows, if it is its execution's first."""
        self.verdict.events += 1
        head = self._heads.get(record.execution_id)
        problem = self._out_of_order(record)
        try:
            problem = problem or _problem(record, head)
        except TypeError as error:  # a column edited to hold another type
            problem = f"its stored fields hold values of the wrong type ({error})"
        if problem is None and self._inspect is not None:
            problem = self._inspect(record)
        if head is None:
            head = self._heads[record.execution_id] = _Head(0, 0, None)
        if record.version > head.version:
            head.version, head.position, head.hash = record.version, record.position, record.hash
        if problem is None or head.broken:
            return None

        head.broken = True
        found = Break(record.execution_id, record.version, record.position, problem)
        self.verdict.breaks.append(found)
        return found

    def _out_of_order(self, record: Record) -> str | None:
        """Records come in log order: a position that does not rise was moved or copied."""
        previous, self._position = self._position, max(self._position, record.position)
        if record.position > previous:
            return None
        return (
            f"its log position {record.position} comes after position {previous}: records "
            "were reordered or duplicated, or positions changed"
        )

    def finish(self) -> Verdict:
        """The verdict, with the digest of every execution's head."""
        digest = hashlib.sha256()
        for execution_id in sorted(self._heads):
            head = self._heads[execution_id]
            digest.update(
                msgspec.json.encode([execution_id, head.version, head.position, head.hash])
            )
        self.verdict.executions = len(self._heads)
        self.verdict.digest = digest.hexdigest()
        return self.verdict


def _problem(record: Record, head: _Head | None) -> str | None:
    """What is wrong with ``record`` after ``head``, the last event seen of its execution."""
    last = head.version if head else 0
    if record.version <= last:
        return (
            f"version {record.version} appears again after version {last}: an event was "
            "duplicated, or the records are out of log order"
        )
    if record.version != last + 1:
        missing = f"{last + 1}" + (f" to {record.version - 1}" if record.version > last + 2 else "")
        return (
            f"version {record.version} follows version {last} in log order: version {missing} "
            "is missing before it, so events were deleted or their positions changed"
        )
    if head is not None and record.position <= head.position:
        return (
            f"its log position {record.position} is not after version {last}'s "
            f"{head.position}: positions were changed"
        )

    if record.hash is None:
        return "the event has no hash: it was written around the engine or the hash was erased"
    expected_prev = head.hash if head else None
    if record.prev_hash != expected_prev:
        return (
            f"prev_hash is {record.prev_hash}, but version {last} hashes to {expected_prev}: "
            "an event before this one was changed or replaced"
        )
    computed = record_hash(record)
    if computed != record.hash:
        return (
            f"the content hashes to {computed}, not to the stored {record.hash}: the event "
            "was changed after it was written"
        )
    return None


def verify(records: Iterable[Record], inspect: Inspect | None = None) -> Verdict:
    """Walk ``records`` (in log order) and report every execution's first broken link."""
    verifier = Verifier(inspect)
    for record in records:
        verifier.check(record)
    return verifier.finish()


async def verify_async(records: AsyncIterable[Record], inspect: Inspect | None = None) -> Verdict:
    """``verify`` over records read from a live store."""
    verifier = Verifier(inspect)
    async for record in records:
        verifier.check(record)
    return verifier.finish()
