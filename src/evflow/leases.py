"""Leases: which engine holds which partition of a shared log, kept in a key-value bucket.

Each partition (``partitions``) has a key ``partition.<n>`` naming its holder; each engine
has a key ``engine.<id>`` that it writes every ``renew`` seconds to say it is alive. A
holder renews its partitions by compare-and-set on the revision it last wrote, so a lease
that another engine took cannot be renewed, and two engines never both take one free key.

When is a lease free to take? When its key is missing or deleted (a holder let it go),
or when its revision has not moved for ``term`` seconds as this engine watched it (its
holder died or lost NATS). The wait is timed by the watcher's own clock from when it first
saw that revision, never by comparing clocks across machines. A holder that could not renew
for ``fence`` seconds (less than ``term``) stops acting on the partition by itself, before
anyone can take it; if nobody did, its next renewal takes it back.

Engines share the partitions evenly: each aims at its share of the live engines, takes
free partitions up to it, and lets go of any over it, after draining their work, so a new
engine gets a share within a few renewals.

Known limit: a holder cut off from NATS longer than ``fence`` stops starting work on its
partitions, but a step already running there finishes, and the partition's new holder may
drive the same execution on meanwhile: that step then runs twice (its result is recorded
once, by the version check). Temporal's activities have the same edge; keyed effects stay
exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable
from typing import Any, Protocol

import msgspec
from nats.aio.client import Client as NATS
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from .partitions import PARTITIONS
from .store.jetstream_requests import StreamRequests

logger = logging.getLogger(__name__)

TERM = 6.0
"""Seconds a lease's revision must stand still, as another engine watches it, before that
engine may take the partition: how long a dead engine's partitions wait for a new holder."""
FENCE = 4.0
"""Seconds without a successful renewal after which a holder stops acting on a partition."""
RENEW = 1.0
"""Seconds between renewals (and looks at the bucket)."""

_DELETED = ("DEL", "PURGE")


class Holder(Protocol):
    """What an engine does when its leases change."""

    async def gained(self, partition: int) -> None:
        """The partition is this engine's now: load its timers, drive on what is running."""

    async def lost(self, partition: int) -> None:
        """The partition may be another engine's now: stop acting on it at once."""

    async def release(self, partition: int) -> None:
        """The partition is to be let go: stop taking its work and let what runs finish."""


class _Seen(msgspec.Struct):
    """A key as this engine last saw it: its revision, since when (monotonic), its value."""

    revision: int
    since: float
    holder: str | None


class _Lease(msgspec.Struct):
    """A partition this engine holds: the revision it last wrote, and when that write was
    sent (monotonic); ``lapsed`` once it went ``FENCE`` seconds without a renewal."""

    revision: int
    sent: float
    lapsed: bool = False


