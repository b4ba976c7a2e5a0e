"""Golden histories: every ``tests/histories/*.json`` folds to its expected state and replays.

A history is one execution's events as the log stores them. Each must decode as
``StoredEvent``s, fold to the state written down in ``EXPECTED`` (by hand, not read from
the file), encode back to the same JSON, and replay against the current
``examples.flows:app``: cut anywhere, the engine drives it on to exactly the recorded
history, never re-running a recorded step. The one recorded with older flow code must be
refused as non-determinism at operation 1 and left as it is.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import closing
from datetime import datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import examples.flows as example_flows
import msgspec
import pytest

from evflow import Engine, Finished, NondeterminismError, Status, fold
from evflow.events import (
    SCHEMA_VERSION,
    ExecutionCompleted,
    ExecutionPaused,
    ExecutionResumed,
    ExecutionStarted,
    StoredEvent,
    decode,
    encode,
)
from evflow.state import ExecutionState
from evflow.store.sqlite import SqliteStore

HISTORIES = Path(__file__).parent / "histories"
NONDETERMINISTIC = "purchase_older_code_nondeterministic.json"
FILES = sorted(path.name for path in HISTORIES.glob("*.json"))

EXPECTED: dict[str, dict[str, Any]] = {
    "approval_completed.json": {
        "flow": "approval",
        "status": Status.COMPLETED,
        "version": 4,
        "pause": None,
        "result": {"approved": True, "note": "fine"},
        "error": None,
        "steps": 0,
        "answered": (1,),
    },
    "approval_paused.json": {
        "flow": "approval",
        "status": Status.PAUSED,
        "version": 2,
        "pause": ("pause", 1),
        "result": None,
        "error": None,
        "steps": 0,
        "answered": (),
    },
    NONDETERMINISTIC: {
        "flow": "purchase",
        "status": Status.PAUSED,
        "version": 3,
        "pause": ("manager", 2),
        "result": None,
        "error": None,
        "steps": 1,
        "answered": (),
    },
    "purchase_ordered.json": {
        "flow": "purchase",
        "status": Status.COMPLETED,
        "version": 7,
        "pause": None,
        "result": {
            "status": "ordered",
            "cost_center": "R&D",
            "reservation": "budget-laptop-1499.00",
            "approved_at": "2026-03-02T09:00:12+00:00",
        },
        "error": None,
        "steps": 1,
        "answered": (1, 2),
    },
    "purchase_rejected.json": {
        "flow": "purchase",
        "status": Status.COMPLETED,
        "version": 4,
        "pause": None,
        "result": {"status": "rejected", "by": "erin"},
        "error": None,
        "steps": 0,
        "answered": (1,),
    },
}
"""What each history folds to, written down by hand."""

STEPS: dict[str, tuple[int, list[tuple[str, float]]]] = {
    "purchase_ordered.json": (6, [("laptop", 1499.0)]),
}
"""Histories recording ``reserve_budget``: the version of its StepCompleted, its arguments."""

REPLAYABLE = sorted(set(EXPECTED) - {NONDETERMINISTIC})
FINISHED = [name for name in REPLAYABLE if EXPECTED[name]["status"].finished]
CUTS = [(name, cut) for name in REPLAYABLE for cut in range(1, EXPECTED[name]["version"] + 1)]
"""Every history cut after every version: each prefix must replay to the whole."""

_decoder = msgspec.json.Decoder(list[StoredEvent])


def load(name: str) -> list[StoredEvent]:
    """A golden history, decoded."""
    return _decoder.decode((HISTORIES / name).read_bytes())


def summary(state: ExecutionState | None) -> dict[str, Any]:
    """The parts of a folded state that ``EXPECTED`` states."""
    assert state is not None
    return {
        "flow": state.flow,
        "status": state.status,
        "version": state.version,
        "pause": (state.pause.name, state.pause.sequence) if state.pause else None,
        "result": state.result,
        "error": (state.error.type, state.error.message) if state.error else None,
        "steps": state.steps,
        "answered": state.answered,
    }


def unplaced(events: list[StoredEvent]) -> list[StoredEvent]:
    """Events without their global position, which depends on what else the log holds."""
    return [msgspec.structs.replace(stored, position=0) for stored in events]


def canonical(value: Any) -> str:
    """JSON text independent of key order, but telling 1 from 1.0."""
    return json.dumps(value, sort_keys=True)


def body(**values: Any) -> bytes:
    """A JSON command body."""
    return json.dumps(values).encode()


class Ticker:
    """A clock one second past its previous reading, as the histories were recorded with."""

    def __init__(self, last: datetime) -> None:
        self.current = last

    def now(self) -> datetime:
        self.current += timedelta(seconds=1)
        return self.current


EngineOn = Callable[..., Awaitable[Engine]]
Notified = list[tuple[str, StoredEvent]]


@pytest.fixture
def notified() -> Notified:
    """Every event the engine of ``engine_on`` announced after an append, with its flow."""
    return []


@pytest.fixture
async def engine_on(tmp_path: Path, notified: Notified) -> AsyncIterator[EngineOn]:
    """Loads histories into a fresh SQLite log and builds an Engine for the example flows.

    The engine's clock ticks on from the last event loaded, so events it records get the
    times the recording gave them. Its notifications go to ``notified``.
    """

    def notify(flow: str, events: list[StoredEvent]) -> None:
        notified.extend((flow, stored) for stored in events)

    stores: list[SqliteStore] = []

    async def make(*histories: list[StoredEvent]) -> Engine:
        store = SqliteStore(tmp_path / f"evflow-{len(stores)}.db")
        await store.open()
        stores.append(store)
        for events in histories:
            await store.append(events[0].execution_id, 0, events)
        clock = Ticker(histories[-1][-1].at)
        return Engine(example_flows.app, store, clock=clock, notify=notify)

    yield make
    for store in stores:
        await store.close()


@pytest.fixture
def step_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, float]]:
    """Arguments of every live run of the example's ``reserve_budget`` step."""
    calls: list[tuple[str, float]] = []
    original = example_flows.reserve_budget

    def reserve_budget(item: str, amount: float) -> dict:
        calls.append((item, amount))
        return original(item, amount)

    monkeypatch.setattr(example_flows, "reserve_budget", reserve_budget)
    return calls


