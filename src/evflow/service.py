"""The NATS service: the wire contract's endpoints, registered as the micro service ``evflow``.

Standard NATS tooling discovers it (``$SRV.PING.evflow``, ``$SRV.INFO``, ``$SRV.STATS``).
A subscription's callback runs one message at a time, so each request is handled in a
task of its own: a slow flow never holds up commands for other executions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.micro import add_service
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER, Request
from nats.micro.service import EndpointStats
from nats.micro.service import Service as MicroService

from . import __version__
from .engine import Engine
from .errors import EvflowError, InternalError, InvalidInput, InvalidJson
from .messages import ErrorReply, History, encoder, settle_reply
from .subjects import Subjects

logger = logging.getLogger(__name__)

EXECUTION_HEADER = "Evflow-Execution-Id"
IDEMPOTENCY_HEADER = "Idempotency-Key"
PAUSE_HEADER = "Evflow-Pause"

Answer = tuple[bytes, str]
"""A reply body and the execution it concerns."""


class EvflowService:
    """Serves an ``Engine`` on NATS."""

    def __init__(self, nc: NATS, engine: Engine, subjects: Subjects | None = None):
        self._nc = nc
        self._engine = engine
        self._subjects = subjects or Subjects()
        self._micro: MicroService | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._errors: dict[str, int] = {}

    async def start(self) -> None:
        """Register the service and its endpoints."""
        prefix = self._subjects.prefix
        self._micro = await add_service(
            self._nc,
            name="evflow",
            version=__version__,
            description="evflow: event-sourced pause-and-resume flows",
            metadata={"prefix": prefix, "flows": ",".join(sorted(self._engine.app.flows))},
            stats_handler=self._endpoint_data,
        )
        endpoints: dict[str, tuple[str, Callable[[Request], Awaitable[Answer]]]] = {
            "invoke": (f"{prefix}.flo.*.invoke", self._invoke),
            "resume": (f"{prefix}.flo.*.resume.*", self._resume),
            "get": (f"{prefix}.executions.get.*", self._get),
            "history": (f"{prefix}.executions.history.*", self._history),
        }
        for name, (subject, command) in endpoints.items():
            await self._micro.add_endpoint(
                name=name, subject=subject, handler=self._dispatcher(name, command)
            )

    async def stop(self) -> None:
        """Stop taking requests, then let the ones in flight finish."""
        if self._micro is not None:
            await self._micro.stop()
            self._micro = None
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)

    def _endpoint_data(self, stats: EndpointStats) -> dict[str, Any]:
        """Counts the micro framework cannot see, since replies are sent from tasks."""
        return {"error_replies": self._errors.get(stats.name, 0), "in_flight": len(self._in_flight)}

    def _dispatcher(
        self, endpoint: str, command: Callable[[Request], Awaitable[Answer]]
    ) -> Callable[[Request], Awaitable[None]]:
        async def dispatch(request: Request) -> None:
            task = asyncio.create_task(self._serve(endpoint, request, command))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

        return dispatch

    async def _serve(
        self, endpoint: str, request: Request, command: Callable[[Request], Awaitable[Answer]]
    ) -> None:
        try:
            body, execution_id = await command(request)
            await request.respond(body, headers={EXECUTION_HEADER: execution_id})
            return
        except EvflowError as error:
            failure = error
            logger.debug("%s on %s refused: %s", endpoint, request.subject, error)
        except Exception:
            logger.exception("%s on %s failed unexpectedly", endpoint, request.subject)
            failure = InternalError(
                f"the engine failed while handling {request.subject}; the cause is in its log"
            )
        self._errors[endpoint] = self._errors.get(endpoint, 0) + 1
        await self._respond_error(request, failure, self._named_execution(endpoint, request))

    def _named_execution(self, endpoint: str, request: Request) -> str | None:
        """The execution a command's subject names, if it names one (all but invoke do)."""
        tokens = self._subjects.tokens(request.subject)
        at = {"resume": 3, "get": 2, "history": 2}.get(endpoint)
        return tokens[at] if at is not None and at < len(tokens) else None

    async def _respond_error(self, request: Request, error: EvflowError, named: str | None) -> None:
        """Reply with the error's body and the micro error headers; name the execution."""
        headers = {ERROR_HEADER: error.message, ERROR_CODE_HEADER: str(error.status)}
        execution_id = error.execution_id or named
        if execution_id is not None:
            headers[EXECUTION_HEADER] = execution_id
        body = encoder.encode(ErrorReply(error=error.to_body()))
        try:
            await request.respond(body, headers=headers)
        except Exception:
            logger.warning("could not send an error reply on %s", request.subject, exc_info=True)

    async def _invoke(self, request: Request) -> Answer:
        flow = self._subjects.tokens(request.subject)[1]
        state = await self._engine.invoke(flow, _object(request.data), _key(request))
        return encoder.encode(settle_reply(state, self._subjects)), state.execution_id

    async def _resume(self, request: Request) -> Answer:
        tokens = self._subjects.tokens(request.subject)
        flow, execution_id = tokens[1], tokens[3]
        body = _object(request.data, execution_id)
        state = await self._engine.resume(
            flow, execution_id, body, _key(request), _pause(request, execution_id)
        )
        return encoder.encode(settle_reply(state, self._subjects)), execution_id

    async def _get(self, request: Request) -> Answer:
        execution_id = self._subjects.tokens(request.subject)[2]
        return encoder.encode(await self._engine.get(execution_id)), execution_id

    async def _history(self, request: Request) -> Answer:
        execution_id = self._subjects.tokens(request.subject)[2]
        events = await self._engine.history(execution_id)
        return encoder.encode(History(execution_id, events)), execution_id


def _object(body: bytes, execution_id: str | None = None) -> bytes:
    """The body, once it is known to be one JSON object (an empty body stands for {})."""
    if not body.strip():
        return b"{}"
    try:
        value = msgspec.json.decode(body)
    except msgspec.DecodeError as error:
        raise InvalidJson(
            f'the body is not valid JSON ({error}); send a JSON object such as {{"name": 1}}',
            execution_id=execution_id,
        ) from None
    if not isinstance(value, dict):
        raise InvalidJson(
            f"the body must be a JSON object, not a JSON {type(value).__name__}; wrap the "
            "fields in {...}",
            execution_id=execution_id,
        )
    return body


def _key(request: Request) -> str | None:
    key = (request.headers or {}).get(IDEMPOTENCY_HEADER)
    if key is not None and not key.strip():
        raise InvalidInput(
            f"the {IDEMPOTENCY_HEADER} header is empty; send a non-empty key or no header",
            field=IDEMPOTENCY_HEADER,
        )
    return key


def _pause(request: Request, execution_id: str) -> int | None:
    value = (request.headers or {}).get(PAUSE_HEADER)
    if value is None:
        return None
    if not value.strip().isdigit():
        raise InvalidInput(
            f"the {PAUSE_HEADER} header must be the sequence of the pause to answer (a "
            f"positive integer from the pause reply), not '{value}'",
            execution_id=execution_id,
            field=PAUSE_HEADER,
        )
    return int(value)
