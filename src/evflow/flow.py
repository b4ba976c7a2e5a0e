"""Flows: Python async functions registered on an ``App`` under a name.

The ``App`` is what ``evflow serve --app MODULE:ATTR`` loads. Registering a flow derives the
type of its invoke body from its signature, so bad input is refused before anything runs.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from . import fields
from .errors import UnknownFlow

FlowFunction = Callable[..., Awaitable[Any]]

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class FlowDef(msgspec.Struct, frozen=True):
    """A registered flow: its name, version, function and invoke body type."""

    name: str
    version: int
    fn: FlowFunction
    inputs: type[msgspec.Struct]

    def decode_inputs(self, body: bytes) -> msgspec.Struct:
        """Validate an invoke body, raising an error that names the field at fault."""
        return fields.decode(body, self.inputs, f"invoke of flow '{self.name}'")


class App:
    """A set of flows served together.

    Example::

        app = App()

        @app.flow("approval")
        async def approval(ctx: Context, amount: float, requester: str) -> dict: ...
    """

    def __init__(self) -> None:
        self.flows: dict[str, FlowDef] = {}

    def flow(
        self, name: str | None = None, *, version: int = 1
    ) -> Callable[[FlowFunction], FlowFunction]:
        """Register an async function as a flow; its name defaults to the function's."""

        def register(fn: FlowFunction) -> FlowFunction:
            flow_name = name or fn.__name__
            self._check(flow_name, fn)
            inputs = fields.from_signature(flow_name, fn)
            self.flows[flow_name] = FlowDef(flow_name, version, fn, inputs)
            return fn

        return register

    def _check(self, name: str, fn: FlowFunction) -> None:
        if not _NAME.match(name):
            raise ValueError(
                f"flow name '{name}' must be 1 to 128 letters, digits, '-' or '_', because it "
                "is a token of NATS subjects"
            )
        if name in self.flows:
            raise ValueError(f"flow '{name}' is registered twice; give each flow its own name")
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"flow '{name}' must be an async function (async def)")
        if not inspect.signature(fn).parameters:
            raise TypeError(f"flow '{name}' must take the Context as its first parameter")

    def get(self, name: str) -> FlowDef:
        """The flow registered under ``name``, or ``UnknownFlow`` listing the known ones."""
        try:
            return self.flows[name]
        except KeyError:
            known = ", ".join(sorted(self.flows)) or "none"
            raise UnknownFlow(
                f"no flow named '{name}' is registered; known flows: {known}", flow=name
            ) from None
