"""The fault-injection harness: load through both interfaces while processes are killed.

An ``evflow serve`` process serves ``fault_flows:app``. Clients invoke and resume through
requests and through durable intake, remembering every command the engine or the stream
acknowledged. Meanwhile the engine is SIGKILLed at random instants and restarted, and now
and then the nats-server is SIGKILLed and restarted instead. At the end a clean engine
drains everything, every paused execution is resumed, and the invariants are checked from
the log, the stream and the step traces alone (see ``check``).

``tests/test_faults.py`` runs it in CI; ``ops/faults`` runs it longer.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.js import api as js_api

from evflow import Client, Conflict, EvflowError, Expired
from evflow.messages import Completed, Paused
from evflow.nats_server import NatsServer

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
READY = "listening on"
BOUND = 30.0
"""Seconds any single wait of the harness may take before it counts as a failure."""


class HarnessError(AssertionError):
    """The harness could not drive the processes (not an invariant violation)."""


def evflow_command() -> list[str]:
    """The ``evflow`` console script of the running Python."""
    script = Path(sys.executable).parent / "evflow"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from evflow.cli import main; main()"]


class EngineProcess:
    """An ``evflow serve`` child on the shared log, its output appended to one file."""

    def __init__(self, nats_url: str, store: Path, fault_dir: Path, name: str = "engine"):
        self.nats_url = nats_url
        self.store = store
        self.fault_dir = fault_dir
        self.output = fault_dir / f"{name}.log"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start it and wait until it takes commands."""
        offset = self.output.stat().st_size if self.output.exists() else 0
        env = dict(os.environ)
        env.update(
            PYTHONPATH=str(TESTS),
            EVFLOW_FAULT_DIR=str(self.fault_dir),
            EVFLOW_FAULT_LOG=str(self.store),
        )
        with self.output.open("ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                *evflow_command(), "serve", "--app", "fault_flows:app",
                "--nats", self.nats_url, "--store", f"sqlite:///{self.store}",
                "--command-ack-wait", "1s", "--shutdown-timeout", "5s",
                cwd=ROOT, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
            )  # fmt: skip
        deadline = time.monotonic() + BOUND
        while READY not in self._output_since(offset):
            if self.process.returncode is not None or time.monotonic() > deadline:
                raise HarnessError(f"the engine did not start:\n{self._output_since(offset)}")
            await asyncio.sleep(0.02)

    def _output_since(self, offset: int) -> str:
        with self.output.open("rb") as out:
            out.seek(offset)
            return out.read().decode(errors="replace")

    async def kill(self) -> None:
        """SIGKILL it, as a crash would."""
        assert self.process is not None
        self.process.kill()
        await self.process.wait()
        self.process = None

    async def terminate(self) -> int:
        """SIGTERM it and return its exit code."""
        assert self.process is not None
        self.process.terminate()
        try:
            code = await asyncio.wait_for(self.process.wait(), BOUND)
        except TimeoutError:
            raise HarnessError(f"the engine ignored SIGTERM for {BOUND:g} s") from None
        self.process = None
        return code


@dataclass
class Ledger:
    """What the clients were told: every command acknowledged, by idempotency key."""

    invokes: dict[str, str] = field(default_factory=dict)
    """Invoke key to execution ID, for invokes answered by a reply."""
    resumes: dict[str, str] = field(default_factory=dict)
    """Resume key to execution ID, for resumes answered by a reply."""
    durable_invokes: set[str] = field(default_factory=set)
    """Invoke keys the commands stream acknowledged."""
    durable_resumes: dict[str, str] = field(default_factory=dict)
    """Resume key to execution ID, for resumes the commands stream acknowledged."""
    failures: Counter[str] = field(default_factory=Counter)
    """Attempts that got no acknowledgement, by error type (expected while processes die)."""
    conflicts: Counter[str] = field(default_factory=Counter)
    """Resumes of ``timed`` refused by where the execution stood (not paused yet, expired)."""