async def drive_on(engine: Engine, golden: list[StoredEvent]) -> None:
    """Drive a loaded prefix of ``golden`` on as the recording did, to its last version.

    A running execution is driven on by ``recover()``; a paused one is answered with the
    outputs ``golden`` records for that pause.
    """
    execution_id = golden[0].execution_id
    for _ in golden:
        state = await engine.get(execution_id)
        if state.version >= len(golden) or state.status.finished:
            return
        if state.status is Status.RUNNING:
            assert await engine.recover() == 1
            continue
        assert state.status is Status.PAUSED
        answer = golden[state.version].event
        assert isinstance(answer, ExecutionResumed)
        raw = json.dumps(answer.outputs).encode()
        await engine.resume(state.flow, execution_id, raw, pause=answer.sequence)


# The files: each decodes, folds to its expected state, and encodes back the same.


def test_every_history_has_an_expectation():
    """A history added without an entry in EXPECTED (or an entry without a file) fails."""
    assert FILES == sorted(EXPECTED)


@pytest.mark.parametrize("name", FILES)
def test_history_decodes_as_stored_events(name: str):
    """One execution, versions 1..n, the current schema, rising positions, 1 s per event."""
    events = load(name)

    assert events and all(type(stored) is StoredEvent for stored in events)
    assert len({stored.execution_id for stored in events}) == 1
    assert [stored.version for stored in events] == list(range(1, len(events) + 1))
    assert {stored.schema_version for stored in events} == {SCHEMA_VERSION}
    assert all(a.position < b.position for a, b in pairwise(events))
    assert all(stored.at.utcoffset() == timedelta(0) for stored in events)
    assert [b.at - a.at for a, b in pairwise(events)] == [timedelta(seconds=1)] * (len(events) - 1)
    assert isinstance(events[0].event, ExecutionStarted)


