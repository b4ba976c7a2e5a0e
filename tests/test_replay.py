"""Replay checks: recorded histories replayed against the current flow code, writing nothing.

The histories are recorded by running ``replay_flows`` on a real engine and SQLite file with
a ``ManualClock``: a paused, a waiting, a shipped (with a wait), an expired, a failed, a
cancelled execution, and one a crash left running. They are then replayed against the same
code and against changed code, through ``evflow.replay`` and through ``evflow replay`` run
as a process. No step function may run during a replay, and the log must not change.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import examples.flows as example_flows
import msgspec
import pytest

import replay_flows
from evflow import App, Context, Engine, Status
from evflow.events import StoredEvent, TimerFired
from evflow.replay import (
    Summary,
    Verdict,
    execution_ids,
    replay_execution,
    replay_histories,
    replay_log,
)
from evflow.state import ExecutionState
from evflow.store import open_store
from evflow.store.sqlite import SqliteStore
from evflow.timers import ManualClock
from processes import Result, cli_env, evflow, sqlite_url
from replay_flows import build

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
TESTS = Path(__file__).resolve().parent
HISTORIES = TESTS / "histories"
RUNNING = "0" * 32
"""The execution a crash left running: the shipped one, cut after its timer fired."""


@dataclass
class Recorded:
    """A log holding one execution of each kind, and their IDs by kind."""

    path: Path
    ids: dict[str, str]

    @property
    def url(self) -> str:
        return sqlite_url(self.path)


def body(**values: Any) -> bytes:
    return json.dumps(values).encode()


async def until(engine: Engine, execution_id: str, status: Status) -> ExecutionState:
    """The state once the scheduler, running in the background, brought it to ``status``."""
    deadline = time.monotonic() + 20
    while (state := await engine.get(execution_id)).status is not status:
        assert time.monotonic() < deadline, f"still {state.status.value}: {state}"
        await _tick()
    return state


async def _tick() -> None:
    await asyncio.sleep(0.01)


async def record(engine: Engine, clock: ManualClock) -> dict[str, str]:
    """Run one execution of each kind; returns their IDs by kind."""
    ids: dict[str, str] = {}
    shipped = await engine.invoke("order", body(item="chair"))
    clock.advance(timedelta(minutes=5))
    await engine.resume("order", shipped.execution_id, body(ok=True))
    clock.advance(timedelta(hours=2))
    ids["shipped"] = (await until(engine, shipped.execution_id, Status.COMPLETED)).execution_id

    expired = await engine.invoke("order", body(item="sofa"))
    clock.advance(timedelta(days=1, seconds=1))
    ids["expired"] = (await until(engine, expired.execution_id, Status.COMPLETED)).execution_id
    ids["failed"] = (await engine.invoke("fragile", body(amount=12.5))).execution_id

    cancelled = await engine.invoke("order", body(item="rug"))
    await engine.cancel("order", cancelled.execution_id, reason="changed my mind")
    ids["cancelled"] = cancelled.execution_id
    ids["paused"] = (await engine.invoke("order", body(item="lamp"))).execution_id
    waiting = await engine.invoke("order", body(item="desk"))
    await engine.resume("order", waiting.execution_id, body(ok=True))
    ids["waiting"] = waiting.execution_id

    # A crash after the timer fired, before the flow ran on: the shipped history, cut there.
    history = await engine.history(ids["shipped"])
    cut = next(s.version for s in history if isinstance(s.event, TimerFired))
    copied = [msgspec.structs.replace(s, execution_id=RUNNING, position=0) for s in history]
    await engine.store.append(RUNNING, 0, copied[:cut])
    ids["running"] = RUNNING
    return ids


@pytest.fixture
async def recorded(tmp_path: Path) -> Recorded:
    """The log of ``record``, closed: no engine serves it."""
    path = tmp_path / "evflow.db"
    clock = ManualClock(T0)
    store = SqliteStore(path)
    await store.open()
    engine = Engine(build(), store, clock=clock)
    await engine.start()
    try:
        ids = await record(engine, clock)
    finally:
        await engine.stop()
        await store.close()
    replay_flows.CALLS.clear()
    return Recorded(path, ids)


@pytest.fixture
def no_calls() -> Iterator[None]:
    """Fails the test if a step function ran."""
    replay_flows.CALLS.clear()
    yield
    assert replay_flows.CALLS == [], "replay ran a step function"


async def replay_all(app: App, url: str, **options: Any) -> dict[str, Verdict]:
    """Every execution of the log replayed against ``app``, by execution ID."""
    store = await open_store(url, read_only=True)
    try:
        executions = await execution_ids(store, options.pop("flow", None))
        return {v.execution_id: v async for v in replay_log(app, store, executions, **options)}
    finally:
        await store.close()


def by_kind(recorded: Recorded, verdicts: dict[str, Verdict]) -> dict[str, Verdict]:
    return {kind: verdicts[execution_id] for kind, execution_id in recorded.ids.items()}


def where(verdict: Verdict) -> tuple[str, int | None, str | None, str | None]:
    return verdict.outcome, verdict.sequence, verdict.recorded, verdict.issued


# The same code: every history replays ok.


async def test_the_recording_code_replays_every_history_ok(recorded: Recorded, no_calls: None):
    """Each execution is ok, and says where it ended: the same pause, timer or end."""
    verdicts = by_kind(recorded, await replay_all(build(), recorded.url))

    assert {kind: v.outcome for kind, v in verdicts.items()} == dict.fromkeys(verdicts, "ok")
    assert {kind: v.status for kind, v in verdicts.items()} == {
        "shipped": "completed",
        "expired": "completed",
        "failed": "failed",
        "cancelled": "cancelled",
        "paused": "paused",
        "waiting": "waiting",
        "running": "running",
    }
    assert verdicts["paused"].message == (
        "replays all 2 operations and waits at pause 'approve' (operation 2), as recorded"
    )
    assert verdicts["waiting"].message == (
        "replays all 3 operations and waits at the timer of operation 3, as recorded"
    )
    assert "completes with the recorded result" in verdicts["shipped"].message
    assert "fails as recorded (failed StepError: step 'charge' raised ValueError: card" in (
        verdicts["failed"].message
    )
    assert verdicts["running"].past_end == "step ship"
    assert "goes on with step 'ship' (not run)" in verdicts["running"].message
    assert verdicts["cancelled"].past_end is None
    assert all(v.sequence is None and v.recorded is None for v in verdicts.values())


async def test_replays_side_by_side_keep_the_order_of_the_log(recorded: Recorded):
    """Executions replay a window at a time; the verdicts still come in log order, and a
    window's size changes none of them."""
    store = await open_store(recorded.url, read_only=True)
    try:
        executions = await execution_ids(store)
        one_by_one = [v async for v in replay_log(build(), store, executions, window=1)]
        in_threes = [v async for v in replay_log(build(), store, executions, window=3)]
    finally:
        await store.close()

    assert [v.execution_id for v in in_threes] == executions
    assert in_threes == one_by_one


