"""The ``evflow`` command as a user runs it: real processes against a real nats-server.

Each test starts ``evflow serve`` as a child process in its own session (so teardown also
stops an embedded nats-server it started), talks to it with more ``evflow`` processes, and
bounds every wait (see ``processes``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from pathlib import Path

import pytest

from evflow.nats_server import NatsServer
from processes import (
    APP,
    BOUND,
    READY,
    SETTLED,
    Child,
    Result,
    Spawn,
    cli_env,
    evflow,
    port_is_free,
    sqlite_url,
    unused_port,
)


@pytest.fixture
async def serve(nats_server: NatsServer, spawn: Spawn, tmp_path: Path) -> Child:
    """``evflow serve`` of the example flows on the test's nats-server, ready for commands."""
    store = sqlite_url(tmp_path / "evflow.db")
    child = await spawn("serve", "--app", APP, "--nats", nats_server.url, "--store", store)
    await child.wait_for(READY)
    return child


async def invoke_approval(url: str) -> str:
    """Invoke the approval flow; returns the ID of the paused execution."""
    reply = await evflow(
        "invoke", "approval", "--input", "amount=120", "--input", "requester=ann", "--nats", url
    )
    assert reply.settled()["status"] == "paused"
    return reply.settled()["id"]


async def complete_approval(url: str) -> str:
    """Invoke the approval flow and resume it; returns the ID of the completed execution."""
    execution_id = await invoke_approval(url)
    yes = ("--output", "approved=true", "--output", "note=ok")
    reply = await evflow("resume", "approval", execution_id, *yes, "--nats", url)
    assert reply.settled()["status"] == "completed"
    return execution_id


def assert_refused(result: Result, status: int, *words: str) -> None:
    """A refusal: exit ``status``, nothing on stdout, ``words`` on stderr, no traceback."""
    assert result.returncode == status, result
    assert result.stdout == ""
    for word in words:
        assert word in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# serve, invoke, resume, show, history, watch


async def test_serve_logs_its_flows_and_how_to_try_them(
    nats_server: NatsServer, serve: Child, tmp_path: Path
) -> None:
    """The start-up log names each flow's invoke subject, the NATS URL and a command to try."""
    log = serve.stderr

    assert f"opened the SQLite log at {tmp_path / 'evflow.db'}" in log
    assert f"listening on {nats_server.url}" in log
    assert "serving flow 'approval' v1 on evflow.flo.approval.invoke" in log
    assert "serving flow 'purchase' v1 on evflow.flo.purchase.invoke" in log
    assert READY in log
    assert "Traceback" not in log


async def test_invoke_prints_the_pause_and_how_to_resume(
    nats_server: NatsServer, serve: Child
) -> None:
    """``invoke`` prints the execution ID, the pause's inputs and outputs, the resume command."""
    result = await evflow(
        "invoke", "approval", "--input", "amount=120", "--input", "requester=ann",
        "--nats", nats_server.url,
    )  # fmt: skip

    execution_id = result.settled()["id"]
    assert result.returncode == 0
    assert result.lines == [
        f"execution {execution_id} of flow 'approval' is paused (version 2)",
        """  pause 'pause' shows {"amount":120.0,"requester":"ann"}""",
        """  it awaits {"approved":{"type":"boolean"},"note":{"type":"string"}}""",
        f"  resume with: evflow resume approval {execution_id} "
        "--output approved=... --output note=...",
    ]
    assert result.stderr == ""


async def test_resume_prints_the_completion(nats_server: NatsServer, serve: Child) -> None:
    """``resume`` with the pause's outputs prints the completed execution and its result."""
    execution_id = await invoke_approval(nats_server.url)

    result = await evflow(
        "resume", "approval", execution_id, "--output", "approved=true", "--output", "note=ok",
        "--nats", nats_server.url,
    )  # fmt: skip

    assert result.returncode == 0, result
    assert result.lines == [
        f"execution {execution_id} of flow 'approval' is completed (version 4)",
        """  result {"approved":true,"note":"ok"}""",
    ]