class Log:
    """Read-only look-ups in the SQLite log, from a thread so the event loop keeps going."""

    def __init__(self, path: Path):
        self.path = path

    async def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        return await asyncio.to_thread(self._query, sql, params)

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        if not self.path.exists():
            return []
        with sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10) as db:
            rows = db.execute(sql, params).fetchall()
        db.close()
        return rows

    async def execution_of(self, invoke_key: str) -> str | None:
        rows = await self.query(
            "SELECT execution_id FROM events WHERE idempotency_scope = ?",
            f"invoke/order/{invoke_key}",
        )
        return rows[0][0] if rows else None

    async def last_type(self, execution_id: str) -> str | None:
        rows = await self.query(
            "SELECT type FROM events WHERE execution_id = ? ORDER BY version DESC LIMIT 1",
            execution_id,
        )
        return rows[0][0] if rows else None


def flow_of_key(key: str) -> str:
    """The flow an invoke key was used on: requesters mark ``timed`` invokes with ``tm-``."""
    return "timed" if key.startswith("tm-") else "order"


class Load:
    """Clients invoking and resuming ``order`` through requests and durable intake, and
    ``timed`` through requests."""

    def __init__(self, nc: NATS, log: Log, ledger: Ledger, rng: random.Random):
        self.client = Client(nc, timeout=3.0)
        self.log = log
        self.ledger = ledger
        self.rng = rng
        self.stopping = asyncio.Event()

    async def run(self, requesters: int, publishers: int) -> None:
        workers = [self._requester(n) for n in range(requesters)]
        workers += [self._publisher(n) for n in range(publishers)]
        await asyncio.gather(*workers)

    async def _requester(self, worker: int) -> None:
        while not self.stopping.is_set():
            if self.rng.random() < 0.3:
                await self._timed(worker)
                continue
            key = f"rr-{worker}-{uuid.uuid4().hex[:12]}"
            body = {"n": self.rng.randrange(1000)}
            reply = await self._until_acked(self.client.invoke, "order", body, key)
            if reply is None:
                continue
            self.ledger.invokes[key] = reply.execution_id
            if not isinstance(reply, Paused) or self.rng.random() < 0.2:
                continue  # leave some paused for the end, as real users do
            answer = {"ok": self.rng.random() < 0.8}
            resumed = await self._until_acked(
                self.client.resume, "order", reply.execution_id, answer, f"{key}-r"
            )
            if resumed is not None:
                self.ledger.resumes[f"{key}-r"] = reply.execution_id

    async def _timed(self, worker: int) -> None:
        """Invoke ``timed``, then perhaps answer its pause before the deadline does."""
        key = f"tm-{worker}-{uuid.uuid4().hex[:12]}"
        body = {
            "n": self.rng.randrange(1000),
            "wait_ms": self.rng.randrange(0, 400),
            "expire_ms": self.rng.randrange(50, 1500),
        }
        reply = await self._until_acked(self.client.invoke, "timed", body, key)
        if reply is None:
            return
        self.ledger.invokes[key] = reply.execution_id
        await asyncio.sleep(self.rng.uniform(0, 0.8))
        resumed = await self._until_acked(
            self.client.resume, "timed", reply.execution_id, {"ok": True}, f"{key}-r"
        )
        if resumed is not None:
            self.ledger.resumes[f"{key}-r"] = reply.execution_id

    async def _publisher(self, worker: int) -> None:
        while not self.stopping.is_set():
            key = f"js-{worker}-{uuid.uuid4().hex[:12]}"
            body = {"n": self.rng.randrange(1000)}
            sequence = await self._until_acked(self.client.publish_invoke, "order", body, key)
            if sequence is None:
                continue
            self.ledger.durable_invokes.add(key)
            execution_id = await self._paused_execution(key)
            if execution_id is None:
                continue
            resumed = await self._until_acked(
                self.client.publish_resume, "order", execution_id, {"ok": True}, f"{key}-r"
            )
            if resumed is not None:
                self.ledger.durable_resumes[f"{key}-r"] = execution_id

    async def _paused_execution(self, key: str, wait: float = 3.0) -> str | None:
        """The execution a durable invoke started, once it is paused; None if not in time."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not self.stopping.is_set():
            execution_id = await self.log.execution_of(key)
            if execution_id and await self.log.last_type(execution_id) == "ExecutionPaused":
                return execution_id
            await asyncio.sleep(0.05)
        return None

    async def _until_acked(self, send: Any, *args: Any, attempts: int = 5) -> Any:
        """``send(*args, idempotency_key=key)`` until acknowledged; None when it never was.

        A conflict (the timed flow's pause not reached yet, or expired) is an answer, not a
        fault: it is not retried.
        """
        *args, key = args
        for _ in range(attempts):
            if self.stopping.is_set():
                return None
            try:
                return await send(*args, idempotency_key=key)
            except Conflict as refused:
                self.ledger.conflicts[refused.code] += 1
                return None
            except (EvflowError, nats.errors.Error, OSError, TimeoutError) as error:
                self.ledger.failures[type(error).__name__] += 1
                await asyncio.sleep(0.05 + self.rng.random() * 0.2)
        return None


@dataclass
class Report:
    """What a run did and found."""

    seed: int
    engine_kills: int = 0
    nats_kills: int = 0
    seconds: float = 0.0
    executions: int = 0
    events: int = 0
    notifications: int = 0
    acknowledged: dict[str, int] = field(default_factory=dict)
    failed_attempts: dict[str, int] = field(default_factory=dict)
    step_runs: int = 0
    steps_recorded: int = 0
    steps_run_again: int = 0
    timers_started: int = 0
    timers_fired: int = 0
    """Timers ended by firing (waits woken, pauses expired), not by a resume."""
    conflicts: dict[str, int] = field(default_factory=dict)
    recorded_steps_run_again: list[str] = field(default_factory=list)
    """Step calls made although the log already held the step's result (key and pid)."""
    violations: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        acked = ", ".join(f"{k} {v}" for k, v in self.acknowledged.items())
        failed = ", ".join(f"{k} {v}" for k, v in self.failed_attempts.items()) or "none"
        return [
            f"seed {self.seed}: {self.engine_kills} engine SIGKILLs, {self.nats_kills} "
            f"nats-server SIGKILLs in {self.seconds:.0f} s",
            f"acknowledged commands: {acked}",
            f"attempts without acknowledgement (retried with the same key): {failed}",
            f"log: {self.executions} executions, {self.events} events; EVFLOW_EVENTS: "
            f"{self.notifications} notifications",
            f"steps: {self.steps_recorded} recorded, {self.step_runs} function calls, "
            f"{self.steps_run_again} run again after a kill cut them short (at least once); "
            "keyed effects done once each",
            f"timers: {self.timers_started} started, {self.timers_fired} fired (the rest "
            "answered by a resume first); each ended once",
            f"timed resumes refused by where the execution stood: {self.conflicts or 'none'}",
            f"recorded steps called again: {len(self.recorded_steps_run_again)}",
            f"violations: {len(self.violations)}",
            *(f"  {v}" for v in self.violations[:50]),
        ]


async def run_faults(
    nats_server: NatsServer,
    work: Path,
    *,
    kills: int,
    nats_kill_every: int = 10,
    seed: int | None = None,
    requesters: int = 6,
    publishers: int = 3,
    engines: int = 1,
) -> Report:
    """Run the load through ``kills`` crashes, then check every invariant.

    With ``engines`` above one, that many engine processes share the log file and the
    commands, and each round kills one of them.
    """
    seed = seed if seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    report = Report(seed=seed)
    (work / "effects").mkdir(parents=True, exist_ok=True)
    store = work / "evflow.db"
    fleet = [EngineProcess(nats_server.url, store, work, f"engine-{n}") for n in range(engines)]
    ledger = Ledger()
    began = time.monotonic()

    nc = await nats.connect(
        nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1,
        error_cb=_quiet, disconnected_cb=_nothing, closed_cb=_nothing,
    )  # fmt: skip
    try:
        for engine in fleet:
            await engine.start()
        load = Load(nc, Log(store), ledger, rng)
        traffic = asyncio.create_task(load.run(requesters, publishers))
        for round_ in range(1, kills + 1):
            await asyncio.sleep(rng.uniform(0.05, 0.8))
            if nats_kill_every and round_ % nats_kill_every == 0:
                await _crash_nats(nats_server, rng)
                report.nats_kills += 1
            engine = rng.choice(fleet)
            await engine.kill()
            report.engine_kills += 1
            await asyncio.sleep(rng.uniform(0, 0.3))  # commands pile up while it is down
            await engine.start()
        load.stopping.set()
        await asyncio.wait_for(traffic, BOUND)

        await _finish(nc, store)
        for engine in fleet:
            code = await engine.terminate()
            if code != 0:
                report.violations.append(f"{engine.output.stem} exited {code} on SIGTERM")
        await check(nc, store, work, ledger, report)
    finally:
        for engine in fleet:
            if engine.process is not None:
                await engine.kill()
        await nc.close()
    report.seconds = time.monotonic() - began
    return report


async def _quiet(error: Exception) -> None:
    """The harness expects its connection to break while nats-server is down."""


async def _nothing() -> None:
    pass


async def _crash_nats(nats_server: NatsServer, rng: random.Random) -> None:
    """SIGKILL the nats-server mid-load and start it again on the same port and data."""
    assert nats_server.pid is not None
    os.kill(nats_server.pid, signal.SIGKILL)
    await nats_server.stop()
    await asyncio.sleep(rng.uniform(0, 0.5))
    await nats_server.start()


async def _finish(nc: NATS, store: Path) -> None:
    """Let the engine take every queued command, then resume every paused execution."""
    js = nc.jetstream()
    log = Log(store)
    deadline = time.monotonic() + BOUND * 2
    while True:
        info = await js.stream_info("EVFLOW_COMMANDS")
        if info.state.messages == 0:
            break
        if time.monotonic() > deadline:
            raise HarnessError(f"{info.state.messages} durable commands were never taken")
        await asyncio.sleep(0.1)

    client = Client(nc, timeout=10.0)
    paused = await log.query(
        "SELECT e.execution_id, json_extract(s.data, '$.flow') FROM events e"
        " JOIN (SELECT execution_id, max(version) v FROM events GROUP BY execution_id) m"
        " ON e.execution_id = m.execution_id AND e.version = m.v"
        " JOIN events s ON s.execution_id = e.execution_id AND s.version = 1"
        " WHERE e.type = 'ExecutionPaused'"
    )
    for execution_id, flow in paused:
        try:
            done = await client.resume(
                flow, execution_id, {"ok": True}, idempotency_key=f"final-{execution_id}"
            )
        except Expired:
            continue  # a timed pause whose deadline came first: its timer finishes it
        if not isinstance(done, Completed):
            raise HarnessError(f"execution {execution_id} did not complete: {done}")
    await _until_timers_fired(log)


async def _until_timers_fired(log: Log) -> None:
    """Wait for the timers still pending to fire and their executions to complete."""
    deadline = time.monotonic() + BOUND * 2
    while True:
        (open_,) = await log.query(
            "SELECT count(*) FROM events e JOIN (SELECT execution_id, max(version) v"
            " FROM events GROUP BY execution_id) m ON e.execution_id = m.execution_id"
            " AND e.version = m.v WHERE e.type IN ('TimerStarted', 'ExecutionPaused',"
            " 'TimerFired', 'PauseExpired')"
        )
        if open_[0] == 0:
            return
        if time.monotonic() > deadline:
            raise HarnessError(f"{open_[0]} executions still wait on a timer")
        await asyncio.sleep(0.1)


async def check(nc: NATS, store: Path, work: Path, ledger: Ledger, report: Report) -> None:
    """Check the invariants from the log, the stream and the step traces alone."""
    rows = await Log(store).query(
        "SELECT position, execution_id, version, type, data, idempotency_scope FROM events"
        " ORDER BY position"
    )
    report.events = len(rows)
    problems = report.violations
    by_execution: dict[str, list[tuple[int, str, dict[str, Any]]]] = {}
    scopes = {scope for *_, scope in rows if scope}
    for _position, execution_id, version, kind, data, _scope in rows:
        by_execution.setdefault(execution_id, []).append((version, kind, json.loads(data)))
    report.executions = len(by_execution)

    # Every acknowledged command is in the log.
    acknowledged = {
        "invoke (request)": [f"invoke/{flow_of_key(k)}/{k}" for k in ledger.invokes],
        "resume (request)": [f"resume/{e}/{k}" for k, e in ledger.resumes.items()],
        "invoke (durable)": [f"invoke/order/{k}" for k in ledger.durable_invokes],
        "resume (durable)": [f"resume/{e}/{k}" for k, e in ledger.durable_resumes.items()],
    }
    report.acknowledged = {kind: len(keys) for kind, keys in acknowledged.items()}
    report.failed_attempts = dict(ledger.failures)
    report.conflicts = dict(ledger.conflicts)
    for kind, keys in acknowledged.items():
        problems += [f"acknowledged {kind} {key} is not in the log" for key in keys
                     if key not in scopes]  # fmt: skip

    # Versions without gaps; each step recorded once; every execution ended completed.
    recorded_steps: Counter[str] = Counter()
    for execution_id, events in by_execution.items():
        versions = [version for version, _, _ in events]
        if versions != list(range(1, len(versions) + 1)):
            problems.append(f"execution {execution_id} has versions {versions}")
        for _, kind, data in events:
            if kind in ("StepCompleted", "StepFailed"):
                recorded_steps[f"{execution_id}/{data['name']}"] += 1
        if events[-1][1] != "ExecutionCompleted":
            problems.append(f"execution {execution_id} ended {events[-1][1]}, not completed")
    problems += [f"step {key} recorded {n} times" for key, n in recorded_steps.items() if n > 1]
    report.steps_recorded = len(recorded_steps)

    # Every timer ended exactly once: a wait fired once; a timed pause answered or expired.
    for execution_id, events in by_execution.items():
        problems += _timer_problems(execution_id, events, report)

    # Step functions: never called once their result was recorded; effects done once each.
    violations = work / "violations.log"
    if violations.exists():
        report.recorded_steps_run_again = violations.read_text().splitlines()
    runs = Counter(line.split()[0] for line in (work / "runs.log").read_text().splitlines())
    report.step_runs = sum(runs.values())
    report.steps_run_again = sum(1 for n in runs.values() if n > 1)
    effects = {path.name for path in (work / "effects").iterdir()}
    expected = {key.replace("/", "_") for key in recorded_steps}
    problems += [f"step {key} was recorded but its effect never happened"
                 for key in sorted(expected - effects)]  # fmt: skip
    problems += [f"effect {key} happened for no recorded step"
                 for key in sorted(effects - expected)]  # fmt: skip

    # Every event is in EVFLOW_EVENTS exactly once.
    published = await _notification_ids(nc)
    report.notifications = len(published)
    logged = Counter(f"{execution_id}:{version}" for _, execution_id, version, *_ in rows)
    problems += [f"event {key} published {n} times" for key, n in published.items() if n > 1]
    problems += [f"event {key} never published" for key in sorted(set(logged) - set(published))]
    problems += [f"notification {key} is not in the log" for key in set(published) - set(logged)]


def _timer_problems(
    execution_id: str, events: list[tuple[int, str, dict[str, Any]]], report: Report
) -> list[str]:
    """What is wrong with how one execution's timers ended (nothing, normally)."""
    started: Counter[int] = Counter()
    ended: Counter[int] = Counter()
    for _, kind, data in events:
        if kind == "TimerStarted" or (kind == "ExecutionPaused" and "deadline" in data):
            started[data["sequence"]] += 1
        elif kind in ("TimerFired", "PauseExpired"):
            ended[data["sequence"]] += 1
            report.timers_fired += 1
        elif kind == "ExecutionResumed" and data["sequence"] in started:
            ended[data["sequence"]] += 1
    report.timers_started += sum(started.values())
    return [
        f"execution {execution_id}: the timer of operation {sequence} started "
        f"{started[sequence]} times and ended {ended[sequence]} times"
        for sequence in started | ended
        if started[sequence] != 1 or ended[sequence] != 1
    ]


async def _notification_ids(nc: NATS) -> Counter[str]:
    """How many times each ``Nats-Msg-Id`` is stored in EVFLOW_EVENTS (rejections aside)."""
    js = nc.jetstream()
    config = js_api.ConsumerConfig(ack_policy=js_api.AckPolicy.NONE)
    subscription = await js.pull_subscribe(
        "evflow.events.*.*.*", stream="EVFLOW_EVENTS", config=config
    )
    ids: Counter[str] = Counter()
    try:
        while (await subscription.consumer_info()).num_pending:
            for message in await subscription.fetch(1000, timeout=5):
                ids[(message.headers or {}).get("Nats-Msg-Id", "")] += 1
    finally:
        await subscription.unsubscribe()
    return ids
