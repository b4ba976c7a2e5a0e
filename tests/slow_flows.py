"""A flow whose step takes as long as it is told, for shutdown tests of ``evflow serve``."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from evflow import App, Context

app = App()

TRACE = Path(os.environ.get("EVFLOW_SLOW_TRACE", "slow-steps.log"))


async def nap(seconds: float) -> float:
    """Say the step started (so a test can signal mid-step), then sleep."""
    with TRACE.open("a") as trace:
        trace.write(f"started {os.getpid()}\n")
    await asyncio.sleep(seconds)
    return seconds


@app.flow("slow")
async def slow(ctx: Context, seconds: float) -> dict:
    """One step of ``seconds``, then a pause."""
    slept = await ctx.step("nap", nap, seconds)
    answer = await ctx.pause(inputs={"slept": slept}, outputs={"ok": bool})
    return {"slept": slept, "ok": answer["ok"]}
