"""The JetStream streams evflow keeps on its NATS server, and their settings.

``EVFLOW_EVENTS`` holds every notification (``<prefix>.events.>``), so a subscriber that was
offline catches up, and its duplicate window drops a notification published twice.
``EVFLOW_COMMANDS`` holds the commands services publish fire-and-forget
(``<prefix>.cmd.>``) until the engine has appended what they caused. Neither is the log:
the log is the store, and both streams can be rebuilt or dropped without losing a fact.
"""

from __future__ import annotations

import logging
import re

import msgspec
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import APIError

from .errors import EvflowError
from .startup import may_pass
from .subjects import Subjects

logger = logging.getLogger(__name__)

_NAME_IN_USE = 10058
"""JetStream's error code for a stream name taken with other settings."""

_DURATION = re.compile(r"^\s*(?P<amount>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|m|h|d)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(text: str, what: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``2h`` or ``7d``; 0 means unlimited where allowed."""
    match = _DURATION.match(text)
    if match is None:
        raise EvflowError(
            f"{what} '{text}' is not a duration; write a number with an optional unit "
            "ms, s, m, h or d, such as 90s or 7d"
        )
    return float(match["amount"]) * _SECONDS[match["unit"]]


class StreamSettings(msgspec.Struct, frozen=True):
    """How long and how much the streams keep; every field has a CLI flag and variable."""

    events_max_age: float = 7 * 86400
    """Seconds ``EVFLOW_EVENTS`` keeps a notification (0: until ``events_max_bytes``)."""
    events_max_bytes: int = -1
    """Bytes ``EVFLOW_EVENTS`` keeps before dropping the oldest (-1: no limit)."""
    duplicate_window: float = 120.0
    """Seconds in which a repeated ``Nats-Msg-Id`` is dropped, on both streams."""
    command_ack_wait: float = 30.0
    """Seconds before a command taken but not acknowledged is delivered again."""
    replicas: int = 1
    """Copies of each stream on a NATS cluster."""


class Streams:
    """Creates or updates the streams and the command consumer; names them for the others."""

    CONSUMER = "evflow-engine"
    """The durable consumer every engine pulls commands from."""

    def __init__(self, nc: NATS, subjects: Subjects, settings: StreamSettings | None = None):
        self.js: JetStreamContext = nc.jetstream(timeout=5)
        self.subjects = subjects
        self.settings = settings or StreamSettings()
        stem = re.sub(r"[^A-Za-z0-9]", "_", subjects.prefix).upper()
        self.events = f"{stem}_EVENTS"
        self.commands = f"{stem}_COMMANDS"

    async def ensure(self) -> None:
        """Create both streams and the consumer, or bring their settings up to date."""
        settings = self.settings
        events = js_api.StreamConfig(
            name=self.events,
            description="evflow notifications: every event appended to the log",
            subjects=[f"{self.subjects.prefix}.events.>"],
            retention=js_api.RetentionPolicy.LIMITS,
            max_age=settings.events_max_age,
            max_bytes=settings.events_max_bytes,
            storage=js_api.StorageType.FILE,
            duplicate_window=settings.duplicate_window,
            num_replicas=settings.replicas,
        )
        commands = js_api.StreamConfig(
            name=self.commands,
            description="evflow durable intake: commands waiting to be appended",
            subjects=[f"{self.subjects.prefix}.cmd.>"],
            retention=js_api.RetentionPolicy.WORK_QUEUE,
            storage=js_api.StorageType.FILE,
            duplicate_window=settings.duplicate_window,
            num_replicas=settings.replicas,
        )
        for config in (events, commands):
            await self._ensure_stream(config)
        await self._ensure_consumer()

    async def _ensure_stream(self, config: js_api.StreamConfig) -> None:
        try:
            try:
                await self.js.add_stream(config)
            except APIError as error:
                if error.err_code != _NAME_IN_USE:  # taken with other settings: update them
                    raise
                before = (await self.js.stream_info(config.name)).config
                await self.js.update_stream(config)
                self._say_changed(before, config)
        except NatsError as error:
            if may_pass(error):  # JetStream electing or out of reach: the start waits
                raise
            raise self._unusable(error) from None

    @staticmethod
    def _say_changed(before: js_api.StreamConfig, after: js_api.StreamConfig) -> None:
        """Warn of the settings this engine changed: on a cluster, engines share the
        streams, and the one started last decides, for all of them, how many copies and how
        much they keep."""
        changed = [
            f"{name} {getattr(before, name)} -> {getattr(after, name)}"
            for name in ("num_replicas", "max_age", "max_bytes", "duplicate_window")
            if getattr(after, name) is not None and getattr(before, name) != getattr(after, name)
        ]
        if changed:
            logger.warning(
                "changed the settings of stream %s (%s): every engine sharing it should be "
                "started with the same --replicas and stream options",
                after.name,
                ", ".join(changed),
            )

    async def _ensure_consumer(self) -> None:
        config = js_api.ConsumerConfig(
            durable_name=self.CONSUMER,
            description="evflow engines take commands from here",
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=self.settings.command_ack_wait,
            max_deliver=-1,
            max_ack_pending=10_000,
        )
        try:
            await self.js.add_consumer(self.commands, config)
        except NatsError as error:
            if may_pass(error):  # JetStream electing or out of reach: the start waits
                raise
            raise self._unusable(error) from None

    def _unusable(self, error: Exception) -> EvflowError:
        return EvflowError(
            f"cannot set up the JetStream streams {self.events} and {self.commands} ({error}); "
            "the NATS server must run with JetStream enabled (nats-server -js)"
        )