async def test_replay_reproduces_recorded_times_without_waiting(recorded: Recorded, no_calls: None):
    """The shipped result holds ctx.now() before the pause and after a two-hour wait; the
    replay returns it equal, in well under the wait, so it read the recorded times."""
    started = time.monotonic()
    verdicts = by_kind(recorded, await replay_all(build(), recorded.url))

    assert time.monotonic() - started < 10
    assert verdicts["shipped"].outcome == "ok"
    store = await open_store(recorded.url, read_only=True)
    try:
        history = await store.read(recorded.ids["shipped"])
    finally:
        await store.close()
    result = history[-1].event.result  # type: ignore[union-attr]
    assert result["reserved_at"] == T0.isoformat()
    assert datetime.fromisoformat(result["at"]) >= T0 + timedelta(hours=2, minutes=5)


# Changed code: the first divergence, with its sequence and both operations.


async def test_a_step_inserted_before_the_pause_diverges_there(recorded: Recorded, no_calls: None):
    """Operation 2 was the pause; the code now issues step audit there, and does not run it."""
    verdicts = by_kind(recorded, await replay_all(build("inserted"), recorded.url))

    for kind in ("shipped", "expired", "cancelled", "paused", "waiting", "running"):
        assert where(verdicts[kind]) == ("diverged", 2, "pause approve", "step audit"), kind
    assert verdicts["paused"].execution_id in verdicts["paused"].message
    assert "operation 2" in verdicts["paused"].message
    assert verdicts["failed"].outcome == "ok"