@pytest.mark.parametrize("name", FILES)
def test_history_folds_to_its_expected_state(name: str):
    """fold gives the status, version, pause, result and error written down for the file."""
    if name not in EXPECTED:
        pytest.fail(f"{name} has no entry in EXPECTED; write down the state it must fold to")

    assert summary(fold(load(name))) == EXPECTED[name]


@pytest.mark.parametrize("name", FILES)
def test_history_encodes_back_to_its_file(name: str):
    """Re-encoding the decoded events gives the file's JSON: the stored shape is stable."""
    raw = (HISTORIES / name).read_bytes()
    events = load(name)
    items = json.loads(raw)

    assert json.loads(msgspec.json.encode(events)) == items
    assert canonical(json.loads(msgspec.json.encode(events))) == canonical(items)
    assert [json.loads(encode(stored.event)) for stored in events] == [i["event"] for i in items]
    assert [decode(json.dumps(i["event"])) for i in items] == [s.event for s in events]


@pytest.mark.parametrize("name", FILES)
async def test_sqlite_rows_hold_the_history_as_json(name: str, engine_on: EngineOn):
    """Loaded into the log, each row's type, time, data and hashes say what the file says.

    The hashes in the files were computed when they were recorded: a change to how the log
    hashes an event would make every existing log fail ``evflow verify``, and fails here.
    """
    items = json.loads((HISTORIES / name).read_bytes())
    engine = await engine_on(load(name))
    path = engine.store.path  # type: ignore[attr-defined]

    with closing(sqlite3.connect(path)) as db:
        rows = db.execute(
            "SELECT execution_id, version, type, schema_version, at, data, prev_hash, hash"
            " FROM events ORDER BY position"
        ).fetchall()

    assert [
        (i["execution_id"], i["version"], i["event"]["type"], i["schema_version"]) for i in items
    ] == [row[:4] for row in rows]
    assert [datetime.fromisoformat(row[4]) for row in rows] == [
        datetime.fromisoformat(i["at"]) for i in items
    ]
    assert [json.loads(row[5]) for row in rows] == [i["event"] for i in items]
    assert [row[6:] for row in rows] == [(i["prev_hash"], i["hash"]) for i in items]


# Replay against the current example flows.


@pytest.mark.parametrize(("name", "cut"), CUTS, ids=[f"{n}-{c}" for n, c in CUTS])
async def test_history_prefix_replays_to_the_recorded_history(
    name: str,
    cut: int,
    engine_on: EngineOn,
    step_calls: list[tuple[str, float]],
    notified: Notified,
):
    """Cut after any version and driven on, a history grows back into the recorded one.

    The current flow code replays the prefix without divergence and records, live, the
    very events (times included) that the recording did; a step in the prefix is not run,
    and only the new events are announced.
    """
    golden = load(name)
    engine = await engine_on(golden[:cut])

    await drive_on(engine, golden)

    assert unplaced(await engine.history(golden[0].execution_id)) == unplaced(golden)
    version, arguments = STEPS.get(name, (0, []))
    assert step_calls == (arguments if cut < version else [])
    assert {flow for flow, _ in notified} <= {EXPECTED[name]["flow"]}
    assert unplaced([stored for _, stored in notified]) == unplaced(golden[cut:])


@pytest.mark.parametrize("name", REPLAYABLE)
async def test_recover_leaves_a_settled_history_unchanged(
    name: str, engine_on: EngineOn, step_calls: list[tuple[str, float]], notified: Notified
):
    """A paused or finished history is not driven by recover(), nor counted."""
    golden = load(name)
    engine = await engine_on(golden)

    assert await engine.recover() == 0

    stored = await engine.store.read_all()
    assert unplaced(stored) == unplaced(golden)
    assert [s.position for s in stored] == list(range(1, len(golden) + 1))
    assert step_calls == []
    assert notified == []


