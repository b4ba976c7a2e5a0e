"""Nothing lost, nothing doubled: load through both interfaces while processes are SIGKILLed.

``EVFLOW_FAULT_KILLS`` sets how many engine kills a run makes (50 by default, as in CI);
``EVFLOW_FAULT_SEED`` replays a run. ``ops/faults`` runs this longer and prints the report.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from evflow.nats_server import NatsServer
from faults import run_faults

KILLS = int(os.environ.get("EVFLOW_FAULT_KILLS", "50"))
SEED = int(os.environ["EVFLOW_FAULT_SEED"]) if os.environ.get("EVFLOW_FAULT_SEED") else None


@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.timeout(max(600, KILLS * 6))
async def test_kills_under_load_lose_nothing_and_double_nothing(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """Every acknowledged command lands once, every step is recorded once, every event is
    published once, and every paused execution can still be resumed."""
    report = await run_faults(nats_server, tmp_path / "faults", kills=KILLS, seed=SEED)
    print("\n" + "\n".join(report.lines()))

    assert report.violations == [], "\n".join(report.lines())
    assert report.recorded_steps_run_again == [], "\n".join(report.lines())
    assert report.engine_kills == KILLS
    assert report.nats_kills == KILLS // 10
    assert all(count > 0 for count in report.acknowledged.values()), report.acknowledged
    assert report.steps_recorded == 2 * report.executions
    assert report.timers_fired > 0


@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.timeout(max(600, KILLS * 6))
async def test_two_engines_on_one_log_under_kills_lose_nothing_and_double_nothing(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """Two engine processes share the SQLite file and the commands; one is killed per round.

    Known limit, reported and not asserted: two engines may drive one execution at once (a
    starting engine recovers what the other is running; a retried command lands on the
    other engine), and then a step one of them recorded can be called again by the other.
    The version check keeps the history whole and the step recorded once; a keyed effect
    still happens once. Ownership of executions across engines is issue 7.
    """
    kills = max(KILLS // 2, 10)
    report = await run_faults(nats_server, tmp_path / "faults", kills=kills, seed=SEED, engines=2)
    print("\n" + "\n".join(report.lines()))

    assert report.violations == [], "\n".join(report.lines())
    assert report.engine_kills == kills
    assert all(count > 0 for count in report.acknowledged.values()), report.acknowledged
    assert report.steps_recorded == 2 * report.executions