async def test_a_renamed_step_diverges_at_operation_one(recorded: Recorded, no_calls: None):
    verdicts = by_kind(recorded, await replay_all(build("renamed"), recorded.url))

    assert where(verdicts["paused"]) == ("diverged", 1, "step reserve", "step book")
    assert where(verdicts["shipped"]) == ("diverged", 1, "step reserve", "step book")


async def test_another_result_diverges_at_the_end(recorded: Recorded, no_calls: None):
    """A completed history whose code now returns another result diverges one past its last
    operation; a history ending elsewhere (declined, or not yet ended) stays ok."""
    verdicts = by_kind(recorded, await replay_all(build("reworded"), recorded.url))

    outcome, sequence, was, now = where(verdicts["shipped"])
    assert (outcome, sequence) == ("diverged", 5)
    assert was is not None and now is not None
    assert was.startswith('completed {"status":"shipped","shipment":"s-chair"')
    assert now.startswith('completed {"status":"sent","shipment":"s-chair"')
    assert verdicts["expired"].outcome == "ok"
    assert verdicts["waiting"].outcome == "ok"
    assert verdicts["running"].outcome == "ok"


async def test_a_step_past_a_completed_history_diverges_and_does_not_run(
    recorded: Recorded, no_calls: None
):
    """The code goes on with step invoice after the recorded end: diverged at operation 5.
    A history still running past its end reports the step it would run, and runs none."""
    verdicts = by_kind(recorded, await replay_all(build("invoiced"), recorded.url))

    assert where(verdicts["shipped"])[:2] == ("diverged", 5)
    assert verdicts["shipped"].issued == "step invoice"
    assert verdicts["shipped"].recorded.startswith("completed {")  # type: ignore[union-attr]
    assert verdicts["running"].outcome == "ok"
    assert verdicts["running"].past_end == "step ship"


async def test_code_ending_before_the_recorded_pause_diverges(recorded: Recorded, no_calls: None):
    verdicts = by_kind(recorded, await replay_all(build("short"), recorded.url))

    assert where(verdicts["paused"]) == ("diverged", 2, "pause approve", "completed")


async def test_code_that_raises_where_the_history_goes_on_is_an_error(
    recorded: Recorded, no_calls: None
):
    """The exception, and the line of flow code that raised it, are reported."""
    verdicts = by_kind(recorded, await replay_all(build("crashing"), recorded.url))

    waiting = verdicts["waiting"]
    assert where(waiting) == ("error", 3, "wait", "failed KeyError: 'approved'")
    assert "raised KeyError: 'approved' (replay_flows.py:" in waiting.message
    assert where(verdicts["expired"])[:3] == ("error", 3, 'completed {"status":"declined"}')
    assert verdicts["paused"].outcome == "ok"
    assert verdicts["cancelled"].outcome == "ok"


async def test_code_waiting_on_asyncio_is_an_error_after_the_timeout(
    recorded: Recorded, no_calls: None
):
    store = await open_store(recorded.url, read_only=True)
    try:
        history = await store.read(recorded.ids["paused"])
    finally:
        await store.close()

    verdict = await replay_execution(build("dawdling"), history, timeout=0.2)

    assert verdict.outcome == "error"
    assert "did not reach its next operation within 0.2 s" in verdict.message


async def test_a_window_that_times_out_is_replayed_again_one_at_a_time(
    recorded: Recorded, no_calls: None
):
    """One timer bounds a window of replays; when it fires, each is replayed alone under its
    own, and verdicts given in place of histories are kept where they stood."""
    store = await open_store(recorded.url, read_only=True)
    try:
        history = await store.read(recorded.ids["paused"])
        fragile = await store.read(recorded.ids["failed"])  # a flow that does not dawdle
    finally:
        await store.close()
    unreadable = Verdict("x", "", 0, "error", None, 0, "cannot be read")

    verdicts = await replay_histories(
        build("dawdling"), [unreadable, history, fragile], timeout=0.2
    )

    assert verdicts[0] is unreadable
    assert verdicts[1].outcome == "error"
    assert "did not reach its next operation within 0.2 s" in verdicts[1].message
    assert verdicts[2].outcome == "ok", verdicts[2].message


