"""Flows the fault-injection suite serves from a real ``evflow serve`` process.

The ``order`` flow runs a step, pauses, and runs another step. The ``timed`` flow does the
same around two timers: a short wait after the first step, and a pause that expires (to a
default answer) unless a resume comes first, so kills also fall around timers firing.
Each step's function leaves three kinds of trace in ``$EVFLOW_FAULT_DIR``:

- ``runs.log``: a line per call, ``<key> <pid>``. Steps are at least once: a kill after the
  function ran and before its result was recorded runs it again on recovery.
- ``effects/<key>``: the effect proper, created at most once per key. This is how a step
  makes its effect exactly once: by keying it (here ``<execution_id>/<step>``) so a repeat
  is a no-op, as a payment API with idempotency keys does.
- ``violations.log``: a line whenever a step function is called although the log already
  records that step's result, read from the SQLite file ``$EVFLOW_FAULT_LOG`` at that
  instant. The engine promises this never happens.
"""

from __future__ import annotations

import os
import sqlite3
from datetime import timedelta
from pathlib import Path

from evflow import App, Context

app = App()

FAULT_DIR = Path(os.environ.get("EVFLOW_FAULT_DIR", "."))
LOG_PATH = os.environ.get("EVFLOW_FAULT_LOG", "")


def effect(execution_id: str, step: str) -> dict[str, str]:
    """A step's side effect: traced per call, done once per key."""
    key = f"{execution_id}/{step}"
    if _recorded(execution_id, step):
        _append(FAULT_DIR / "violations.log", f"{key} {os.getpid()}\n")
    _append(FAULT_DIR / "runs.log", f"{key} {os.getpid()}\n")

    target = FAULT_DIR / "effects" / key.replace("/", "_")
    try:
        descriptor = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        pass  # done by an earlier run that was killed before its result was recorded
    else:
        os.fsync(descriptor)
        os.close(descriptor)
    return {"key": key}


def _recorded(execution_id: str, step: str) -> bool:
    """Whether the log already holds this step's result (the oracle for re-runs)."""
    if not LOG_PATH:
        return False
    with sqlite3.connect(f"file:{LOG_PATH}?mode=ro", uri=True, timeout=10) as db:
        row = db.execute(
            "SELECT 1 FROM events WHERE execution_id = ? AND type IN ('StepCompleted',"
            " 'StepFailed') AND json_extract(data, '$.name') = ?",
            (execution_id, step),
        ).fetchone()
    db.close()
    return row is not None


def _append(path: Path, line: str) -> None:
    descriptor = os.open(path, os.O_CREAT | os.O_APPEND | os.O_WRONLY)
    try:
        os.write(descriptor, line.encode())
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@app.flow("order")
async def order(ctx: Context, n: int) -> dict:
    """Charge, wait for a yes or no, then ship."""
    charged = await ctx.step("charge", effect, ctx.execution_id, "charge")
    answer = await ctx.pause(inputs={"n": n}, outputs={"ok": bool})
    shipped = await ctx.step("ship", effect, ctx.execution_id, "ship")
    return {"n": n, "ok": answer["ok"], "charged": charged["key"], "shipped": shipped["key"]}


@app.flow("timed")
async def timed(ctx: Context, n: int, wait_ms: int, expire_ms: int) -> dict:
    """Charge, wait ``wait_ms``, wait for a yes or no for at most ``expire_ms``, then ship."""
    charged = await ctx.step("charge", effect, ctx.execution_id, "charge")
    await ctx.wait_for(timedelta(milliseconds=wait_ms))
    answer = await ctx.pause(
        inputs={"n": n},
        outputs={"ok": bool},
        timeout=timedelta(milliseconds=expire_ms),
        default={"ok": False},
    )
    shipped = await ctx.step("ship", effect, ctx.execution_id, "ship")
    return {"n": n, "ok": answer["ok"], "charged": charged["key"], "shipped": shipped["key"]}
