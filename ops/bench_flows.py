"""Flows the benchmarks serve: ``evflow serve --app bench_flows:app`` with ``ops/`` on the path."""

from datetime import timedelta

from evflow import App, Context

app = App()


@app.flow("sleeper")
async def sleeper(ctx: Context, hours: float) -> dict:
    """Wait ``hours``, then end: each execution in the store holds one pending timer."""
    await ctx.wait_for(timedelta(hours=hours))
    return {"woke": ctx.now().isoformat()}


@app.flow("approve")
async def approve(ctx: Context, amount: float) -> dict:
    """One pause for a yes or no, then end: the pause-and-resume cycle ``ops/bench`` times."""
    answer = await ctx.pause(inputs={"amount": amount}, outputs={"approved": bool})
    return {"amount": amount, "approved": answer["approved"]}
