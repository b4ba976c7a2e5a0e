"""A running engine: the log, the NATS connection, the streams, the engine, the outbox, the
request service and durable intake, started and stopped together in the right order.

``evflow serve`` runs one; tests run one in-process against a real nats-server.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable

from nats.aio.client import Client as NATS

from .connection import connect
from .engine import Engine
from .flow import App
from .hot import DEFAULT_CAPACITY
from .intake import Intake
from .leases import Leases
from .outbox import Outbox
from .router import Router
from .service import EvflowService
from .startup import DEFAULT_TIMEOUT, Startup
from .store import EventStore, store_at
from .store.jetstream import JetStreamStore
from .streams import Streams, StreamSettings
from .subjects import Subjects
from .timers import Clock

logger = logging.getLogger(__name__)

_NATS_HINT = (
    "start a nats-server there, or leave out --nats to run the embedded one; allow longer "
    "with --startup-timeout"
)


class Server:
    """Serves an ``App`` on NATS with a durable log.

    Args:
        app: the flows to serve.
        store: a store URL (``sqlite:///PATH``) or an open ``EventStore``.
        nats_url: the NATS server to connect to.
        subjects: the subjects to serve (prefix ``evflow`` by default).
        clock: the engine's clock.
        streams: retention and redelivery settings of the JetStream streams.
        shutdown_timeout: seconds ``stop`` lets commands in flight finish, and then again
            the outbox publish what is left, before giving up on them.
        hot_executions: executions at a pause the engine keeps in memory (``hot``).
        startup_timeout: seconds ``start`` waits, all told, for NATS and JetStream to
            answer (see ``startup``).
    """

    def __init__(
        self,
        app: App,
        store: str | EventStore,
        nats_url: str,
        subjects: Subjects | None = None,
        clock: Clock | None = None,
        streams: StreamSettings | None = None,
        shutdown_timeout: float = 10.0,
        hot_executions: int = DEFAULT_CAPACITY,
        startup_timeout: float = DEFAULT_TIMEOUT,
    ):
        self.app = app
        self.nats_url = nats_url
        self.subjects = subjects or Subjects()
        self.shutdown_timeout = shutdown_timeout
        self.hot_executions = hot_executions
        self.startup_timeout = startup_timeout
        self._store_spec = store
        self._clock = clock
        self._stream_settings = streams
        self.store: EventStore | None = None
        self.nc: NATS | None = None
        self.engine: Engine | None = None
        self.outbox: Outbox | None = None
        self.intake: Intake | None = None
        self.router: Router | None = None
        self.leases: Leases | None = None
        self.engine_id = uuid.uuid4().hex[:12]
        """This engine's name among the engines sharing a log (in its partition leases)."""
        self._service: EvflowService | None = None

    async def start(self) -> None:
        """Open the log, connect, drive on interrupted executions, start the timers, then
        take commands.

        Each step that asks NATS is tried again while NATS is out of reach or JetStream
        elects its leaders, for at most ``startup_timeout`` seconds in all (``Startup``);
        then, or at once for a failure that will not pass, ``start`` raises.
        """
        startup = Startup(self.startup_timeout)
        self.store = await self._open_store(startup)
        self.nc = await startup.attempt(
            f"NATS at {self.nats_url}", lambda: self._connect(startup), hint=_NATS_HINT
        )
        streams = Streams(self.nc, self.subjects, self._stream_settings)
        await startup.attempt(
            f"the JetStream streams {streams.events} and {streams.commands}", streams.ensure
        )

        # Notifications flow from the log from here on, recovered executions' included.
        shared = isinstance(self.store, JetStreamStore)
        self.outbox = Outbox(self.store, self.nc, self.subjects, shared=shared)
        await startup.attempt("the outbox's checkpoint in the log", self.outbox.start)
        self.engine = Engine(
            self.app, self.store, self._clock, self.outbox, hot_executions=self.hot_executions
        )
        self.outbox.follow(self.engine.followed)  # other engines' timers, on a shared log
        self.router = Router(self.nc, self.engine, self.subjects, shared=shared, outbox=self.outbox)
        if shared:  # each partition's timers and recovery come with its lease
            await self.engine.start(partitions=())
        else:
            recovered = await startup.attempt(
                "the log's interrupted executions", self.engine.recover
            )
            logger.info("recovered %d interrupted executions", recovered)
            await startup.attempt("the log's pending timers", self.engine.start)

        # Only now take commands: requests first, then what waits in the commands stream.
        run = self.router.run
        self._service = EvflowService(self.nc, self.engine, self.subjects, run)
        await self._service.start()
        self.intake = Intake(streams, self.engine, self.subjects, clock=self._clock, run=run)
        await startup.attempt(f"the command consumer of {streams.commands}", self.intake.start)
        if isinstance(self.store, JetStreamStore):
            store = self.store
            self.leases = Leases(
                store.connection, store.leases, store.replicas, self.engine_id, self.router
            )
            await startup.attempt(f"the lease bucket {store.leases}", self.leases.start)
        await self.nc.flush()  # the server knows our subscriptions before we say we listen
        logger.info("engine %s listening on %s", self.engine_id, self.nats_url)

    async def _open_store(self, startup: Startup) -> EventStore:
        """The log: the one given, or the one the store URL names, opened (and kept, so
        that ``stop`` closes it even if opening gave up)."""
        spec = self._store_spec
        if not isinstance(spec, str):
            return spec
        self.store = store_at(spec, nats_url=self.nats_url)
        await startup.attempt(f"the log {spec}", self.store.open)
        return self.store

    async def _connect(self, startup: Startup) -> NATS:
        """Connect within 5 s, or what is left of the start-up timeout if less."""
        timeout = min(5.0, max(startup.left, 1.0))
        return await connect(self.nats_url, timeout=timeout, hint=_NATS_HINT, name="evflow-engine")

    async def stop(self) -> None:
        """Stop taking commands, finish those in flight, publish what is left, close.

        Each stage is bounded by ``shutdown_timeout``: a command still running then is
        dropped unanswered (its events so far are in the log, and the next start drives it
        on), and notifications still unpublished go out on the next start.
        """
        timeout = self.shutdown_timeout
        try:
            await _quietly(
                "stopping the command intake",
                self._service.stop(timeout) if self._service else None,
                self.intake.stop(timeout) if self.intake else None,
            )
            await _quietly(
                "letting go of the partitions",
                self.leases.stop(timeout) if self.leases else None,
            )
            await _quietly(
                "stopping the timers",
                self.router.stop() if self.router else None,
                self.engine.stop(timeout) if self.engine else None,
            )
            outbox = self.outbox.close(timeout) if self.outbox else None
            await _quietly("draining the outbox", outbox)
            await self._hang_up(timeout)
        finally:
            if self.store is not None and isinstance(self._store_spec, str):
                await self.store.close()
        logger.info("stopped")

    async def _hang_up(self, timeout: float) -> None:
        """Drain the NATS connection, or close it if draining cannot finish (NATS gone)."""
        if self.nc is None or self.nc.is_closed:
            return
        try:
            await asyncio.wait_for(self.nc.drain(), timeout)
        except Exception as error:
            logger.warning("the NATS connection did not drain (%s); closing it", error)
            try:
                await self.nc.close()
            except OSError as lost:  # nats-py flushes on close, which fails with NATS gone
                logger.debug("closing the NATS connection: %s", lost)

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def _quietly(what: str, *stages: Awaitable[None] | None) -> None:
    """Run shutdown stages side by side; a failing one is logged, and shutdown goes on."""
    outcomes = await asyncio.gather(*(s for s in stages if s is not None), return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            logger.warning("%s failed: %s", what, outcome or type(outcome).__name__)
