"""A running engine: the log, the NATS connection, the engine, notifications and the service,
started and stopped together in the right order.

``evflow serve`` runs one; tests run one in-process against a real nats-server.
"""

from __future__ import annotations

import logging

from nats.aio.client import Client as NATS

from .connection import connect
from .engine import Engine
from .flow import App
from .notify import Notifier
from .service import EvflowService
from .store import EventStore, open_store
from .subjects import Subjects
from .timers import Clock

logger = logging.getLogger(__name__)


class Server:
    """Serves an ``App`` on NATS with a durable log.

    Args:
        app: the flows to serve.
        store: a store URL (``sqlite:///PATH``) or an open ``EventStore``.
        nats_url: the NATS server to connect to.
        subjects: the subjects to serve (prefix ``evflow`` by default).
        clock: the engine's clock.
    """

    def __init__(
        self,
        app: App,
        store: str | EventStore,
        nats_url: str,
        subjects: Subjects | None = None,
        clock: Clock | None = None,
    ):
        self.app = app
        self.nats_url = nats_url
        self.subjects = subjects or Subjects()
        self._store_spec = store
        self._clock = clock
        self.store: EventStore | None = None
        self.nc: NATS | None = None
        self.engine: Engine | None = None
        self._notifier: Notifier | None = None
        self._service: EvflowService | None = None

    async def start(self) -> None:
        """Open the log, connect, drive on interrupted executions, then take commands."""
        spec = self._store_spec
        self.store = await open_store(spec) if isinstance(spec, str) else spec
        self.nc = await self._connect()
        self._notifier = Notifier(self.nc, self.subjects)
        self._notifier.start()
        self.engine = Engine(self.app, self.store, self._clock, self._notifier)

        recovered = await self.engine.recover()
        logger.info("recovered %d interrupted executions", recovered)

        self._service = EvflowService(self.nc, self.engine, self.subjects)
        await self._service.start()
        await self.nc.flush()  # the server knows our subscriptions before we say we listen
        logger.info("listening on %s", self.nats_url)

    async def _connect(self) -> NATS:
        hint = "start a nats-server there, or leave out --nats to run the embedded one"
        return await connect(self.nats_url, timeout=5, hint=hint, name="evflow-engine")

    async def stop(self) -> None:
        """Stop taking commands, finish those in flight, publish what is queued, close."""
        if self._service is not None:
            await self._service.stop()
        if self._notifier is not None:
            await self._notifier.close()
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.drain()
        if self.store is not None and isinstance(self._store_spec, str):
            await self.store.close()
        logger.info("stopped")

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