async def test_show_prints_the_folded_state_as_a_table_and_as_json(
    nats_server: NatsServer, serve: Child
) -> None:
    """``show`` prints one row per non-empty field; ``show --json`` the state as JSON."""
    execution_id = await complete_approval(nats_server.url)

    table = await evflow("show", execution_id, "--nats", nats_server.url)
    as_json = await evflow("show", execution_id, "--json", "--nats", nats_server.url)

    assert table.returncode == 0, table
    rows = dict(line.strip().split(maxsplit=1) for line in table.lines if line.strip())
    assert rows["execution_id"] == execution_id
    assert rows["flow"] == "approval"
    assert rows["status"] == "completed"
    assert rows["version"] == "4"
    assert rows["inputs"] == '{"amount":120.0,"requester":"ann"}'
    assert rows["result"] == '{"approved":true,"note":"ok"}'
    assert as_json.returncode == 0, as_json
    state = json.loads(as_json.stdout)
    assert (state["execution_id"], state["flow"]) == (execution_id, "approval")
    assert (state["status"], state["version"]) == ("completed", 4)
    assert state["inputs"] == {"amount": 120.0, "requester": "ann"}
    assert state["result"] == {"approved": True, "note": "ok"}


async def test_history_prints_the_events_as_a_table_and_as_json_lines(
    nats_server: NatsServer, serve: Child
) -> None:
    """``history`` prints one row per event; ``history --json`` one JSON event a line."""
    execution_id = await complete_approval(nats_server.url)
    kinds = ["ExecutionStarted", "ExecutionPaused", "ExecutionResumed", "ExecutionCompleted"]

    table = await evflow("history", execution_id, "--nats", nats_server.url)
    lines = await evflow("history", execution_id, "--json", "--nats", nats_server.url)

    assert table.returncode == 0, table
    assert f"execution {execution_id}" in table.lines[0]
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in table.lines]
    rows = [(row[0], row[2]) for row in cells if row and row[0].isdigit()]
    assert rows == [(str(version), kind) for version, kind in enumerate(kinds, 1)]
    assert lines.returncode == 0, lines
    events = [json.loads(line) for line in lines.lines]
    assert [event["version"] for event in events] == [1, 2, 3, 4]
    assert [event["event"]["type"] for event in events] == kinds
    assert {event["execution_id"] for event in events} == {execution_id}
    assert events[0]["event"]["inputs"] == {"amount": 120.0, "requester": "ann"}
    assert events[2]["event"]["outputs"] == {"approved": True, "note": "ok"}


async def test_watch_prints_notifications_of_new_executions(
    nats_server: NatsServer, serve: Child, spawn: Spawn
) -> None:
    """``watch approval`` prints a line per notification, and what a pause shows and awaits."""
    watch = await spawn("watch", "approval", "--nats", nats_server.url)
    await watch.wait_for("watching evflow.events.approval.*.* (Ctrl-C to stop)")

    execution_id = await complete_approval(nats_server.url)
    await watch.wait_for(f"completed approval {execution_id} v4", stream="stdout")
    code = await watch.stop(signal.SIGTERM)

    assert code == -signal.SIGTERM
    lines = watch.stdout.splitlines()
    notes = [line.split()[1:] for line in lines if not line.startswith(" ")]
    assert notes == [
        [kind, "approval", execution_id, f"v{version}"]
        for version, kind in enumerate(["started", "paused", "resumed", "completed"], 1)
    ]
    assert (
        lines[2] == """    inputs {"amount":120.0,"requester":"ann"} awaits ["approved","note"]"""
    )


# refusals


@pytest.mark.parametrize(
    ("args", "status", "words"),
    [
        (
            ["invoke", "nope", "--input", "amount=1"],
            1,
            ["error unknown_flow:", "'nope'", "known flows: approval, purchase, quote"],
        ),
        (
            ["invoke", "approval", "--input", "amount=120"],
            1,
            ["error invalid_input:", "requester"],
        ),
        (["show", "no-such-id"], 1, ["error unknown_execution:", "no-such-id"]),
        (["invoke", "approval", "--json", "[1]"], 2, ["--json", "must be a JSON object"]),
        (
            ["invoke", "approval.x", "--input", "amount=1"],
            1,
            ["error invalid_input:", "flow 'approval.x' cannot be part of a NATS subject"],
        ),
        (["show", "a b"], 1, ["error invalid_input:", "execution id 'a b' cannot be part"]),
        (["cancel", "approval", "0" * 32], 1, ["error unknown_execution:", "0" * 32]),
    ],
    ids=[
        "unknown-flow",
        "missing-field",
        "show-unknown-id",
        "json-not-an-object",
        "flow-not-a-token",
        "id-not-a-token",
        "cancel-unknown-id",
    ],
)
async def test_a_refused_command_prints_why_and_exits_non_zero(
    nats_server: NatsServer, serve: Child, args: list[str], status: int, words: list[str]
) -> None:
    """Error replies exit 1 with their code and message; a bad ``--json`` is a usage error."""
    result = await evflow(*args, "--nats", nats_server.url)

    assert_refused(result, status, *words)


