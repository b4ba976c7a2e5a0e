"""Auditing a log: the hash chain, ``evflow verify``, ``export`` and ``import``, and reading
events stored in an older shape.

Logs are written by a real engine running the example flows on a real SQLite file; the
tampering is done with ``sqlite3`` and plain file edits, behind the engine's back, and the
commands run as real ``evflow`` processes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import sys
from collections.abc import AsyncIterator
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import pytest
from examples.flows import app
from jsonschema import Draft202012Validator

from evflow import audit, events
from evflow.chain import link_hash
from evflow.engine import Engine
from evflow.errors import StoreError
from evflow.events import (
    SCHEMA_VERSION,
    ExecutionFailed,
    ExecutionStarted,
    StoredEvent,
    Upcasters,
)
from evflow.nats_server import NatsServer
from evflow.state import fold
from evflow.store import migrations
from evflow.store.jetstream import JetStreamStore
from evflow.store.sqlite import SqliteStore
from processes import BOUND, Result, cli_env, evflow, sqlite_url

HISTORIES = Path(__file__).parent / "histories"
SCHEMAS = Path(__file__).parent.parent / "schemas"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
async def log(tmp_path: Path) -> AsyncIterator[Path]:
    """A log with one completed and one paused approval, closed before the test reads it."""
    path = tmp_path / "log.db"
    store = SqliteStore(path)
    await store.open()
    try:
        engine = Engine(app, store)
        first = await engine.invoke("approval", b'{"amount": 120, "requester": "ann"}')
        await engine.resume("approval", first.execution_id, b'{"approved": true, "note": "ok"}')
        await engine.invoke("approval", b'{"amount": 5, "requester": "bob"}')
    finally:
        await store.close()
    yield path


def rows(path: Path) -> list[tuple]:
    """Every row of the events table, in log order."""
    with closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT * FROM events ORDER BY position").fetchall()


def execute(path: Path, sql: str, *params: object) -> None:
    """Change the log with sqlite3 alone, as someone bypassing the engine would."""
    with closing(sqlite3.connect(path)) as db:
        db.execute(sql, params)
        db.commit()


def execution_of(path: Path, requester: str) -> str:
    """The execution started by ``requester``."""
    with closing(sqlite3.connect(path)) as db:
        (execution_id,) = db.execute(
            "SELECT execution_id FROM events WHERE version = 1"
            " AND json_extract(data, '$.inputs.requester') = ?",
            (requester,),
        ).fetchone()
    return execution_id


def verdict(result: Result) -> dict:
    """The JSON verdict of ``evflow verify --json``."""
    return json.loads(result.stdout)


# verify on the live log


async def test_an_untouched_log_verifies_intact(log: Path):
    """Every chain holds: exit 0, every event and execution counted."""
    result = await evflow("verify", "--store", sqlite_url(log), "--json")

    assert result.returncode == 0, result
    body = verdict(result)
    assert (body["intact"], body["events"], body["executions"], body["breaks"]) == (
        True, 6, 2, []
    )  # fmt: skip


async def test_an_event_edited_with_sqlite3_is_found(log: Path):
    """Raising an amount in the stored JSON breaks that event's hash: exit 1, named."""
    ann = execution_of(log, "ann")
    execute(
        log,
        "UPDATE events SET data = replace(data, '120.0', '1200.0')"
        " WHERE execution_id = ? AND version = 1",
        ann,
    )

    result = await evflow("verify", "--store", sqlite_url(log))

    assert result.returncode == 1, result
    assert f"BROKEN execution {ann} at version 1" in result.stdout
    assert "the event was changed after it was written" in result.stdout
    assert "broken: 1 execution of 6 events in 2 executions checked" in result.stdout


async def test_a_deleted_event_is_found_as_a_missing_version(log: Path):
    """Deleting the pause of a completed execution leaves a gap the chain names."""
    ann = execution_of(log, "ann")
    execute(log, "DELETE FROM events WHERE execution_id = ? AND version = 2", ann)

    result = await evflow("verify", "--store", sqlite_url(log), "--json")

    assert result.returncode == 1, result
    [broken] = verdict(result)["breaks"]
    assert (broken["execution_id"], broken["version"]) == (ann, 3)
    assert "version 2 is missing" in broken["problem"]


