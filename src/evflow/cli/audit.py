"""The offline audit commands: verify, export and import. They read the log itself, not NATS.

Exit codes: 0 when all is well, 1 when ``verify`` finds a broken chain, 2 when the command
could not do its work (no such log, an unreadable export, a log that is not empty).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import click
import msgspec

from .. import audit
from ..chain import Verdict
from ..client import DEFAULT_URL
from ..errors import EvflowError
from ..store import MAX_POSITION, EventStore, SqliteLog, open_store, parse_store
from . import err, main, out, store_option

FAILED = 2
"""The exit code of a command that could not do its work."""


@main.command()
@store_option
@click.option(
    "--file",
    "export_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Verify this export instead of the log.",
)
@click.option("--execution", "execution_id", help="Verify only this execution's chain.")
@click.option(
    "--digest",
    "expected",
    metavar="HEX",
    help="The digest a verify printed before: exit 1 if the log or file now gives another.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
def verify(
    store: str,
    export_file: Path | None,
    execution_id: str | None,
    expected: str | None,
    as_json: bool,
) -> None:
    """Check that no stored event was changed, removed or inserted.

    Walks every execution's hash chain, in the log or in a file written by `evflow export`,
    and reports each execution's first broken link. Exits 1 if any chain is broken, or if
    the digest differs from --digest.
    """
    if export_file is not None:
        verdict = _guarded(lambda: audit.verify_export(export_file, execution_id))
    else:
        verdict = _on_store(store, lambda s: audit.verify_store(s, execution_id))
    if execution_id is not None and verdict.events == 0:
        err.print(f"[red]error[/] no events of execution {execution_id} found; check the ID")
        sys.exit(FAILED)

    _print_verdict(verdict, as_json)
    changed = expected is not None and expected != verdict.digest
    if changed:
        err.print(f"[red]the digest is not the expected {expected}[/]: the history changed")
    sys.exit(0 if verdict.intact and not changed else 1)


@main.command()
@store_option
@click.option(
    "--since",
    type=click.IntRange(min=0, max=MAX_POSITION),
    default=0,
    show_default=True,
    help="Only events after this log position (the last one a previous export wrote).",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path, dir_okay=False, allow_dash=True),
    default="-",
    help="Write to this file instead of stdout.",
)
def export(store: str, since: int, output: Path) -> None:
    """Write the log's events in log order as JSON lines, exactly as stored, hashes included.

    An export taken with --since continues the one before it: append it to that file to
    verify or import them as one (`evflow export --since N >> audit.jsonl`).
    """
    try:
        with _opened(output) as sink:
            count, last = _on_store(store, lambda s: audit.export(s, sink, since))
    except OSError as error:
        err.print(f"[red]error[/] cannot write the export to {output}: {error.strerror}")
        sys.exit(FAILED)
    err.print(
        f"exported {count} events, positions {since + 1 if count else since} to {last}; "
        f"the next export can start with --since {last}",
        highlight=False,
    )


@main.command(name="import")
@store_option
@click.argument("export_file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
def import_(store: str, export_file: Path) -> None:
    """Load EXPORT_FILE, written by `evflow export`, into an empty log.

    The file's chains are verified first; a broken one imports nothing and leaves the log
    as it was. Events keep their positions and hashes, so `evflow verify` on the copy checks
    the original's chains.
    """
    records = _guarded(lambda: audit.checked_export(export_file))
    log = _guarded(lambda: parse_store(store))
    if isinstance(log, SqliteLog) and log.path.exists():
        _on_store(store, audit.require_empty)  # read-only: a refused log is left untouched
    count = _on_store(
        store, lambda s: audit.import_records(s, records, export_file), read_only=False
    )
    err.print(f"imported {count} events into {store}", highlight=False)


@contextmanager
def _opened(output: Path) -> Iterator[BinaryIO]:
    """The file to write an export to; stdout for ``-``."""
    if str(output) == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    with output.open("wb") as sink:
        yield sink


def _print_verdict(verdict: Verdict, as_json: bool) -> None:
    if as_json:
        body = msgspec.to_builtins(verdict)
        body["intact"] = verdict.intact
        out.print_json(msgspec.json.encode(body).decode())
        return
    for broken in verdict.breaks:
        out.print(
            f"[red]BROKEN[/] execution {broken.execution_id} at version {broken.version} "
            f"(position {broken.position}): {broken.problem}",
            highlight=False,
        )
    checked = f"{_count(verdict.events, 'event')} in {_count(verdict.executions, 'execution')}"
    if verdict.intact:
        out.print(f"[green]intact[/]: {checked}, every chain holds", highlight=False)
    else:
        broken = _count(len(verdict.breaks), "execution")
        out.print(f"[red]broken[/]: {broken} of {checked} checked", highlight=False)
    out.print(f"digest {verdict.digest}", highlight=False)


def _on_store(
    url: str, work: Callable[[EventStore], Awaitable[Any]], *, read_only: bool = True
) -> Any:
    """Run ``work`` on the log ``url`` names (read-only unless told), closing it after; an
    evflow error exits 2."""

    async def run() -> Any:
        nats_url = os.environ.get("EVFLOW_NATS_URL") or DEFAULT_URL  # for --store jetstream
        store = await open_store(url, read_only=read_only, nats_url=nats_url)
        try:
            return await work(store)
        finally:
            await store.close()

    return _guarded(lambda: asyncio.run(run()))


def _guarded(work: Callable[[], Any]) -> Any:
    try:
        return work()
    except EvflowError as error:
        err.print(f"[red]error[/] {error.code}: {error.message}", highlight=False)
        sys.exit(FAILED)


def _count(number: int, thing: str) -> str:
    return f"{number} {thing}" + ("" if number == 1 else "s")