async def test_cancel_prints_the_cancelled_execution_and_refuses_a_second_time(
    nats_server: NatsServer, serve: Child
) -> None:
    """``cancel`` ends a paused execution with its reason; a second cancel is ``finished``."""
    execution_id = await invoke_approval(nats_server.url)

    result = await evflow(
        "cancel", "approval", execution_id, "--reason", "not needed", "--nats", nats_server.url
    )
    again = await evflow("cancel", "approval", execution_id, "--nats", nats_server.url)

    assert result.returncode == 0, result
    assert result.lines == [
        f"execution {execution_id} of flow 'approval' is cancelled (version 3)",
        "  reason not needed",
    ]
    assert_refused(again, 1, "error finished:", f"execution {execution_id} is cancelled")


async def test_a_timed_pause_prints_its_deadline_and_a_wait_its_wake_up(
    nats_server: NatsServer, serve: Child
) -> None:
    """The quote's offer expires in a minute; accepted, it waits ten seconds to order."""
    offered = await evflow(
        "invoke", "quote", "-i", "customer=ann", "-i", "price=10", "--nats", nats_server.url
    )
    execution_id = offered.settled()["id"]
    accepted = await evflow(
        "resume", "quote", execution_id, "-o", "accepted=true", "--nats", nats_server.url
    )

    assert offered.lines[3].startswith("  it expires at 20"), offered.stdout
    assert accepted.returncode == 0, accepted
    assert accepted.lines[0] == f"execution {execution_id} of flow 'quote' is waiting (version 4)"
    assert accepted.lines[1].startswith("  wakes at 20"), accepted.stdout


async def test_resume_with_a_wrong_type_names_the_field(
    nats_server: NatsServer, serve: Child
) -> None:
    """A resume whose ``approved`` is text is refused naming the field and its type."""
    execution_id = await invoke_approval(nats_server.url)

    result = await evflow(
        "resume", "approval", execution_id, "--output", "approved=yes", "--output", "note=ok",
        "--nats", nats_server.url,
    )  # fmt: skip

    assert_refused(result, 1, "error invalid_input:", "'approved'", "bool", execution_id)


async def test_resume_of_a_completed_execution_is_refused_as_finished(
    nats_server: NatsServer, serve: Child
) -> None:
    """A second resume gets the 409 ``finished`` reply, naming the execution and its status."""
    execution_id = await complete_approval(nats_server.url)

    result = await evflow(
        "resume", "approval", execution_id, "--output", "approved=true", "--output", "note=ok",
        "--nats", nats_server.url,
    )  # fmt: skip

    assert_refused(result, 1, "error finished:", execution_id, "completed")


# configuration


async def test_environment_variables_replace_the_flags(
    nats_server: NatsServer, spawn: Spawn, tmp_path: Path
) -> None:
    """``EVFLOW_NATS_URL`` and ``EVFLOW_STORE`` do what ``--nats`` and ``--store`` do."""
    store = tmp_path / "from-env" / "log.db"
    store.parent.mkdir()
    env = cli_env(EVFLOW_NATS_URL=nats_server.url, EVFLOW_STORE=sqlite_url(store))

    serve = await spawn("serve", "--app", APP, env=env)
    await serve.wait_for(READY)
    reply = await evflow("invoke", "approval", "--json", '{"amount": 5, "requester": "e"}', env=env)
    history = await evflow("history", reply.settled()["id"], "--json", env=env)

    assert f"opened the SQLite log at {store}" in serve.stderr
    assert f"listening on {nats_server.url}" in serve.stderr
    assert "embedded nats-server" not in serve.stderr
    assert store.is_file()
    assert reply.settled()["status"] == "paused"
    assert history.returncode == 0, history
    assert len(history.lines) == 2