async def test_recorded_inputs_the_code_refuses_diverge(recorded: Recorded, no_calls: None):
    """The code now wants an int where the execution was invoked with a string."""
    app = App()

    @app.flow("order")
    async def order(ctx: Context, item: int) -> dict:
        return {}

    verdicts = await replay_all(app, recorded.url, flow="order")
    paused = verdicts[recorded.ids["paused"]]

    assert {v.outcome for v in verdicts.values()} == {"diverged"}
    assert "the recorded inputs no longer fit the flow code" in paused.message


async def test_a_history_that_does_not_fold_is_an_error(recorded: Recorded):
    store = await open_store(recorded.url, read_only=True)
    try:
        history = await store.read(recorded.ids["paused"])
    finally:
        await store.close()

    verdict = await replay_execution(build(), history[1:])

    assert (verdict.outcome, verdict.status) == ("error", None)
    assert "the history does not fold" in verdict.message


# Flows the app does not register.


async def test_a_flow_or_version_the_app_lacks_is_unknown_flow(recorded: Recorded):
    missing = by_kind(recorded, await replay_all(build(order=False), recorded.url))
    other = by_kind(recorded, await replay_all(build(version=2), recorded.url))

    assert missing["paused"].outcome == "unknown_flow"
    assert "flow 'order', which the app does not register" in missing["paused"].message
    assert missing["failed"].outcome == "ok"
    assert other["paused"].outcome == "unknown_flow"
    assert "started on version 1 of flow 'order'" in other["paused"].message
    assert "the app registers v2" in other["paused"].message


async def test_each_execution_replays_on_the_version_it_started_on(
    recorded: Recorded, no_calls: None
):
    """With a changed version 2 registered beside version 1, every history recorded on
    version 1 is checked against version 1's code, and passes."""
    app = build()
    app.flow("order", version=2)(build("inserted").get("order").fn)

    verdicts = await replay_all(app, recorded.url)

    assert {v.outcome for v in verdicts.values()} == {"ok"}, verdicts
    assert app.get("order").version == 2


async def test_flow_option_replays_only_that_flow(recorded: Recorded):
    verdicts = await replay_all(build(order=False), recorded.url, flow="fragile")

    assert list(verdicts) == [recorded.ids["failed"]]


def test_summary_passes_only_when_every_execution_is_ok():
    summary = Summary()
    ok = Verdict("a", "f", 1, "ok", "paused", 2, "fine")
    for outcome in ("ok", "diverged", "unknown_flow", "error"):
        summary.add(msgspec.structs.replace(ok, outcome=outcome))

    assert (summary.executions, summary.ok, summary.diverged) == (4, 1, 1)
    assert (summary.unknown_flow, summary.error, summary.passed) == (1, 1, False)


# The golden histories against the example flows.


@pytest.mark.parametrize("path", sorted(HISTORIES.glob("*.json")), ids=lambda p: p.stem)
async def test_golden_histories_replay_against_the_example_flows(path: Path):
    history = msgspec.json.decode(path.read_bytes(), type=list[StoredEvent])

    verdict = await replay_execution(example_flows.app, history)

    if "nondeterministic" in path.name:
        assert where(verdict) == ("diverged", 1, "step check_stock", "pause manager")
    else:
        assert verdict.outcome == "ok", verdict.message


# The command, run as a process.


def calls_env(tmp_path: Path) -> dict[str, str]:
    return cli_env(PYTHONPATH=str(TESTS), EVFLOW_TEST_CALLS=str(tmp_path / "calls"))


def snapshot(path: Path) -> tuple[str, str, int, int]:
    """Digests of the log file and its WAL, its row count and its highest position."""
    wal = path.with_name(path.name + "-wal")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    wal_digest = hashlib.sha256(wal.read_bytes() if wal.exists() else b"").hexdigest()
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows, last = db.execute("SELECT count(*), max(position) FROM events").fetchone()
    return digest, wal_digest, rows, last


async def replay_cli(store: str, app: str, *args: str, env: dict[str, str]) -> Result:
    return await evflow("replay", "--app", app, "--store", store, *args, env=env)


async def test_cli_exits_0_when_all_replay_and_writes_nothing(recorded: Recorded, tmp_path: Path):
    """One line per execution and a summary; the log's bytes and rows are unchanged, and no
    step function ran in the process."""
    before = snapshot(recorded.path)

    result = await replay_cli(recorded.url, "replay_flows:app", env=calls_env(tmp_path))

    assert result.returncode == 0, result
    assert len(result.lines) == len(recorded.ids) + 1
    assert all(line.startswith("ok ") for line in result.lines[:-1])
    assert result.lines[-1] == "7 executions: 7 ok, 0 diverged, 0 unknown flow, 0 error"
    assert snapshot(recorded.path) == before
    assert not (tmp_path / "calls").exists()


