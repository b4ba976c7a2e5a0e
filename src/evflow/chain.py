"""The hash chain that makes the log tamper-evident.

Every stored event carries ``hash``, a sha256 over its canonical form, and ``prev_hash``, the
hash of the event before it in the same execution (None for version 1). Editing, deleting or
inserting an event breaks a link that ``verify`` finds, without the engine, the database or
the flow code: an exported copy is checked the same way as the live log.

The canonical form of an event is the JSON array

    [execution_id, version, type, schema_version, at, data, prev_hash]

encoded with object keys sorted and no whitespace, where ``at`` is the stored timestamp text
and ``data`` the stored event object. Any language with sha256 and a JSON encoder that sorts
keys can check a copy.

Limit: a chain proves each execution's history consistent with itself. Someone able to
rewrite a history and recompute every hash after it, or to drop an execution's latest
events, is caught only by comparing with a digest kept from before (``Verdict.digest``).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterable, Iterable
from typing import Annotated

import msgspec


class Record(msgspec.Struct, frozen=True):
    """One event exactly as the log stores it: the unit of export, import and verification."""

    position: int
    """Position in the whole log."""
    execution_id: str
    version: int
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
    """sha256 of this event's canonical form, hex."""


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
    canonical = msgspec.json.encode(
        [execution_id, version, type_, schema_version, at, msgspec.json.decode(data), prev_hash],
        order="sorted",
    )
    return hashlib.sha256(canonical).hexdigest()


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
    executions: int = 0
    breaks: list[Break] = msgspec.field(default_factory=list)
    digest: str = ""
    """sha256 over every execution's latest version and hash, in execution order: keep it
    with a copy, and a later ``verify`` that prints another digest shows the copy changed."""

    @property
    def intact(self) -> bool:
        """True when every chain holds."""
        return not self.breaks


class _Head(msgspec.Struct):
    version: int
    hash: str | None
    broken: bool = False


class Verifier:
    """Walks records in log order and checks each against its execution's chain so far.

    Memory grows with the number of executions (one head each), not with events.
    """

    def __init__(self) -> None:
        self._heads: dict[str, _Head] = {}
        self.verdict = Verdict()

    def check(self, record: Record) -> Break | None:
        """Check one record; return the break it shows, if it is its execution's first."""
        self.verdict.events += 1
        head = self._heads.get(record.execution_id)
        problem = _problem(record, head)
        if head is None:
            head = self._heads[record.execution_id] = _Head(0, None)
        head.version, head.hash = record.version, record.hash
        if problem is None or head.broken:
            return None

        head.broken = True
        found = Break(record.execution_id, record.version, record.position, problem)
        self.verdict.breaks.append(found)
        return found

    def finish(self) -> Verdict:
        """The verdict, with the digest of every execution's head."""
        digest = hashlib.sha256()
        for execution_id in sorted(self._heads):
            head = self._heads[execution_id]
            digest.update(msgspec.json.encode([execution_id, head.version, head.hash]))
        self.verdict.executions = len(self._heads)
        self.verdict.digest = digest.hexdigest()
        return self.verdict


def _problem(record: Record, head: _Head | None) -> str | None:
    """What is wrong with ``record`` after ``head``, the last event seen of its execution."""
    expected_version = head.version + 1 if head else 1
    if record.version != expected_version:
        missing = f"{expected_version}" + (
            f" to {record.version - 1}" if record.version - 1 > expected_version else ""
        )
        return (
            f"version {record.version} follows version {expected_version - 1}: version "
            f"{missing} is missing, so events were deleted or renumbered"
        )

    if record.hash is None:
        return "the event has no hash: it was written around the engine or the hash was erased"

    expected_prev = head.hash if head else None
    if record.prev_hash != expected_prev:
        return (
            f"prev_hash is {record.prev_hash}, but version {record.version - 1} hashes to "
            f"{expected_prev}: an event before this one was changed or replaced"
        )

    try:
        computed = record_hash(record)
    except msgspec.DecodeError as error:
        return f"the stored event is not valid JSON ({error}): it was changed after writing"
    if computed != record.hash:
        return (
            f"the content hashes to {computed}, not to the stored {record.hash}: the event "
            "was changed after it was written"
        )
    return None


def verify(records: Iterable[Record]) -> Verdict:
    """Walk ``records`` (in log order) and report every execution's first broken link."""
    verifier = Verifier()
    for record in records:
        verifier.check(record)
    return verifier.finish()


async def verify_async(records: AsyncIterable[Record]) -> Verdict:
    """``verify`` over records read from a live store."""
    verifier = Verifier()
    async for record in records:
        verifier.check(record)
    return verifier.finish()