async def test_an_edit_that_rehashes_its_event_breaks_the_next_link(log: Path):
    """Recomputing the edited event's own hash is not enough: its successor names the old."""
    ann = execution_of(log, "ann")
    position, execution_id, version, type_, schema, at, data, _scope, prev, _hash = rows(log)[0]
    forged = data.replace("120.0", "1200.0")
    digest = link_hash(execution_id, version, type_, schema, at, forged, prev)
    execute(
        log, "UPDATE events SET data = ?, hash = ? WHERE position = ?", forged, digest, position
    )

    result = await evflow("verify", "--store", sqlite_url(log), "--json")

    assert result.returncode == 1, result
    [broken] = verdict(result)["breaks"]
    assert (broken["execution_id"], broken["version"]) == (ann, 2)
    assert "an event before this one was changed or replaced" in broken["problem"]


async def test_a_repeated_key_that_json_readers_disagree_on_is_found(log: Path):
    """A key written twice reads as its first value in SQLite's json_extract and as its last
    in msgspec: the data's bytes changed, so the hash breaks, whoever reads it."""
    ann = execution_of(log, "ann")
    execute(
        log,
        'UPDATE events SET data = replace(data, \'{"type":\', \'{"flow":"evil","type":\')'
        " WHERE execution_id = ? AND version = 1",
        ann,
    )

    result = await evflow("verify", "--store", sqlite_url(log), "--json")

    assert result.returncode == 1, result
    [broken] = verdict(result)["breaks"]
    assert (broken["execution_id"], broken["version"]) == (ann, 1)


async def test_a_changed_idempotency_index_is_found(log: Path, tmp_path: Path):
    """The index is derived from the events and not hashed; verify checks it against them."""
    path = tmp_path / "keyed.db"
    store = SqliteStore(path)
    await store.open()
    try:
        engine = Engine(app, store)
        await engine.invoke("approval", b'{"amount": 1, "requester": "kim"}', "key-1")
    finally:
        await store.close()
    execute(path, "UPDATE events SET idempotency_scope = NULL")

    result = await evflow("verify", "--store", sqlite_url(path), "--json")

    assert result.returncode == 1, result
    [broken] = verdict(result)["breaks"]
    assert broken["version"] == 1 and "idempotency index holds None" in broken["problem"]


async def test_positions_moved_are_found_or_change_the_digest(log: Path):
    """Positions are assigned on commit and not hashed: moving one event of an execution
    before its predecessor is a break, and renumbering the whole log changes the digest."""
    before = verdict(await evflow("verify", "--store", sqlite_url(log), "--json"))
    execute(log, "UPDATE events SET position = position + 1000")
    renumbered = verdict(await evflow("verify", "--store", sqlite_url(log), "--json"))
    ann = execution_of(log, "ann")
    execute(log, "UPDATE events SET position = 7 WHERE execution_id = ? AND version = 3", ann)

    result = await evflow("verify", "--store", sqlite_url(log), "--json")

    assert renumbered["intact"] and renumbered["digest"] != before["digest"]
    assert result.returncode == 1, result
    [broken] = verdict(result)["breaks"]
    assert (broken["execution_id"], broken["version"]) == (ann, 3)
    assert "positions changed" in broken["problem"]


async def test_a_hash_is_recomputed_from_the_readme_recipe_with_the_standard_library(
    tmp_path: Path,
):
    """sha256 of the header line, a newline and the stored data, with only json and
    hashlib: what an auditor in another language does, non-ASCII text and big numbers too."""
    path = tmp_path / "log.db"
    store = SqliteStore(path)
    await store.open()
    try:
        body = '{"amount": 1e16, "requester": "zoë"}'.encode()
        await Engine(app, store).invoke("approval", body)
    finally:
        await store.close()

    for _, execution_id, version, type_, schema, at, data, _, prev, digest in rows(path):
        line = json.dumps(
            [execution_id, version, type_, schema, at, prev],
            separators=(",", ":"),
            ensure_ascii=False,
        )
        assert hashlib.sha256(f"{line}\n{data}".encode()).hexdigest() == digest


async def test_export_refuses_an_event_that_is_not_json(log: Path, tmp_path: Path):
    """Data cut short cannot be one line of an export: exit 2 naming where, and verify
    on the log reports the break."""
    ann = execution_of(log, "ann")
    execute(log, "UPDATE events SET data = substr(data, 1, 20) WHERE execution_id = ?", ann)

    exported = await evflow("export", "--store", sqlite_url(log), "-o", str(tmp_path / "x"))
    checked = await evflow("verify", "--store", sqlite_url(log))

    assert exported.returncode == 2, exported
    assert f"execution {ann} version 1" in exported.stderr and "not JSON" in exported.stderr
    assert checked.returncode == 1 and f"BROKEN execution {ann} at version 1" in checked.stdout