async def test_cli_replays_a_copy_made_by_export_and_import(recorded: Recorded, tmp_path: Path):
    """An auditor's copy, exported and imported into a new file, replays as the log does,
    and a changed flow diverges on the copy too."""
    export, copy = tmp_path / "log.jsonl", sqlite_url(tmp_path / "copy.db")
    assert (await evflow("export", "--store", recorded.url, "-o", str(export))).returncode == 0
    assert (await evflow("import", "--store", copy, str(export))).returncode == 0

    same = await replay_cli(copy, "replay_flows:app", env=calls_env(tmp_path))
    changed = await replay_cli(copy, "replay_flows:inserted", env=calls_env(tmp_path))

    assert same.returncode == 0, same
    assert same.lines[-1] == "7 executions: 7 ok, 0 diverged, 0 unknown flow, 0 error"
    assert changed.returncode == 1, changed


async def test_cli_reports_a_damaged_history_as_an_error_and_goes_on(
    recorded: Recorded, tmp_path: Path
):
    """An event that no longer reads fails its execution alone, with a clear line, and the
    other executions are still checked."""
    damaged = recorded.ids["paused"]
    with closing(sqlite3.connect(recorded.path)) as db:
        db.execute(
            "UPDATE events SET data = '{' WHERE execution_id = ? AND version = 2", (damaged,)
        )
        db.commit()

    result = await replay_cli(recorded.url, "replay_flows:app", env=calls_env(tmp_path))

    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.lines if damaged in line]
    assert line.startswith("ERROR") and "run evflow verify" in line, line
    assert result.lines[-1] == "7 executions: 6 ok, 0 diverged, 0 unknown flow, 1 error"


async def test_cli_exits_1_on_a_divergence_and_says_where(recorded: Recorded, tmp_path: Path):
    before = snapshot(recorded.path)

    result = await replay_cli(recorded.url, "replay_flows:inserted", env=calls_env(tmp_path))

    assert result.returncode == 1, result
    paused = next(line for line in result.lines if recorded.ids["paused"] in line)
    assert paused == (
        f"DIVERGED {recorded.ids['paused']} order v1: at operation 2 the history records "
        "pause 'approve', the code issues step 'audit'"
    )
    assert "7 executions: 1 ok, 6 diverged, 0 unknown flow, 0 error" in result.lines
    assert snapshot(recorded.path) == before
    assert not (tmp_path / "calls").exists()


async def test_cli_json_lines_and_one_execution(recorded: Recorded, tmp_path: Path):
    execution_id = recorded.ids["paused"]

    result = await replay_cli(
        recorded.url, "replay_flows:renamed", "--execution", execution_id, "--json",
        env=calls_env(tmp_path),
    )  # fmt: skip

    assert result.returncode == 1, result
    first, summary = (json.loads(line) for line in result.lines)
    assert first["execution_id"] == execution_id
    assert (first["outcome"], first["sequence"], first["recorded"], first["issued"]) == (
        "diverged", 1, "step reserve", "step book",
    )  # fmt: skip
    assert summary == {
        "summary": {"executions": 1, "ok": 0, "diverged": 1, "unknown_flow": 0, "error": 0}
    }


async def test_cli_unknown_flow_fails(recorded: Recorded, tmp_path: Path):
    result = await replay_cli(recorded.url, "replay_flows:without_order", env=calls_env(tmp_path))

    assert result.returncode == 1, result
    assert "7 executions: 1 ok, 0 diverged, 6 unknown flow, 0 error" in result.lines
    assert any(line.startswith("UNKNOWN FLOW ") for line in result.lines)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--execution", "nope"), ("no execution nope in the log",)),
        (("--execution", "x", "--flow", "order"), ("--execution or --flow, not both",)),
        (("--flow", "ordr"), ("the app registers no flow 'ordr'", "order v1")),
    ],
)
async def test_cli_refusals_exit_2(recorded: Recorded, tmp_path: Path, args, words):
    before = snapshot(recorded.path)

    result = await replay_cli(recorded.url, "replay_flows:app", *args, env=calls_env(tmp_path))

    assert result.returncode == 2, result
    assert result.stdout == "" and "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr
    assert snapshot(recorded.path) == before


