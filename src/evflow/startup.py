"""Starting an engine while NATS is not ready: each start-up step is tried again, with
backoff, while its failure may pass, within one deadline for the whole start.

A NATS cluster that lost a node elects new leaders, for JetStream as a whole (the meta
leader) and for each stream; meanwhile, and for as long as a majority of its nodes is
down, JetStream requests time out, find no responders, or are answered 503 ("JetStream
system temporarily unavailable"). An engine started then waits it out, as Temporal's and
Restate's servers wait for their stores, rather than exiting: a supervisor restarting it
in a loop would only add load to a cluster that is electing. A failure that will not
pass (a stream refused its settings, a server too old for atomic batches, a damaged log)
fails the start at once, since waiting would only delay the same answer.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nats.errors import (
    ConnectionReconnectingError,
    NoRespondersError,
    OutboundBufferLimitError,
    StaleConnectionError,
)
from nats.js.errors import APIError

from .errors import EvflowError, Unavailable
from .store.jetstream_requests import refusal_may_pass

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT = 60.0
"""Seconds a start may wait for NATS. An election takes a few seconds (nats-server bounds
one at 9 s, and a leader cut off from its quorum steps down within about 20 s); a node
restarted by a supervisor rejoins in tens of seconds. A minute rides out both with margin,
yet a start that cannot succeed still ends soon enough for its supervisor to say so."""

_FIRST_DELAY = 0.5
_MAX_DELAY = 5.0
"""Seconds between tries: doubling from the first to the most, with a little jitter so
that engines started together do not ask in step."""

_HINT = (
    "check that the NATS servers run with JetStream (-js) and that a majority of a "
    "cluster's nodes are up, or allow longer with --startup-timeout"
)

_PASSING_ERRORS = (
    TimeoutError,  # nats-py's TimeoutError is one too
    NoRespondersError,
    ConnectionReconnectingError,
    StaleConnectionError,
    OutboundBufferLimitError,
    ConnectionError,  # a socket refused or reset; not any OSError (a file's permissions)
)


def may_pass(error: BaseException) -> bool:
    """Whether a failed start-up request may succeed if asked again: NATS or JetStream out
    of reach or electing, not a refusal of what was asked."""
    if isinstance(error, Unavailable):
        return True
    if isinstance(error, EvflowError):
        return False
    if isinstance(error, APIError):
        return refusal_may_pass(error.code, error.err_code)
    return isinstance(error, _PASSING_ERRORS)


class Startup:
    """The deadline of one start, and the retries of its steps within it.

    Args:
        timeout: seconds the whole start may spend waiting for NATS (0: no retry). A try
            under way when the deadline passes runs to its own bound (a request's
            timeout, a few seconds), so a start may overrun it by that much.
    """

    def __init__(self, timeout: float = DEFAULT_TIMEOUT):
        self.timeout = timeout
        self._deadline = asyncio.get_running_loop().time() + timeout

    @property
    def left(self) -> float:
        """Seconds left before the deadline (0 once it passed)."""
        return max(self._deadline - asyncio.get_running_loop().time(), 0.0)

    async def attempt(self, what: str, step: Callable[[], Awaitable[T]], hint: str = _HINT) -> T:
        """Run ``step`` until it succeeds, trying again while its failure may pass and the
        deadline allows; then raise ``Unavailable`` naming ``what`` was waited for, its
        last failure and ``hint`` (what to do). A failure that will not pass is raised as
        it is, at once."""
        delay = _FIRST_DELAY
        while True:
            try:
                return await step()
            except Exception as error:
                if not may_pass(error):
                    raise
                if self.left <= 0:
                    raise self._gave_up(what, error, hint) from error
                pause = min(delay * random.uniform(0.8, 1.2), self.left)
                logger.warning(
                    "waiting for %s, trying again in %.1f s (%.0f s left to start): %s",
                    what,
                    pause,
                    self.left,
                    _reason(error),
                )
                await asyncio.sleep(pause)
                delay = min(delay * 2, _MAX_DELAY)

    def _gave_up(self, what: str, error: BaseException, hint: str) -> Unavailable:
        return Unavailable(
            f"could not reach {what} within the start-up timeout of {self.timeout:g} s "
            f"(last: {_reason(error)}); {hint}"
        )


def _reason(error: BaseException) -> str:
    """A failure in a few words: an evflow error's message, else what nats-py says."""
    if isinstance(error, EvflowError):  # "what happened; what to do": the hint says the latter
        return error.message.split("; ")[0]
    return str(error) or type(error).__name__
