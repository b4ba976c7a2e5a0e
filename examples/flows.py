"""Example flows served by the README's run command: ``evflow serve --app examples.flows:app``."""

from datetime import timedelta

from evflow import App, Context

app = App()


@app.flow("approval")
async def approval(ctx: Context, amount: float, requester: str) -> dict:
    """One person approves or rejects a spending request."""
    answer = await ctx.pause(
        inputs={"amount": amount, "requester": requester},
        outputs={"approved": bool, "note": str},
    )
    return {"approved": answer["approved"], "note": answer["note"]}


def reserve_budget(item: str, amount: float) -> dict:
    """A side effect that must happen once: in real life, a call to the budget service."""
    return {"reservation": f"budget-{item}-{amount:.2f}"}


@app.flow("purchase")
async def purchase(ctx: Context, item: str, amount: float, buyer: str = "anonymous") -> dict:
    """A purchase needs a manager's approval, then finance's, then reserves the budget."""
    manager = await ctx.pause(
        name="manager",
        inputs={"item": item, "amount": amount, "buyer": buyer},
        outputs={"approved": bool, "manager": str},
    )
    if not manager["approved"]:
        return {"status": "rejected", "by": manager["manager"]}

    finance = await ctx.pause(
        name="finance",
        inputs={"item": item, "amount": amount, "approved_by": manager["manager"]},
        outputs={"approved": bool, "cost_center": str},
    )
    if not finance["approved"]:
        return {"status": "rejected", "by": "finance"}

    reservation = await ctx.step("reserve_budget", reserve_budget, item, amount)
    return {
        "status": "ordered",
        "cost_center": finance["cost_center"],
        "reservation": reservation["reservation"],
        "approved_at": ctx.now().isoformat(),
    }


def place_order(customer: str, price: float) -> dict:
    """A side effect that must happen once: in real life, a call to the order service."""
    return {"order": f"order-{customer}-{price:.2f}"}


@app.flow("quote")
async def quote(ctx: Context, customer: str, price: float) -> dict:
    """A price offer that holds for a minute, silence declining it; an accepted offer is
    ordered after a ten-second cooling-off wait, unless it is cancelled meanwhile."""
    answer = await ctx.pause(
        name="offer",
        inputs={"customer": customer, "price": price},
        outputs={"accepted": bool},
        timeout=timedelta(minutes=1),
        default={"accepted": False},
    )
    if not answer["accepted"]:
        return {"status": "declined"}

    await ctx.wait_for(timedelta(seconds=10))
    order = await ctx.step("place_order", place_order, customer, price)
    return {"status": "ordered", "order": order["order"]}