async def test_cli_refuses_a_missing_store_and_creates_none(tmp_path: Path):
    path = tmp_path / "absent" / "evflow.db"

    result = await replay_cli(sqlite_url(path), "replay_flows:app", env=calls_env(tmp_path))

    assert result.returncode == 2, result
    assert f"there is no SQLite log at {path}" in result.stderr
    assert not path.parent.exists()


async def test_cli_replays_a_log_an_engine_is_serving(tmp_path: Path):
    """With an engine holding the log open, replay reads it; the engine goes on writing."""
    path = tmp_path / "evflow.db"
    store = SqliteStore(path)
    await store.open()
    engine = Engine(build(), store, clock=ManualClock(T0))
    try:
        paused = await engine.invoke("order", body(item="lamp"))
        env = calls_env(tmp_path)

        first = await replay_cli(sqlite_url(path), "replay_flows:app", env=env)
        declined = await engine.resume("order", paused.execution_id, body(ok=False))
        second = await replay_cli(sqlite_url(path), "replay_flows:app", env=env)
    finally:
        await store.close()

    assert first.returncode == 0 and second.returncode == 0, (first, second)
    assert "waits at pause 'approve' (operation 2)" in first.stdout
    assert declined.status is Status.COMPLETED
    assert "completes with the recorded result" in second.stdout
    assert replay_flows.CALLS == ["reserve"]  # the engine's own run, none from the replays
    assert not (tmp_path / "calls").exists()


async def test_flow_code_that_waits_briefly_on_asyncio_replays_in_a_task_of_its_own(
    tmp_path: Path,
):
    """Replay runs flow code inline until it first waits; code that waits on something
    other than its Context goes on in a task, with what it awaited, results and errors."""
    app = App()

    @app.flow("nap")
    async def nap(ctx: Context, fail: bool) -> dict:
        await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        if fail:
            raise ValueError("woke up wrong")
        answer = await ctx.pause(outputs={"ok": bool})
        return {"ok": answer["ok"]}

    store = SqliteStore(tmp_path / "nap.db")
    await store.open()
    try:
        engine = Engine(app, store, clock=ManualClock(T0))
        paused = await engine.invoke("nap", b'{"fail": false}')
        failed = await engine.invoke("nap", b'{"fail": true}')
        histories = [await store.read(s.execution_id) for s in (paused, failed)]
    finally:
        await store.close()

    verdicts = await replay_histories(app, histories, timeout=5)

    assert [v.outcome for v in verdicts] == ["ok", "ok"]
    assert "waits at pause 'pause'" in verdicts[0].message
    assert "fails as recorded (failed ValueError: woke up wrong)" in verdicts[1].message


async def test_flow_code_that_bounds_its_own_waits_replays_without_cancelling_the_replay(
    tmp_path: Path,
):
    """Flow code may arm ``asyncio.timeout`` or open a ``TaskGroup``: both act on the task
    the code runs in. Replay starts code inline, in its own task; code that waits elsewhere
    starts again in a task of its own, so its timer and its group cancel that task, never
    the replay."""
    app = App()

    @app.flow("patient")
    async def patient(ctx: Context) -> str:
        try:
            async with asyncio.timeout(0.05):
                await asyncio.sleep(5)  # a slow lookup, bounded
        except TimeoutError:
            pass
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(asyncio.sleep(5))
                group.create_task(_fail_soon())
        except* ValueError:
            pass
        answer = await ctx.pause(outputs={"ok": bool})
        return "yes" if answer["ok"] else "no"

    store = SqliteStore(tmp_path / "patient.db")
    await store.open()
    try:
        engine = Engine(app, store, clock=ManualClock(T0), hot_executions=0)
        paused = await engine.invoke("patient", b"{}")
        history = await store.read(paused.execution_id)
    finally:
        await store.close()

    alone = await replay_execution(app, history, timeout=5)
    side_by_side = await replay_histories(app, [history, history], timeout=5)

    assert [v.outcome for v in (alone, *side_by_side)] == ["ok"] * 3, alone.message


async def _fail_soon() -> None:
    await asyncio.sleep(0.01)
    raise ValueError("a lookup failed")
