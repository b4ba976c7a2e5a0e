"""Two versions of two flows, and apps serving one version or both, for flow-version tests.

Each version says in its result which code ran (``"code": "v1"`` or ``"v2"``), and the
versions differ in inputs and in the operations they issue, so running an execution on the
wrong version's code could not pass unnoticed. ``evflow serve --app versioned_flows:app_both``
(with ``tests/`` on ``PYTHONPATH``) serves both.
"""

from __future__ import annotations

from datetime import timedelta

from evflow import App, Context


async def approval_v1(ctx: Context, amount: float) -> dict:
    """Version 1: one pause for a yes or no, with a deadline an hour on."""
    answer = await ctx.pause(
        inputs={"amount": amount}, outputs={"approved": bool}, timeout=timedelta(hours=1)
    )
    return {"code": "v1", "amount": amount, "approved": answer["approved"]}


def limit_of(currency: str) -> float:
    """The approval limit of a currency (a step, so version 2 issues another operation)."""
    return {"EUR": 1000.0, "USD": 1100.0}.get(currency, 0.0)


async def approval_v2(ctx: Context, amount: float, currency: str) -> dict:
    """Version 2: takes a currency, looks its limit up, then pauses under another name."""
    limit = await ctx.step("limit", limit_of, currency)
    answer = await ctx.pause(
        name="review",
        inputs={"amount": amount, "currency": currency, "limit": limit},
        outputs={"approved": bool, "note": str},
    )
    return {"code": "v2", "approved": answer["approved"], "note": answer["note"]}


async def reminder_v1(ctx: Context, hours: float) -> dict:
    """Version 1: waits ``hours``, then says it woke."""
    await ctx.wait_for(timedelta(hours=hours))
    return {"code": "v1", "woke": ctx.now().isoformat()}


async def reminder_v2(ctx: Context, hours: float) -> dict:
    """Version 2: a step before the wait, so v1 histories would not replay on it."""
    await ctx.step("note", str, hours)
    await ctx.wait_for(timedelta(hours=hours))
    return {"code": "v2"}


VERSIONS = {
    "approval": {1: approval_v1, 2: approval_v2},
    "reminder": {1: reminder_v1, 2: reminder_v2},
}


def make_app(*versions: int) -> App:
    """An app serving ``versions`` of both flows."""
    app = App()
    for name, functions in VERSIONS.items():
        for version in versions:
            app.flow(name, version=version)(functions[version])
    return app


app_v1 = make_app(1)
app_v2 = make_app(2)
app_both = make_app(1, 2)
