"""``evflow ls`` and ``evflow show --at`` as a user runs them, against ``evflow serve``.

Like ``test_cli``: real processes on a real nats-server, every wait bounded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evflow.nats_server import NatsServer
from processes import APP, READY, Child, Result, Spawn, cli_env, evflow, sqlite_url


@pytest.fixture
async def serve(nats_server: NatsServer, spawn: Spawn, tmp_path: Path) -> Child:
    """``evflow serve`` of the example flows on the test's nats-server, ready for commands."""
    store = sqlite_url(tmp_path / "evflow.db")
    child = await spawn("serve", "--app", APP, "--nats", nats_server.url, "--store", store)
    await child.wait_for(READY)
    return child


async def invoke(url: str, flow: str = "approval") -> str:
    """Invoke a flow with valid inputs; returns the paused execution's ID."""
    fields = {
        "approval": ("amount=120", "requester=ann"),
        "purchase": ("item=desk", "amount=300"),
    }[flow]
    inputs = [arg for field in fields for arg in ("--input", field)]
    reply = await evflow("invoke", flow, *inputs, "--nats", url)
    assert reply.settled()["status"] == "paused"
    return reply.settled()["id"]


async def approve(url: str, execution_id: str) -> None:
    yes = ("--output", "approved=true", "--output", "note=ok")
    reply = await evflow("resume", "approval", execution_id, *yes, "--nats", url)
    assert reply.settled()["status"] == "completed"


def table_rows(result: Result) -> list[list[str]]:
    """The cells of each body row of a rich table (rows whose first cell is a hex ID)."""
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in result.lines]
    return [row for row in cells if row and len(row[0]) == 32]


async def test_ls_lists_executions_newest_change_first_as_a_table_and_json_lines(
    nats_server: NatsServer, serve: Child
) -> None:
    """``ls`` prints execution, flow, version, status and last change, the most recently
    changed first; ``--flow`` and ``--status`` filter; ``--json`` prints one JSON line per
    execution."""
    url = nats_server.url
    done = await invoke(url)
    paused = await invoke(url)
    purchase = await invoke(url, "purchase")
    await approve(url, done)

    table = await evflow("ls", "--nats", url)
    lines = await evflow("ls", "--json", "--nats", url)
    approvals = await evflow("ls", "--flow", "approval", "--status", "PAUSED", "--nats", url)

    assert table.returncode == 0, table
    assert [c.strip() for c in table.lines[1].split("┃")[1:-1]] == [
        "execution",
        "flow",
        "version",
        "status",
        "last change",
    ]
    rows = table_rows(table)
    assert [row[:4] for row in rows] == [
        [done, "approval", "4", "completed"],
        [purchase, "purchase", "2", "paused"],
        [paused, "approval", "2", "paused"],
    ]
    assert rows[0][4] > rows[1][4] > rows[2][4]  # ISO times in UTC sort as text
    assert table.stderr == ""
    assert lines.returncode == 0, lines
    parsed = [json.loads(line) for line in lines.lines]
    assert [(row["execution_id"], row["status"]) for row in parsed] == [
        (done, "completed"),
        (purchase, "paused"),
        (paused, "paused"),
    ]
    assert parsed[1]["flow"] == "purchase" and parsed[1]["flow_version"] == 1
    assert [row[0] for row in table_rows(approvals)] == [paused]
    narrow = await evflow("ls", "--nats", url, env=cli_env(COLUMNS="80"))
    assert [done, purchase, paused] == [
        line.split("│")[1].strip()
        for line in narrow.lines
        if line.startswith("│ ") and line.split("│")[1].strip()
    ][:3], narrow.stdout  # whole IDs in an 80-column terminal, so they can be copied


async def test_ls_with_a_limit_says_how_to_see_the_rest(
    nats_server: NatsServer, serve: Child
) -> None:
    """When more executions follow, stderr gives the command that lists the next page;
    running it goes on where the first page stopped, and the last page gives no hint."""
    url = nats_server.url
    started = [await invoke(url) for _ in range(3)]

    first = await evflow("ls", "--limit", "2", "--json", "--flow", "approval", "--nats", url)
    hint = first.stderr.strip()
    assert hint.startswith("more executions follow: evflow ls --flow approval --limit 2 --after ")
    assert hint.endswith(f" --json --nats {url}")  # a command to copy as it is
    rest = await evflow(*hint.split("evflow ", 1)[1].split())

    assert [json.loads(line)["execution_id"] for line in first.lines] == started[:0:-1]
    assert rest.returncode == 0, rest
    assert [json.loads(line)["execution_id"] for line in rest.lines] == started[:1]
    assert rest.stderr == ""


async def test_ls_of_nothing_says_so_and_a_bad_filter_lists_the_choices(
    nats_server: NatsServer, serve: Child
) -> None:
    url = nats_server.url
    await invoke(url)

    none = await evflow("ls", "--status", "failed", "--nats", url)
    bad_status = await evflow("ls", "--status", "asleep", "--nats", url)
    bad_limit = await evflow("ls", "--limit", "0", "--nats", url)
    bad_token = await evflow("ls", "--after", "nonsense", "--nats", url)

    assert (none.returncode, none.stdout, none.stderr.strip()) == (0, "", "no executions match")
    assert bad_status.returncode == 2 and bad_status.stdout == ""
    for status in ("running", "paused", "waiting", "completed", "failed", "cancelled"):
        assert status in bad_status.stderr
    assert bad_limit.returncode == 2 and "--limit" in bad_limit.stderr
    assert bad_token.returncode == 1
    assert "error invalid_input: the listing query's after must be" in bad_token.stderr
    assert "Traceback" not in bad_status.stderr + bad_limit.stderr + bad_token.stderr


async def test_show_at_a_version_prints_the_state_as_it_was_then(
    nats_server: NatsServer, serve: Child
) -> None:
    """``show --at 2`` prints the paused state of a now completed execution; a version
    past the latest is refused naming it and the latest; ``--at 0`` is a usage error."""
    url = nats_server.url
    execution_id = await invoke(url)
    await approve(url, execution_id)

    then = await evflow("show", execution_id, "--at", "2", "--nats", url)
    as_json = await evflow("show", execution_id, "--at", "3", "--json", "--nats", url)
    too_far = await evflow("show", execution_id, "--at", "5", "--nats", url)
    zero = await evflow("show", execution_id, "--at", "0", "--nats", url)

    assert then.returncode == 0, then
    cells = [line.strip().split(maxsplit=1) for line in then.lines if line.startswith(" ")]
    rows = {cell[0]: cell[1] for cell in cells if len(cell) == 2}  # a long value wraps
    assert (rows["status"], rows["version"]) == ("paused", "2")
    assert "result" not in rows and '"name":"pause"' in rows["pause"]
    state = json.loads(as_json.stdout)
    assert (state["status"], state["version"], state["answered"]) == ("running", 3, [1])
    assert too_far.returncode == 1 and too_far.stdout == ""
    assert f"error invalid_input: execution {execution_id} has no version 5" in too_far.stderr
    assert "its latest is 4" in too_far.stderr
    assert zero.returncode == 2 and "--at" in zero.stderr and "Traceback" not in zero.stderr
