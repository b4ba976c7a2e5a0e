"""What an auditor does with a log: export it, verify it, import a copy to work on.

An export is JSON lines, one ``chain.Record`` per line in log order: every event exactly as
stored, with its hashes. ``jq`` reads it; ``verify`` checks it without the engine, the
database or the flow code; ``import`` loads it into an empty log for replay checks.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import IO

import msgspec

from .chain import Record, Verdict, Verifier, verify, verify_async
from .errors import StoreError
from .events import decode
from .store import EventStore, event_scope

logger = logging.getLogger(__name__)

PAGE = 1000
"""Records read from the log per query."""

_encoder = msgspec.json.Encoder()
_line_decoder = msgspec.json.Decoder(Record)


async def records_of(
    store: EventStore, since: int = 0, execution_id: str | None = None
) -> AsyncIterator[Record]:
    """Every record of the log after position ``since``, of one execution if given."""
    position = since
    while page := await store.records(position, PAGE, execution_id):
        for record in page:
            yield record
        position = page[-1].position


async def export(store: EventStore, out: IO[bytes], since: int = 0) -> tuple[int, int]:
    """Write the log after position ``since`` to ``out`` as JSON lines.

    Returns how many events were written and the position of the last one (``since`` when
    none), from which a later export goes on.
    """
    end = await store.last_position()
    if since > end:
        raise StoreError(
            f"the log ends at position {end}, before --since {since}: an export from there "
            f"would skip events; give a position from 0 to {end}"
        )

    count, last = 0, since
    async for record in records_of(store, since):
        _check_json(record)
        out.write(_encoder.encode(record) + b"\n")
        count, last = count + 1, record.position
    return count, last


def _check_json(record: Record) -> None:
    """Refuse to copy an event whose stored data is not JSON: it could not be one line."""
    try:
        msgspec.json.decode(bytes(record.data))
    except msgspec.DecodeError as error:
        raise StoreError(
            f"execution {record.execution_id} version {record.version} (position "
            f"{record.position}) holds data that is not JSON ({error}), so it cannot be "
            "exported: the log was damaged or edited; evflow verify shows where",
            execution_id=record.execution_id,
        ) from error


def read_export(path: Path) -> Iterator[Record]:
    """The records of an export file, each checked to be one, with its line named if not."""
    try:
        with path.open("rb") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    yield _record(line, number, path)
    except OSError as error:
        raise StoreError(f"cannot read the export {path}: {error.strerror}") from error


def _record(line: bytes, number: int, path: Path) -> Record:
    try:
        return _line_decoder.decode(line)
    except msgspec.DecodeError as error:
        raise StoreError(
            f"line {number} of {path} is not an exported event ({error}); give a file "
            "written by evflow export"
        ) from error


async def verify_store(store: EventStore, execution_id: str | None = None) -> Verdict:
    """Walk the hash chains of a live log, or of one execution in it, and check that each
    event reads as one and that the log's idempotency index agrees with it."""
    return await verify_async(records_of(store, execution_id=execution_id), content_problem)


def verify_export(path: Path, execution_id: str | None = None) -> Verdict:
    """Walk the hash chains of an export file, or of one execution in it."""
    records = read_export(path)
    if execution_id is not None:
        records = (record for record in records if record.execution_id == execution_id)
    return verify(records, content_problem)


def content_problem(record: Record) -> str | None:
    """What keeps a hash-valid record from being a sound event of the log, if anything: its
    time, its event (upcast if old), its type column, its idempotency scope."""
    try:
        stamp = datetime.fromisoformat(record.at)
        event = decode(bytes(record.data), record.schema_version)
    except ValueError as error:  # msgspec's decode errors are ValueErrors too
        return f"it does not read as an event of this evflow ({error}); upgrade evflow"
    if stamp.utcoffset() is None:
        return f"its time {record.at} has no UTC offset"

    if type(event).__name__ != record.type:
        return f"its type column says {record.type} but it holds a {type(event).__name__}"
    scope = event_scope(record.execution_id, event)
    if record.scope != scope:
        return (
            f"the log's idempotency index holds {record.scope} for it, but its key claims "
            f"{scope}: the index was changed, so a repeated command would not be recognised"
        )
    return None


async def require_empty(store: EventStore) -> None:
    """Refuse a log that holds events: an import goes into a new file."""
    if not await store.is_empty():
        raise StoreError(
            "the log to import into already holds events; import into a new file, for "
            "example --store sqlite:///copy.db"
        )


async def import_records(store: EventStore, records: list[Record], source: Path) -> int:
    """Load records that ``checked_export`` read into an empty log, in one transaction."""
    await require_empty(store)
    await store.import_records(records)
    logger.info("imported %d events from %s", len(records), source)
    return len(records)


def checked_export(path: Path) -> list[Record]:
    """The records of an export, once their chains, order and events are found sound; the
    whole file is refused, naming the first break, if any is not."""
    verifier, records, last = Verifier(content_problem), [], 0
    for record in read_export(path):
        if record.position <= last:
            raise StoreError(
                f"{path}: position {record.position} (execution {record.execution_id} "
                f"version {record.version}) does not follow {last}; exports are in log order"
            )
        broken = verifier.check(record)
        if broken is not None:
            raise StoreError(
                f"{path}: execution {broken.execution_id} breaks at version "
                f"{broken.version}: {broken.problem}; nothing was imported",
                execution_id=broken.execution_id,
            )
        records.append(record)
        last = record.position
    return records