class Leases:
    """This engine's leases on the partitions of one log.

    Args:
        nc: a connection to the NATS servers that hold the log.
        bucket: the key-value bucket of the leases (made if missing).
        replicas: copies of the bucket.
        engine: this engine's ID, unique among live engines.
        holder: told when a partition is gained, lost or to be let go.
    """

    def __init__(
        self,
        nc: NATS,
        bucket: str,
        replicas: int,
        engine: str,
        holder: Holder,
        *,
        term: float = TERM,
        fence: float = FENCE,
        renew: float = RENEW,
        timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.engine = engine
        self._nc = nc
        self._bucket_name = bucket
        self._replicas = replicas
        self._holder = holder
        self._term, self._fence, self._renew = term, fence, renew
        self._timeout = timeout
        self._clock = clock
        self._kv: Any = None
        self._reads = StreamRequests(nc, f"KV_{bucket}", timeout)
        self._seen: dict[str, _Seen] = {}
        self._held: dict[int, _Lease] = {}
        self._releasing: dict[int, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._fenced: set[int] = set()  # lapsed, and the holder was told it lost them
        self._stopping = False

    @property
    def held(self) -> frozenset[int]:
        """The partitions this engine acts on now (not lapsed, not being let go)."""
        return frozenset(
            p for p, lease in self._held.items() if not lease.lapsed and p not in self._releasing
        )

    async def open(self) -> None:
        """Make the bucket if it is missing."""
        js = self._nc.jetstream(timeout=self._timeout)
        self._kv = await js.create_key_value(
            bucket=self._bucket_name, history=1, replicas=self._replicas, direct=True
        )

    async def start(self) -> None:
        """Open the bucket, then keep the leases, a round every ``renew`` seconds."""
        await self.open()
        self._task = asyncio.create_task(self._keep(), name="evflow-leases")
        self._watchdog = asyncio.create_task(self._watch_fences(), name="evflow-fences")
        logger.info("engine %s keeps partition leases in %s", self.engine, self._bucket_name)

    async def stop(self, timeout: float | None = None) -> None:
        """Let go of every partition, each once its work has drained, so that the other
        engines take them over at once; then remove this engine's key.

        Work still running after ``timeout`` seconds keeps its partition: this engine
        stops renewing it, and it passes to another engine when its lease lapses."""
        if self._kv is None:
            return
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        draining = {
            p: asyncio.ensure_future(self._releasing.get(p) or self._holder.release(p))
            for p, lease in self._held.items()
            if not lease.lapsed
        }
        renewing = asyncio.create_task(self._renew_while_draining())
        try:
            if draining:
                await asyncio.wait(draining.values(), timeout=timeout)
        finally:
            for task in (renewing, self._watchdog):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            self._watchdog = None
        self._releasing.clear()
        kept = sorted(p for p, drain in draining.items() if not drain.done())
        for p in kept:
            draining[p].cancel()
        await asyncio.gather(*draining.values(), return_exceptions=True)
        if kept:
            logger.warning(
                "engine %s stops with work still running on partitions %s; they pass to "
                "another engine when their leases lapse, in %g s",
                self.engine,
                ", ".join(map(str, kept)),
                self._term,
            )
        await asyncio.gather(*(self._let_go(p) for p in list(self._held) if p not in kept))
        try:
            await self._kv.delete(self._engine_key(self.engine))
        except Exception as error:  # it lapses by itself within TERM
            logger.warning("engine %s could not remove its key (%s)", self.engine, error)

    async def _renew_while_draining(self) -> None:
        """Keep the leases while their work drains at stop, so none lapses meanwhile."""
        while True:
            await asyncio.sleep(self._renew)
            await self._renew_all()

    async def _watch_fences(self) -> None:
        """Stop acting on a lapsed lease within a quarter of a renewal of its fence, however
        long a round waits on NATS: the fence must pass well before another engine's term."""
        while True:
            await asyncio.sleep(self._renew / 4)
            try:
                await self.fence()
            except Exception:  # the engine failed to stop acting: an operator must know
                logger.exception(
                    "engine %s failed to stop acting on a lapsed partition", self.engine
                )

    async def _keep(self) -> None:
        """Run a round every ``renew`` seconds.

        Known limit: renewals are as frequent as whole rounds, and a round's other requests
        (look, take, let go) each wait up to ``timeout`` when JetStream is slow. Rounds
        stretched past the fence make an engine stop acting on partitions it still holds,
        then act again a round later: timers reload and recovery reruns, correctly but in
        vain."""
        while True:
            try:
                await self.tick()
            except Exception as error:
                logger.warning("keeping the partition leases failed (%s); trying again", error)
            await asyncio.sleep(self._renew)

    async def tick(self) -> None:
        """One round: say this engine is alive, renew, stop acting on what lapsed, look at
        the bucket, then take or let go of partitions towards this engine's share."""
        await self._let_go_drained()
        await asyncio.gather(self._beat(), self._renew_all())
        await self.fence()
        await self._look()
        await self._balance()

    async def _beat(self) -> None:
        try:
            await self._kv.put(self._engine_key(self.engine), b"alive")
        except Exception as error:  # the next round says it again
            logger.debug("engine %s could not say it is alive (%s)", self.engine, error)

    async def _let_go_drained(self) -> None:
        """Let go of the partitions whose work has drained (in the round, so that no
        renewal of the same key runs meanwhile)."""
        for partition, draining in list(self._releasing.items()):
            if draining.done():
                del self._releasing[partition]
                await self._let_go(partition)

    async def _renew_all(self) -> None:
        await asyncio.gather(*(self._renew_one(p) for p in list(self._held)))

    async def _renew_one(self, partition: int) -> None:
        lease = self._held[partition]
        sent = self._clock()
        try:
            revision = await self._kv.update(
                self._partition_key(partition), self.engine.encode(), last=lease.revision
            )
        except KeyWrongLastSequenceError:
            if not await self._wrote_last(partition, lease):
                await self._lose(partition, "another engine took it")
            return
        except Exception as error:
            logger.debug("renewing partition %d failed (%s)", partition, error)
            return
        if self._held.get(partition) is not lease:
            return  # let go meanwhile
        if lease.lapsed and not self._may_act_again(partition):
            self._held[partition] = _Lease(revision, sent, lapsed=True)
            return
        self._held[partition] = _Lease(revision, sent)
        if lease.lapsed:
            self._fenced.discard(partition)
            logger.info("engine %s holds partition %d again", self.engine, partition)
            await self._holder.gained(partition)

    def _may_act_again(self, partition: int) -> bool:
        """Whether a lapsed lease, renewed, may be acted on again: once the holder was told
        it lost it (not before, or its telling would undo this), and unless this engine is
        letting go of it (a surplus, or stopping): then it stays lapsed until let go."""
        return partition in self._fenced and partition not in self._releasing and not self._stopping

    async def _wrote_last(self, partition: int, lease: _Lease) -> bool:
        """Whether the key's latest revision is this engine's own: a renewal whose answer
        was lost (cut off, it reached the server late) moved it on. Only this engine writes
        its name, and only over a revision it holds or that lapsed, so the lease is still
        its own; the next round renews from that revision (and only then counts as sent).
        Not known (NATS out of reach): kept, to lapse by itself if it stays so."""
        try:
            entry = await self._kv.get(self._partition_key(partition))
        except KeyNotFoundError:
            return False
        except Exception as error:
            logger.debug("reading partition %d's lease failed (%s)", partition, error)
            return True
        if entry.value != self.engine.encode():
            return False
        if self._held.get(partition) is lease:
            lease.revision = entry.revision
        return True

    async def fence(self) -> None:
        """Tell the holder it lost every lease gone ``fence`` seconds without a renewal:
        it must stop acting before another engine may take them (``term``)."""
        now = self._clock()
        lapsed = [
            partition
            for partition, lease in self._held.items()
            if not lease.lapsed and now - lease.sent > self._fence
        ]
        if not lapsed:
            return
        for partition in lapsed:  # before any wait: the watchdog and a round both look
            self._held[partition].lapsed = True
        logger.warning(
            "engine %s could not renew its leases on partitions %s for over %.0f s; it "
            "stops acting on them until it can",
            self.engine,
            ", ".join(map(str, sorted(lapsed))),
            self._fence,
        )
        for partition in lapsed:
            await self._holder.lost(partition)
            self._fenced.add(partition)

    async def _look(self) -> None:
        """Read every key's latest revision; note when each revision was first seen."""
        prefix = f"$KV.{self._bucket_name}."
        messages = await self._reads.direct_all(f"{prefix}>", 1, None)
        now = self._clock()
        current: dict[str, _Seen] = {}
        for msg in messages:
            headers = msg.headers or {}
            key = headers["Nats-Subject"][len(prefix) :]
            revision = int(headers["Nats-Sequence"])
            deleted = headers.get("KV-Operation") in _DELETED
            holder = None if deleted else msg.data.decode()
            before = self._seen.get(key)
            since = before.since if before is not None and before.revision == revision else now
            current[key] = _Seen(revision, since, holder)
        self._seen = current

    async def _balance(self) -> None:
        share = math.ceil(PARTITIONS / len(self._live()))
        mine = [p for p in self._held if p not in self._releasing]
        if len(mine) > share:
            for partition in sorted(mine, reverse=True)[: len(mine) - share]:
                draining = self._holder.release(partition)
                self._releasing[partition] = asyncio.ensure_future(draining)
            return
        free = self._free()
        random.shuffle(free)  # engines starting together reach for different partitions
        await asyncio.gather(*(self._take(p) for p in free[: share - len(mine)]))

    def _live(self) -> set[str]:
        now = self._clock()
        live = {self.engine}
        for key, seen in self._seen.items():
            if key.startswith("engine.") and seen.holder is not None:
                if now - seen.since < self._term:
                    live.add(key.removeprefix("engine."))
        return live

    def _free(self) -> list[int]:
        now = self._clock()
        free = []
        for partition in range(PARTITIONS):
            if partition in self._held:
                continue
            seen = self._seen.get(self._partition_key(partition))
            if seen is None or seen.holder is None or now - seen.since >= self._term:
                free.append(partition)
        return free

    async def _take(self, partition: int) -> None:
        key = self._partition_key(partition)
        seen = self._seen.get(key)
        sent = self._clock()
        try:
            if seen is None:
                revision = await self._kv.create(key, self.engine.encode())
            else:
                revision = await self._kv.update(key, self.engine.encode(), last=seen.revision)
        except Exception as error:  # taken first by another engine, or NATS out of reach
            logger.debug("partition %d was not taken (%s)", partition, error)
            return
        self._held[partition] = _Lease(revision, sent)
        before = f" from engine {seen.holder}" if seen is not None and seen.holder else ""
        logger.info("engine %s took partition %d%s", self.engine, partition, before)
        await self._holder.gained(partition)

    async def _let_go(self, partition: int) -> None:
        self._fenced.discard(partition)
        lease = self._held.pop(partition, None)
        if lease is None:
            return
        try:
            await self._kv.delete(self._partition_key(partition), last=lease.revision)
        except Exception as error:  # it lapses by itself within TERM
            logger.warning("letting go of partition %d failed (%s)", partition, error)
            return
        logger.info("engine %s let go of partition %d", self.engine, partition)

    async def _lose(self, partition: int, why: str) -> None:
        self._fenced.discard(partition)
        lease = self._held.pop(partition, None)
        logger.warning("engine %s lost partition %d: %s", self.engine, partition, why)
        if lease is not None and not lease.lapsed:
            await self._holder.lost(partition)

    @staticmethod
    def _partition_key(partition: int) -> str:
        return f"partition.{partition}"

    @staticmethod
    def _engine_key(engine: str) -> str:
        return f"engine.{engine}"
