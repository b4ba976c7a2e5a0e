"""Connecting to NATS: a bounded first attempt, then reconnects that are logged, not raised.

nats-py retries a first connection forever when reconnects are unlimited and logs each
failure with a traceback. The engine and the client both want the opposite at start-up:
fail within a bound, naming the URL, so a wrong ``--nats`` is a one-line error. Once
connected, losing the server is a recoverable fault: nats-py reconnects and we log it.
"""

from __future__ import annotations

import asyncio
import logging

import nats
from nats.aio.client import Client as NATS

from .errors import Unavailable

logger = logging.getLogger(__name__)


class _Watch:
    """Remembers the latest connection error and logs faults once connected: one warning
    line each (nats-py's default logs a traceback), and of the failed reconnects of an
    outage only the first, as they repeat every few seconds for each server until it ends.
    """

    def __init__(self, url: str):
        self.url = url
        self.nc: NATS | None = None
        self.last_error: BaseException | None = None
        self._reconnecting = False
        self._told = False  # a failure of this outage's reconnects was logged

    async def error(self, error: Exception) -> None:
        self.last_error = error
        reason = error or type(error).__name__
        if self.nc is None:
            logger.debug("connecting to NATS at %s failed: %s", self.url, reason)
        elif self._reconnecting and self._told:
            logger.debug("reconnecting to NATS at %s failed: %s", self.url, reason)
        else:
            logger.warning("NATS connection to %s: %s", self.url, reason)
            self._told = self._reconnecting

    async def disconnected(self) -> None:
        if self.nc is not None and not self.nc.is_closed:  # closed: we hung up ourselves
            self._reconnecting = True
            logger.warning("disconnected from NATS at %s; reconnecting", self.url)

    async def reconnected(self) -> None:
        self._reconnecting = self._told = False
        logger.info("reconnected to NATS at %s", self.url)


def servers(url: str) -> list[str]:
    """The servers a NATS URL names: one, or several joined by commas (a cluster's nodes,
    between which the connection fails over)."""
    return [part.strip() for part in url.split(",") if part.strip()]


async def connect(url: str, *, timeout: float, hint: str, name: str = "evflow") -> NATS:
    """Connect to ``url`` within ``timeout`` seconds, or raise an error naming it.

    Once connected, the connection reconnects without limit. ``hint`` ends the error
    message with what the user should do.
    """
    watch = _Watch(url)
    try:
        nc = await asyncio.wait_for(
            nats.connect(
                servers(url),
                name=name,
                connect_timeout=timeout,
                max_reconnect_attempts=-1,
                error_cb=watch.error,
                disconnected_cb=watch.disconnected,
                reconnected_cb=watch.reconnected,
            ),
            timeout,
        )
    except Exception as error:
        cause = watch.last_error or error
        reason = str(cause) or type(cause).__name__
        raise Unavailable(f"cannot connect to NATS at {url} ({reason}); {hint}") from None
    watch.nc = nc
    return nc