async def test_verify_of_one_execution_checks_only_its_chain(log: Path):
    """--execution walks one chain: a break elsewhere does not fail it."""
    ann, bob = execution_of(log, "ann"), execution_of(log, "bob")
    execute(log, "UPDATE events SET data = replace(data, 'ann', 'eve') WHERE execution_id = ?", ann)

    of_bob = await evflow("verify", "--store", sqlite_url(log), "--execution", bob, "--json")
    of_ann = await evflow("verify", "--store", sqlite_url(log), "--execution", ann, "--json")

    assert of_bob.returncode == 0 and verdict(of_bob)["events"] == 2, of_bob
    assert of_ann.returncode == 1 and verdict(of_ann)["executions"] == 1, of_ann


async def test_verify_refuses_an_unknown_execution_or_a_missing_log(log: Path, tmp_path: Path):
    """What cannot be checked exits 2 and says why, naming the execution or the file."""
    unknown = await evflow("verify", "--store", sqlite_url(log), "--execution", "nope")
    missing = await evflow("verify", "--store", sqlite_url(tmp_path / "none.db"))

    assert unknown.returncode == 2 and "no events of execution nope" in unknown.stderr
    assert missing.returncode == 2 and "there is no SQLite log at" in missing.stderr
    assert not (tmp_path / "none.db").exists()


# export, verify of a copy, import


async def test_an_export_verifies_like_its_log(log: Path, tmp_path: Path):
    """The export holds every row as stored and verifies with the same digest as the log."""
    copy = tmp_path / "log.jsonl"

    exported = await evflow("export", "--store", sqlite_url(log), "-o", str(copy))
    of_log = await evflow("verify", "--store", sqlite_url(log), "--json")
    of_copy = await evflow("verify", "--file", str(copy), "--json")

    assert exported.returncode == 0 and "exported 6 events" in exported.stderr, exported
    lines = [json.loads(line) for line in copy.read_text().splitlines()]
    assert [
        (i["position"], i["execution_id"], i["version"], i["type"], i["hash"]) for i in lines
    ] == [(r[0], r[1], r[2], r[3], r[9]) for r in rows(log)]
    assert [i["data"] for i in lines] == [json.loads(r[6]) for r in rows(log)]
    assert of_copy.returncode == 0, of_copy
    assert verdict(of_copy)["digest"] == verdict(of_log)["digest"]
    schema = json.loads((SCHEMAS / "export-record.json").read_text())
    for line in lines:
        Draft202012Validator(schema).validate(line)


async def test_an_edited_export_line_is_found(log: Path, tmp_path: Path):
    """Changing a requester in the exported file breaks that event's hash: exit 1."""
    copy = tmp_path / "log.jsonl"
    await evflow("export", "--store", sqlite_url(log), "-o", str(copy))
    copy.write_text(copy.read_text().replace('"bob"', '"eve"'))

    result = await evflow("verify", "--file", str(copy), "--json")

    assert result.returncode == 1, result
    [broken] = verdict(result)["breaks"]
    assert (broken["execution_id"], broken["version"]) == (execution_of(log, "bob"), 1)


async def test_a_line_dropped_from_an_export_is_found(log: Path, tmp_path: Path):
    """An export with a middle line removed fails on the version after it."""
    copy = tmp_path / "log.jsonl"
    await evflow("export", "--store", sqlite_url(log), "-o", str(copy))
    lines = copy.read_text().splitlines(keepends=True)
    copy.write_text("".join(lines[:1] + lines[2:]))

    result = await evflow("verify", "--file", str(copy))

    assert result.returncode == 1 and "version 2 is missing" in result.stdout, result