@pytest.mark.parametrize("name", FINISHED)
async def test_resume_of_a_finished_history_is_refused(
    name: str, engine_on: EngineOn, notified: Notified
):
    """A resume of a finished history is Finished (409), with its status; nothing appended."""
    golden = load(name)
    engine = await engine_on(golden)
    flow = EXPECTED[name]["flow"]

    with pytest.raises(Finished) as info:
        await engine.resume(flow, golden[0].execution_id, body(approved=True, note="late"))

    assert info.value.details == {"status": "completed", "version": len(golden)}
    assert unplaced(await engine.store.read_all()) == unplaced(golden)
    assert notified == []


async def test_paused_history_resumes_with_a_new_answer(engine_on: EngineOn, notified: Notified):
    """Answering the recorded pause appends ExecutionResumed, then the flow completes."""
    golden = load("approval_paused.json")
    execution_id = golden[0].execution_id
    engine = await engine_on(golden)

    state = await engine.resume(
        "approval", execution_id, body(approved=False, note="too much"), pause=1
    )

    assert state.status is Status.COMPLETED
    assert state.result == {"approved": False, "note": "too much"}
    history = await engine.history(execution_id)
    assert unplaced(history[:2]) == unplaced(golden)
    assert [stored.event for stored in history[2:]] == [
        ExecutionResumed(1, {"approved": False, "note": "too much"}),
        ExecutionCompleted({"approved": False, "note": "too much"}),
    ]
    assert [stored.version for stored in history] == [1, 2, 3, 4]
    assert [type(s.event) for s in history].count(ExecutionPaused) == 1
    assert [type(s.event) for s in history].count(ExecutionStarted) == 1
    assert [(flow, stored.version) for flow, stored in notified] == [
        ("approval", 3),
        ("approval", 4),
    ]


# The history recorded with older flow code.


async def test_older_code_history_resume_is_nondeterministic(
    engine_on: EngineOn, notified: Notified
):
    """Resuming it raises NondeterminismError at operation 1, and the log stays as it was."""
    golden = load(NONDETERMINISTIC)
    execution_id = golden[0].execution_id
    engine = await engine_on(golden)
    before = await engine.store.read_all()

    with pytest.raises(NondeterminismError) as info:
        await engine.resume("purchase", execution_id, body(approved=True, manager="gus"), pause=2)

    assert info.value.execution_id == execution_id
    assert info.value.details == {
        "sequence": 1,
        "recorded": "step check_stock",
        "issued": "pause manager",
    }
    assert "operation 1" in info.value.message
    assert await engine.store.read_all() == before
    assert unplaced(before) == unplaced(golden)
    assert notified == []


async def test_recover_neither_drives_nor_counts_the_paused_older_code_history(
    engine_on: EngineOn, caplog: pytest.LogCaptureFixture, notified: Notified
):
    """Paused, it is settled: recover() leaves it alone, reports nothing, counts nothing."""
    golden = load(NONDETERMINISTIC)
    engine = await engine_on(golden)

    with caplog.at_level(logging.INFO, logger="evflow.engine"):
        assert await engine.recover() == 0

    assert unplaced(await engine.store.read_all()) == unplaced(golden)
    assert [r.getMessage() for r in caplog.records if r.name == "evflow.engine"] == []
    assert notified == []


async def test_recover_skips_and_reports_the_older_code_history_cut_before_its_pause(
    engine_on: EngineOn, caplog: pytest.LogCaptureFixture, notified: Notified
):
    """Left running after its old step, it is reported at operation 1, left, and not counted.

    A running execution loaded after it is still driven on: one fault blocks no other.
    """
    bad = load(NONDETERMINISTIC)[:2]
    good = load("approval_completed.json")
    engine = await engine_on(bad, good[:3])

    with caplog.at_level(logging.ERROR, logger="evflow.engine"):
        assert await engine.recover() == 1

    assert unplaced(await engine.history(bad[0].execution_id)) == unplaced(bad)
    assert unplaced(await engine.history(good[0].execution_id)) == unplaced(good)
    reports = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(reports) == 1
    assert bad[0].execution_id in reports[0]
    assert "operation 1 is pause 'manager' in the code but step 'check_stock'" in reports[0]
    assert [(flow, stored.version) for flow, stored in notified] == [("approval", 4)]
