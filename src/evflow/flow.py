"""Flows: Python async functions registered on an ``App`` under a name and a version.

The ``App`` is what ``evflow serve --app MODULE:ATTR`` loads. Registering a flow derives the
type of its invoke body from its signature, so bad input is refused before anything runs.
One name may hold several versions: new executions start on the highest, and an execution
runs to its end on the version it started on, so old code stays registered beside the new
until its executions are done.
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
    """A set of flows served together, each under a name and one or more versions.

    Example::

        app = App()

        @app.flow("approval")  # version 1
        async def approval(ctx: Context, amount: float, requester: str) -> dict: ...

        @app.flow("approval", version=2)  # new executions start here; v1 ones finish on v1
        async def approval_v2(ctx: Context, amount: float, requester: str) -> dict: ...
    """

    def __init__(self) -> None:
        self.flows: dict[str, dict[int, FlowDef]] = {}
        """Flow name to its registered versions, each to its definition."""

    def flow(
        self, name: str | None = None, *, version: int = 1
    ) -> Callable[[FlowFunction], FlowFunction]:
        """Register an async function as ``version`` of a flow (1 unless given); the name
        defaults to the function's."""

        def register(fn: FlowFunction) -> FlowFunction:
            flow_name = name or fn.__name__
            self._check(flow_name, version, fn)
            inputs = fields.from_signature(flow_name, fn)
            self.flows.setdefault(flow_name, {})[version] = FlowDef(flow_name, version, fn, inputs)
            return fn

        return register

    def _check(self, name: str, version: int, fn: FlowFunction) -> None:
        if not _NAME.match(name):
            raise ValueError(
                f"flow name '{name}' must be 1 to 128 letters, digits, '-' or '_', because it "
                "is a token of NATS subjects"
            )
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(
                f"flow '{name}' has version {version!r}; a version is a whole number from 1 "
                "up, e.g. version=2"
            )
        registered = self.flows.get(name, {})
        if version in registered:
            raise ValueError(
                f"version {version} of flow '{name}' is registered twice "
                f"({registered[version].fn.__qualname__} and {fn.__qualname__}); give the "
                f"newer function the next version, version={max(registered) + 1}"
            )
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"flow '{name}' must be an async function (async def)")
        if not inspect.signature(fn).parameters:
            raise TypeError(f"flow '{name}' must take the Context as its first parameter")

    def get(self, name: str, version: int | None = None) -> FlowDef:
        """The flow registered under ``name`` at ``version``, or at its latest version when
        none is given; ``UnknownFlow`` when there is no such flow or version."""
        try:
            versions = self.flows[name]
        except KeyError:
            known = ", ".join(sorted(self.flows)) or "none"
            raise UnknownFlow(
                f"no flow named '{name}' is registered; known flows: {known}", flow=name
            ) from None
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            raise UnknownFlow(
                f"flow '{name}' has no version {version}; registered: {self.describe(name)}",
                flow=name,
            )
        return versions[version]

    def versions(self, name: str) -> list[int]:
        """The versions of flow ``name`` registered, lowest first; empty for an unknown one."""
        return sorted(self.flows.get(name, {}))

    def summary(self) -> str:
        """Every flow with its versions, as people read them: ``approval v1, v2; quote v1``."""
        return "; ".join(f"{name} {self.describe(name)}" for name in sorted(self.flows))

    def latest(self) -> list[FlowDef]:
        """The latest version of every flow, in the order the flows were first registered."""
        return [self.get(name) for name in self.flows]

    def describe(self, name: str) -> str:
        """The versions of flow ``name`` as people read them: ``v1, v2``."""
        return ", ".join(f"v{version}" for version in self.versions(name)) or "none"