@pytest.mark.slow
async def test_a_killed_serve_resumes_its_paused_execution_after_a_restart(
    nats_server: NatsServer, spawn: Spawn, tmp_path: Path
) -> None:
    """SIGKILL after a pause loses nothing: a new serve on the same log finishes the flow."""
    url = nats_server.url
    args = ("serve", "--app", APP, "--nats", url, "--store", sqlite_url(tmp_path / "log.db"))
    first = await spawn(*args)
    await first.wait_for(READY)

    # pause at the manager, answer it, pause at finance, then crash
    invoked = await evflow(
        "invoke", "purchase", "-i", "item=desk", "-i", "amount=300", "--nats", url
    )
    execution_id = invoked.settled()["id"]
    manager = ("-o", "approved=true", "-o", "manager=bob")
    finance_pause = await evflow("resume", "purchase", execution_id, *manager, "--nats", url)
    assert finance_pause.settled()["version"] == "4"
    assert await first.kill() == -signal.SIGKILL

    # a new serve on the same log answers the finance pause
    second = await spawn(*args)
    await second.wait_for(READY)
    finance = ("-o", "approved=true", "-o", "cost_center=cc-7")
    done = await evflow("resume", "purchase", execution_id, *finance, "--nats", url)
    history = await evflow("history", execution_id, "--json", "--nats", url)

    assert done.settled()["status"] == "completed"
    result = json.loads(done.lines[1].removeprefix("  result "))
    assert (result["status"], result["cost_center"]) == ("ordered", "cc-7")
    assert result["reservation"] == "budget-desk-300.00"
    events = [json.loads(line) for line in history.lines]
    versions = [event["version"] for event in events]
    assert versions == list(range(1, int(done.settled()["version"]) + 1))
    assert [event["event"]["type"] for event in events] == [
        "ExecutionStarted", "ExecutionPaused", "ExecutionResumed", "ExecutionPaused",
        "ExecutionResumed", "StepCompleted", "ExecutionCompleted",
    ]  # fmt: skip


def need_port_4222() -> None:
    """The embedded server listens on 4222 as the README says; skip if something holds it."""
    if not port_is_free(4222):
        pytest.skip("127.0.0.1:4222 is taken by another process; the embedded server needs it")


