"""Flows recorded by ``tests/test_replay.py``, and changed versions of them to replay.

``build()`` is the code the histories are recorded with; ``build(change)`` the same flows
with one change an author might make. Each step function notes its call in ``CALLS``, and
in the file ``EVFLOW_TEST_CALLS`` names when set (for ``evflow replay`` run as a process),
so a test shows that replay never runs a step.
"""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta

from evflow import App, Context

CALLS: list[str] = []
"""Names of the step functions called in this process, in order."""

CHANGES = (
    "inserted",  # a step 'audit' before the pause
    "renamed",  # the step 'reserve' renamed 'book'
    "reworded",  # the result says 'sent' where it said 'shipped'
    "invoiced",  # a step 'invoice' after the last step
    "crashing",  # reads an output the pause never declared: KeyError
    "short",  # returns before pausing
    "dawdling",  # waits on asyncio, not on its Context, before the pause
)


def _called(name: str) -> None:
    CALLS.append(name)
    path = os.environ.get("EVFLOW_TEST_CALLS")
    if path:
        with open(path, "a") as calls:
            calls.write(f"{name}\n")


def reserve(item: str) -> dict:
    _called("reserve")
    return {"reservation": f"r-{item}"}


def ship(item: str) -> dict:
    _called("ship")
    return {"shipment": f"s-{item}"}


def note(item: str) -> bool:
    _called("note")
    return True


def charge(amount: float) -> dict:
    _called("charge")
    raise ValueError(f"card declined for {amount}")


def build(change: str | None = None, version: int = 1, order: bool = True) -> App:
    """The flows, as recorded or with one of ``CHANGES``; without ``order`` if not ``order``."""
    assert change is None or change in CHANGES, change
    app = App()

    async def order_flow(ctx: Context, item: str) -> dict:
        reserved = await ctx.step("book" if change == "renamed" else "reserve", reserve, item)
        reserved_at = ctx.now().isoformat()
        if change == "inserted":
            await ctx.step("audit", note, item)
        if change == "short":
            return {"status": "reserved", **reserved}
        if change == "dawdling":
            await asyncio.sleep(3600)
        answer = await ctx.pause(
            name="approve",
            inputs=reserved,
            outputs={"ok": bool},
            timeout=timedelta(days=1),
            default={"ok": False},
        )
        if not answer["approved" if change == "crashing" else "ok"]:
            return {"status": "declined"}

        await ctx.wait_for(timedelta(hours=2))
        shipped = await ctx.step("ship", ship, item)
        if change == "invoiced":
            await ctx.step("invoice", note, item)
        status = "sent" if change == "reworded" else "shipped"
        return {
            "status": status,
            **shipped,
            "reserved_at": reserved_at,
            "at": ctx.now().isoformat(),
        }

    if order:
        app.flow("order", version=version)(order_flow)

    @app.flow("fragile")
    async def fragile(ctx: Context, amount: float) -> dict:
        return await ctx.step("charge", charge, amount)

    return app


app = build()
inserted = build("inserted")
renamed = build("renamed")
reworded = build("reworded")
version_two = build(version=2)
without_order = build(order=False)