async def test_a_file_that_is_no_export_is_refused_naming_the_line(tmp_path: Path):
    """A line that is not an exported event exits 2 naming the line."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"position": 1}\n')

    result = await evflow("verify", "--file", str(bad))

    assert result.returncode == 2 and "line 1 of" in result.stderr, result


async def test_export_since_a_position_goes_on_where_the_last_one_stopped(
    log: Path, tmp_path: Path
):
    """Two exports split at the position the first reported make the whole export."""
    whole, first, rest = (tmp_path / name for name in ("whole", "first", "rest"))
    await evflow("export", "--store", sqlite_url(log), "-o", str(whole))
    await evflow("export", "--store", sqlite_url(log), "-o", str(first), "--since", "0")
    three = str(rows(log)[2][0])

    split = await evflow(
        "export", "--store", sqlite_url(log), "-o", str(rest), "--since", f"{three}"
    )

    assert split.returncode == 0 and "exported 3 events" in split.stderr, split
    lines = whole.read_text().splitlines(keepends=True)
    assert first.read_text() == "".join(lines)
    assert rest.read_text() == "".join(lines[3:])


async def test_an_imported_copy_reads_and_verifies_like_the_log(log: Path, tmp_path: Path):
    """Import into an empty file: same rows, positions and hashes, intact, and foldable."""
    export, copy = tmp_path / "log.jsonl", tmp_path / "copy.db"
    await evflow("export", "--store", sqlite_url(log), "-o", str(export))

    imported = await evflow("import", "--store", sqlite_url(copy), str(export))
    checked = await evflow("verify", "--store", sqlite_url(copy))

    assert imported.returncode == 0 and "imported 6 events" in imported.stderr, imported
    assert checked.returncode == 0, checked
    assert rows(copy) == rows(log)
    store = SqliteStore(copy)
    await store.open()
    try:
        state = fold(await store.read(execution_of(log, "bob")))
    finally:
        await store.close()
    assert state is not None and state.status == "paused"


async def test_import_refuses_a_log_that_holds_events(log: Path, tmp_path: Path):
    """Importing into a used log changes nothing and exits 2 saying to use a new file."""
    export = tmp_path / "log.jsonl"
    await evflow("export", "--store", sqlite_url(log), "-o", str(export))
    before = rows(log)

    result = await evflow("import", "--store", sqlite_url(log), str(export))

    assert result.returncode == 2 and "import into a new file" in result.stderr, result
    assert rows(log) == before


async def test_import_refuses_a_broken_export_whole(log: Path, tmp_path: Path):
    """A broken chain anywhere in the file imports nothing at all and names the break."""
    export, copy = tmp_path / "log.jsonl", tmp_path / "copy.db"
    await evflow("export", "--store", sqlite_url(log), "-o", str(export))
    export.write_text(export.read_text().replace('"bob"', '"eve"'))

    result = await evflow("import", "--store", sqlite_url(copy), str(export))

    assert result.returncode == 2, result
    assert f"execution {execution_of(log, 'bob')} breaks at version 1" in result.stderr
    assert "nothing was imported" in result.stderr
    assert not copy.exists()


# logs written before the chain, and events stored in an older shape


def old_log(path: Path, history: str) -> list[dict]:
    """A log as evflow wrote it before hashes (two migrations), holding a golden history."""
    items = json.loads((HISTORIES / history).read_text())
    with closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for script in migrations.MIGRATIONS[:2]:
            db.executescript(script)
        db.execute("INSERT INTO schema_version VALUES (2)")
        for item in items:
            stamp = item["at"].replace("Z", "+00:00")
            db.execute(
                "INSERT INTO events (position, execution_id, version, type, schema_version, at,"
                " data) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    item["position"], item["execution_id"], item["version"],
                    item["event"]["type"], item["schema_version"], stamp,
                    events.encode(events.decode(json.dumps(item["event"]))).decode(),
                ),
            )  # fmt: skip
        db.commit()
    return items


async def test_opening_a_log_written_before_hashes_chains_it(tmp_path: Path):
    """The migration hashes old events exactly as they would have been hashed on append."""
    path = tmp_path / "old.db"
    items = old_log(path, "purchase_ordered.json")

    store = SqliteStore(path)
    await store.open()
    try:
        records = await store.records()
    finally:
        await store.close()

    assert [(r.prev_hash, r.hash) for r in records] == [(i["prev_hash"], i["hash"]) for i in items]
    result = await evflow("verify", "--store", sqlite_url(path))
    assert result.returncode == 0, result


async def test_an_event_in_an_older_shape_is_read_as_the_current_type(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """An upcaster lifts an old stored shape on read; the row and its hash stay as stored.

    No evflow event has changed shape yet, so the registry is empty and this test stands
    in a next schema version: one in which ``ExecutionFailed`` used to nest its error.
    """
    upcasters = Upcasters(current=SCHEMA_VERSION + 1)

    @upcasters.register("ExecutionFailed", SCHEMA_VERSION)
    def flatten_error(old: dict) -> dict:
        error = old.pop("error")
        return {**old, "error_type": error["type"], "message": error["message"]}

    monkeypatch.setattr(events, "UPCASTERS", upcasters)
    path = tmp_path / "log.db"
    old_shape = {"type": "ExecutionFailed", "error": {"type": "KeyError", "message": "'sku'"}}
    started = StoredEvent("e", 1, T0, ExecutionStarted("purchase", {"item": "desk"}), 0, 2)
    store = SqliteStore(path)
    await store.open()
    try:
        [first] = await store.append("e", 0, [started])
        write_as_an_older_evflow(path, first.hash, old_shape)
        history = await store.read("e")
        records = await store.records()
        checked = await audit.verify_store(store)
    finally:
        await store.close()

    assert history[1].event == ExecutionFailed("KeyError", "'sku'")
    assert history[1].schema_version == SCHEMA_VERSION
    assert fold(history).status == "failed"  # type: ignore[union-attr]
    assert json.loads(bytes(records[1].data)) == old_shape
    assert checked.intact, checked.breaks


def write_as_an_older_evflow(path: Path, prev_hash: str | None, data: dict) -> None:
    """Append version 2 of execution ``e`` at the old schema version, chained as on append."""
    at, body = "2026-03-01T12:00:01+00:00", json.dumps(data)
    digest = link_hash("e", 2, "ExecutionFailed", SCHEMA_VERSION, at, body, prev_hash)
    execute(
        path,
        "INSERT INTO events (execution_id, version, type, schema_version, at, data, prev_hash,"
        " hash) VALUES ('e', 2, 'ExecutionFailed', ?, ?, ?, ?, ?)",
        SCHEMA_VERSION, at, body, prev_hash, digest,
    )  # fmt: skip


async def test_events_an_older_evflow_appended_after_a_rollback_are_chained(log: Path):
    """Rolled back to an evflow without hashes, a deploy writes schema version 2 and appends
    unhashed events; the next open chains them after the hashed ones, which stay as they
    were."""
    before = rows(log)
    execution_id, version, at = before[-1][1], before[-1][2] + 1, before[-1][5]
    execute(log, "UPDATE schema_version SET version = 2")
    execute(
        log,
        "INSERT INTO events (execution_id, version, type, schema_version, at, data)"
        " VALUES (?, ?, 'ExecutionCancelled', 1, ?, ?)",
        execution_id, version, at, '{"type":"ExecutionCancelled","reason":"rollback"}',
    )  # fmt: skip

    store = SqliteStore(log)
    await store.open()
    await store.close()

    after = rows(log)
    assert after[: len(before)] == before
    assert after[-1][8:] == (
        before[-1][9],
        link_hash(execution_id, version, "ExecutionCancelled", 1, at, after[-1][6], before[-1][9]),
    )
    assert (await evflow("verify", "--store", sqlite_url(log))).returncode == 0


async def test_a_log_of_a_newer_evflow_is_refused_unchanged(log: Path):
    """A schema version this evflow does not know: opening refuses it and changes nothing."""
    execute(log, "UPDATE schema_version SET version = 99")
    before = log.read_bytes()

    with pytest.raises(StoreError, match="schema version 99, newer than"):
        await SqliteStore(log).open()
    result = await evflow("verify", "--store", sqlite_url(log))

    assert result.returncode == 2 and "schema version 99" in result.stderr, result
    assert log.read_bytes() == before


async def test_a_file_that_is_not_a_log_is_refused_without_hanging(tmp_path: Path):
    """Opening a file SQLite cannot read fails with a StoreError naming it, and the process
    ends (a connection left open kept it alive); import exits 2."""
    garbage, export = tmp_path / "garbage.db", tmp_path / "empty.jsonl"
    garbage.write_bytes(b"not a database, not at all" * 100)
    export.write_text("")
    opening = (
        "import asyncio, sys; from evflow.store.sqlite import SqliteStore\n"
        "try: asyncio.run(SqliteStore(sys.argv[1]).open())\n"
        "except Exception as error: print(error)"
    )

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", opening, str(garbage), stdout=asyncio.subprocess.PIPE
    )
    printed, _ = await asyncio.wait_for(process.communicate(), BOUND)
    result = await evflow("import", "--store", sqlite_url(garbage), str(export))

    assert b"cannot open the SQLite log" in printed and process.returncode == 0, printed
    assert result.returncode == 2 and "file is not a database" in result.stderr, result


async def test_a_kept_digest_shows_a_latest_event_cut_off(log: Path):
    """Deleting an execution's latest event leaves every chain whole; the digest kept from
    before, passed as --digest, shows the change: exit 1."""
    kept = verdict(await evflow("verify", "--store", sqlite_url(log), "--json"))["digest"]
    same = await evflow("verify", "--store", sqlite_url(log), "--digest", kept)
    ann = execution_of(log, "ann")
    execute(log, "DELETE FROM events WHERE execution_id = ? AND version = 4", ann)

    cut = await evflow("verify", "--store", sqlite_url(log), "--digest", kept)

    assert same.returncode == 0, same
    assert cut.returncode == 1 and "intact" in cut.stdout, cut
    assert f"the digest is not the expected {kept}" in cut.stderr


async def test_an_increment_appended_to_its_export_verifies_and_imports(log: Path, tmp_path: Path):
    """An export --since the last one, appended to it, is one whole export; alone it lacks
    the start of its chains."""
    whole, copy = tmp_path / "audit.jsonl", tmp_path / "copy.db"
    first = await evflow("export", "--store", sqlite_url(log), "-o", str(whole))
    last = first.stderr.split("--since ")[-1].strip()
    store = SqliteStore(log)
    await store.open()
    try:
        await Engine(app, store).invoke("approval", b'{"amount": 7, "requester": "lu"}')
    finally:
        await store.close()
    increment = tmp_path / "increment.jsonl"
    await evflow("export", "--store", sqlite_url(log), "--since", last, "-o", str(increment))
    with whole.open("a") as out:
        out.write(increment.read_text())

    checked = await evflow("verify", "--file", str(whole), "--json")
    imported = await evflow("import", "--store", sqlite_url(copy), str(whole))

    assert verdict(checked)["events"] == 8 and checked.returncode == 0, checked
    assert imported.returncode == 0 and rows(copy) == rows(log), imported


async def test_export_refuses_a_since_past_the_end_and_an_unwritable_file(
    log: Path, tmp_path: Path
):
    """Positions the log has not reached would be skipped later: exit 2; so does a file
    that cannot be written."""
    past = await evflow("export", "--store", sqlite_url(log), "--since", "1000")
    nowhere = await evflow("export", "--store", sqlite_url(log), "-o", str(tmp_path / "no/x"))

    assert past.returncode == 2 and "the log ends at position 6" in past.stderr, past
    assert nowhere.returncode == 2 and "cannot write the export" in nowhere.stderr, nowhere


async def test_a_refused_import_leaves_no_log_behind(log: Path, tmp_path: Path):
    """A broken export is refused before the log is touched: no file is created."""
    export, copy = tmp_path / "log.jsonl", tmp_path / "copy.db"
    await evflow("export", "--store", sqlite_url(log), "-o", str(export))
    export.write_text(export.read_text().replace('"bob"', '"eve"'))

    result = await evflow("import", "--store", sqlite_url(copy), str(export))

    assert result.returncode == 2, result
    assert not copy.exists()


async def test_a_file_in_the_wrong_order_is_found(log: Path, tmp_path: Path):
    """Lines of two executions swapped keep each chain whole, but positions go back."""
    copy = tmp_path / "log.jsonl"
    await evflow("export", "--store", sqlite_url(log), "-o", str(copy))
    lines = copy.read_text().splitlines(keepends=True)
    copy.write_text("".join(lines[:3] + [lines[4], lines[3]] + lines[5:]))

    result = await evflow("verify", "--file", str(copy))

    assert result.returncode == 1 and "records were reordered" in result.stdout, result


async def test_verify_finds_a_jetstream_log_where_evflow_nats_url_points(
    nats_server: NatsServer,
):
    """``--store jetstream`` names the log on the NATS servers the CLI is pointed at, as
    for the engine: ``EVFLOW_NATS_URL``, not always 127.0.0.1:4222."""
    store = JetStreamStore(nats_server.url)
    await store.open()
    try:
        await store.append("a", 0, [StoredEvent("a", 1, T0, ExecutionStarted("f", {}))])
    finally:
        await store.close()

    result = await evflow(
        "verify", "--store", "jetstream", "--json", env=cli_env(EVFLOW_NATS_URL=nats_server.url)
    )

    assert result.returncode == 0, result
    assert verdict(result)["events"] == 1