async def port_4222_freed() -> bool:
    """Whether 4222 becomes free within a few seconds."""
    for _ in range(100):
        if port_is_free(4222):
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "group"),
    [(signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["SIGTERM", "Ctrl-C"],
)
async def test_serve_without_nats_runs_an_embedded_server_and_stops_it(
    spawn: Spawn, tmp_path: Path, sig: signal.Signals, group: bool
) -> None:
    """Without ``--nats``, serve runs nats-server on 127.0.0.1:4222, data beside the log.

    Ctrl-C in a terminal signals the whole foreground process group; the embedded server
    must not die of it before serve has finished with it.
    """
    need_port_4222()
    store = tmp_path / "state" / "evflow.db"

    serve = await spawn("serve", "--app", APP, "--store", sqlite_url(store))
    await serve.wait_for(READY)
    reply = await evflow("invoke", "approval", "-i", "amount=1", "-i", "requester=x")
    code = await serve.stop(sig, group=group)

    data = store.parent / "nats"
    assert f"embedded nats-server ready on nats://127.0.0.1:4222 (data in {data})" in serve.stderr
    assert (data / "jetstream").is_dir()
    assert reply.settled()["status"] == "paused"
    assert code == 0, serve
    assert "embedded nats-server stopped" in serve.stderr
    assert "Traceback" not in serve.stderr
    assert port_is_free(4222), "the embedded nats-server still listens after serve exited"


@pytest.mark.slow
async def test_a_killed_serve_takes_its_embedded_server_down_and_starts_again(
    spawn: Spawn, tmp_path: Path
) -> None:
    """After a SIGKILL of serve, the README command runs again: port 4222 was let go."""
    need_port_4222()
    args = ("serve", "--app", APP, "--store", sqlite_url(tmp_path / "evflow.db"))
    first = await spawn(*args)
    await first.wait_for(READY)

    first.process.kill()  # serve alone, as the OOM killer would
    await first.process.wait()
    freed = await port_4222_freed()
    second = await spawn(*args)
    await second.wait_for(READY)

    assert freed, "the embedded nats-server outlived the serve that started it"
    assert await second.stop(signal.SIGTERM) == 0, second


@pytest.mark.slow
async def test_serve_stops_when_its_embedded_server_dies(spawn: Spawn, tmp_path: Path) -> None:
    """If the embedded nats-server exits, serve says so and exits 1 instead of spinning."""
    need_port_4222()
    serve = await spawn("serve", "--app", APP, "--store", sqlite_url(tmp_path / "evflow.db"))
    await serve.wait_for(READY)
    found = re.search(r"nats-server ready on \S+ \(data in (?P<data>[^)]+)\)", serve.stderr)
    assert found, serve.stderr
    pid = next(
        int(p.name) for p in Path("/proc").iterdir()
        if p.name.isdigit() and _is_child_nats(p, serve.process.pid)
    )  # fmt: skip

    os.kill(pid, signal.SIGKILL)
    code = await asyncio.wait_for(serve.process.wait(), BOUND)

    assert code == 1, serve
    assert "the embedded nats-server exited with code -9, so evflow stopped" in serve.stderr
    assert "Traceback" not in serve.stderr


def _is_child_nats(proc: Path, parent: int) -> bool:
    """Whether /proc/PID is a nats-server whose parent is ``parent``."""
    try:
        status = (proc / "status").read_text()
    except OSError:
        return False
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    return fields.get("Name", "").strip() == "nats-server" and fields.get("PPid") == str(parent)


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--store", "postgres://x/y", ["--store", "not supported", "sqlite:///PATH"]),
        ("--nats", "http://127.0.0.1:4222", ["--nats", "not a NATS URL", "nats://HOST:PORT"]),
        ("--hot-executions", "-1", ["--hot-executions", "-1", "x>=0"]),
    ],
    ids=["store", "nats", "hot-executions"],
)
async def test_serve_refuses_a_value_it_cannot_use_before_starting_anything(
    spawn: Spawn, tmp_path: Path, flag: str, value: str, words: list[str]
) -> None:
    """A bad --store, --nats or --hot-executions is a usage error; nothing is started."""
    serve = await spawn("serve", "--app", APP, flag, value)
    code = await asyncio.wait_for(serve.process.wait(), BOUND)

    assert code == 2, serve
    for word in words:
        assert word in serve.stderr
    assert not (Path.cwd() / "postgres:").exists()
    assert "nats-server ready" not in serve.stderr


@pytest.mark.slow
async def test_serve_with_an_unreachable_nats_exits_naming_the_url(
    spawn: Spawn, tmp_path: Path
) -> None:
    """``serve --nats URL`` with nothing at URL exits 1 with a message naming it, no
    traceback, once its start-up timeout has passed."""
    url = f"nats://127.0.0.1:{unused_port()}"

    store = sqlite_url(tmp_path / "x")
    serve = await spawn(
        "serve", "--app", APP, "--nats", url, "--store", store, "--startup-timeout", "3s"
    )
    try:
        code = await asyncio.wait_for(serve.process.wait(), 15)
    except TimeoutError:
        pytest.fail(f"evflow serve --nats {url} still runs after 15 s:\n{serve.stderr[-1500:]}")

    assert code == 1
    assert f"could not reach NATS at {url} within the start-up timeout" in serve.stderr
    assert f"cannot connect to NATS at {url}" in serve.stderr
    assert "Traceback" not in serve.stderr


@pytest.mark.slow
async def test_a_command_with_an_unreachable_nats_exits_naming_the_url() -> None:
    """``show --nats URL`` with nothing at URL exits 1 naming it, with no traceback."""
    url = f"nats://127.0.0.1:{unused_port()}"

    result = await evflow("show", "some-id", "--nats", url)

    assert_refused(result, 1, f"cannot connect to NATS at {url}")


async def test_invoke_output_read_by_a_program_is_not_wrapped(
    nats_server: NatsServer, serve: Child
) -> None:
    """Piped at rich's default width, each line of the reply stays whole (as in the README)."""
    result = await evflow(
        "invoke", "approval", "-i", "amount=120", "-i", "requester=ann",
        "--nats", nats_server.url, env=cli_env(COLUMNS=None),
    )  # fmt: skip

    assert result.returncode == 0, result
    assert SETTLED.match(result.lines[0]), result.stdout
    assert len(result.lines) == 4, result.stdout
    assert result.lines[3].endswith("--output approved=... --output note=..."), result.stdout
