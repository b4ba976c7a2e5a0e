"""The NATS service: the wire contract's endpoints, registered as the micro service ``evflow``.

Standard NATS tooling discovers it (``$SRV.PING.evflow``, ``$SRV.INFO``, ``$SRV.STATS``).
A subscription's callback runs one message at a time, so each request is handled in a
task of its own: a slow flow never holds up commands for other executions.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.micro import add_service
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER, Request
from nats.micro.service import EndpointStats
from nats.micro.service import Service as MicroService

from . import __version__, commands, queries
from .engine import Engine
from .errors import EvflowError, InternalError, TooLarge
from .messages import ErrorReply, History, encoder, settle_reply
from .state import ExecutionState
from .subjects import Subjects

logger = logging.getLogger(__name__)

EXECUTION_HEADER = "Evflow-Execution-Id"

Answer = tuple[bytes, str | None]
"""A reply body and the execution it concerns, if it concerns one."""


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def header_text(text: str) -> str:
    """``text`` safe as a header value: a control character (from a client's field name, say)
    is written as its escape, so it can neither break the header block nor forge a header.
    """
    return _CONTROL.sub(lambda match: repr(match.group())[1:-1], text)


class EvflowService:
    """Serves an ``Engine`` on NATS; its commands are run by ``run`` (a ``Router``'s, on a
    cluster), or on the engine itself."""

    def __init__(
        self,
        nc: NATS,
        engine: Engine,
        subjects: Subjects | None = None,
        run: Callable[[commands.Command], Awaitable[ExecutionState]] | None = None,
    ):
        self._nc = nc
        self._engine = engine
        self._run = run or functools.partial(commands.run, engine)
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
            metadata={"prefix": prefix, "flows": self._engine.app.summary()},
            stats_handler=self._endpoint_data,
        )
        endpoints: dict[str, tuple[str, Callable[[Request], Awaitable[Answer]]]] = {
            "invoke": (f"{prefix}.flo.*.invoke", self._command),
            "resume": (f"{prefix}.flo.*.resume.*", self._command),
            "cancel": (f"{prefix}.flo.*.cancel.*", self._command),
            "get": (f"{prefix}.executions.get.*", self._get),
            "history": (f"{prefix}.executions.history.*", self._history),
            "list": (self._subjects.list_executions(), self._list),
        }
        for name, (subject, command) in endpoints.items():
            await self._micro.add_endpoint(
                name=name, subject=subject, handler=self._dispatcher(name, command)
            )

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop taking requests, then let those in flight finish for at most ``timeout`` s."""
        if self._micro is not None:
            await self._micro.stop()
            self._micro = None
        if self._in_flight:
            _, pending = await asyncio.wait(self._in_flight, timeout=timeout)
            for task in pending:  # unanswered: the caller retries, with its idempotency key
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

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
            self._check_fits(body, execution_id, request.subject, endpoint)
            headers = {EXECUTION_HEADER: execution_id} if execution_id is not None else None
            await request.respond(body, headers=headers)
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

    def _check_fits(
        self, body: bytes, execution_id: str | None, subject: str, endpoint: str
    ) -> None:
        """Refuse a reply NATS would not carry, instead of failing to send it. A command's
        reply says that the command took effect: sent again, it would act again."""
        limit = self._nc.max_payload - 1024
        if len(body) <= limit:
            return
        concerning = f" for execution {execution_id}" if execution_id is not None else ""
        what = f"the reply on {subject}{concerning} is {len(body)} bytes, more than the {limit}"
        if endpoint in ("get", "history", "list"):
            todo = "NATS carries; ask for less (a smaller limit) or read the store"
        else:
            todo = (
                "NATS carries, but the command took effect: do not send it again; read the "
                "execution from the store (evflow export) or list it (evflow ls)"
            )
        raise TooLarge(f"{what} {todo}", execution_id=execution_id)

    def _named_execution(self, endpoint: str, request: Request) -> str | None:
        """The execution a command's subject names, if it names one (all but invoke do)."""
        tokens = self._subjects.tokens(request.subject)
        if endpoint in ("get", "history"):
            return tokens[2] if len(tokens) > 2 else None
        return commands.named_execution(tokens)

    async def _respond_error(self, request: Request, error: EvflowError, named: str | None) -> None:
        """Reply with the error's body and the micro error headers; name the execution."""
        headers = {ERROR_HEADER: header_text(error.message), ERROR_CODE_HEADER: str(error.status)}
        execution_id = error.execution_id or named
        if execution_id is not None:
            headers[EXECUTION_HEADER] = execution_id
        body = encoder.encode(ErrorReply(error=error.to_body()))
        try:
            await request.respond(body, headers=headers)
        except Exception:
            logger.warning("could not send an error reply on %s", request.subject, exc_info=True)

    async def _command(self, request: Request) -> Answer:
        command = commands.parse(
            self._subjects.tokens(request.subject), request.headers, request.data
        )
        state = await self._run(command)
        return encoder.encode(settle_reply(state, self._subjects)), state.execution_id

    async def _get(self, request: Request) -> Answer:
        execution_id = self._subjects.tokens(request.subject)[2]
        query = queries.get_query(request.data, execution_id)
        state = await self._engine.get(execution_id, query.at_version)
        return encoder.encode(state), execution_id

    async def _history(self, request: Request) -> Answer:
        execution_id = self._subjects.tokens(request.subject)[2]
        events = await self._engine.history(execution_id)
        return encoder.encode(History(execution_id, events)), execution_id

    async def _list(self, request: Request) -> Answer:
        page = await queries.list_page(self._engine, queries.list_query(request.data))
        return encoder.encode(page), None
