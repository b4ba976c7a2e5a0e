"""The SQLite log's writer thread: it owns the write connection and commits back to back.

Appends and checkpoint moves queue up here from the event loop. The thread takes every
request waiting when it is free, commits them as one transaction, and hands the outcomes
back to the event loop in one call. It then takes the next batch at once: it never waits
for the event loop to send it work, which under load kept the writer idle for a whole
turn of a busy loop between commits. A lone append is committed the moment it arrives.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..errors import StoreError
from . import sqlite_writer
from .sqlite_writer import Append, Checkpoint, Outcome

logger = logging.getLogger(__name__)

T = TypeVar("T")

Committed = Callable[[int | None, list[Append | Checkpoint], list[Outcome]], None]
"""Called on the event loop after each commit: the log's last position before the batch's
rows (None if it wrote none), the batch, and each request's outcome."""


class _Job:
    """Other work for the write connection (an import), run between batches."""

    def __init__(self, work: Callable[..., Any], args: tuple[Any, ...]):
        self.work = work
        self.args = args
        self.done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()


class _Stop:
    """Queued last by ``stop``: everything before it is written first."""


_Request = Append | Checkpoint | _Job | _Stop


class WriterThread:
    """The thread that writes the log.

    Args:
        path: the database file.
        synchronous: SQLite's ``synchronous`` pragma for the write connection.
        committed: told of every commit, on the event loop.
    """

    def __init__(self, path: Path, synchronous: str, committed: Committed):
        self.path = path
        self._synchronous = synchronous
        self._committed = committed
        self._heads = sqlite_writer.Heads()
        self._requests: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._open = True  # until the thread ends; guarded by _taking
        self._taking = threading.Lock()
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="evflow-sqlite-writer", daemon=True)
        self._started: asyncio.Future[None] = self._loop.create_future()
        self._stopped: asyncio.Future[None] = self._loop.create_future()

    async def start(self) -> None:
        """Start the thread and open the write connection (its errors are raised here)."""
        self._thread.start()
        await self._started

    def submit(self, request: Append | Checkpoint) -> None:
        """Queue an append or a checkpoint move; its ``done`` future gives the outcome."""
        self._put(request)

    async def call(self, work: Callable[..., T], *args: Any) -> T:
        """Run ``work(connection, *args)`` on the thread, between batches."""
        job = _Job(work, args)
        self._put(job)
        return await job.done

    def _put(self, request: _Request) -> None:
        """Queue a request, or refuse it once the thread has ended (stopped, or failed):
        nothing queued is ever left unanswered."""
        with self._taking:
            if not self._open:
                raise StoreError(
                    f"the SQLite log at {self.path} is closed, so nothing was written; "
                    "open it again before writing"
                )
            self._requests.put(request)

    async def stop(self) -> None:
        """Let everything queued so far be written, then close the connection."""
        if not self._thread.is_alive():
            return
        self._requests.put(_Stop())
        await self._stopped

    def _run(self) -> None:
        try:
            db = sqlite_writer.connect(self.path, self._synchronous)
        except BaseException as error:
            self._loop.call_soon_threadsafe(_settle, self._started, None, error)
            return
        self._loop.call_soon_threadsafe(_settle, self._started, None, None)
        try:
            self._serve(db)
        finally:
            db.close()
            self._refuse_the_rest()
            self._loop.call_soon_threadsafe(_settle, self._stopped, None, None)

    def _refuse_the_rest(self) -> None:
        """Close the queue, and refuse what reached it after the stop (or after a failure
        that ended the thread): those requests were not written."""
        with self._taking:
            self._open = False
        left: list[Append | Checkpoint | _Job] = []
        while not self._requests.empty():
            request = self._requests.get_nowait()
            if not isinstance(request, _Stop):
                left.append(request)
        if left:
            failure = StoreError(
                f"the SQLite log at {self.path} closed before this was written; nothing was "
                "written: try again once the store is open"
            )
            self._loop.call_soon_threadsafe(_fail, left, failure)

    def _serve(self, db: sqlite3.Connection) -> None:
        held: _Request | None = None  # taken from the queue while gathering a batch
        while True:
            first = held or self._requests.get()
            held = None
            if isinstance(first, _Stop):
                return
            if isinstance(first, _Job):
                self._run_job(db, first)
                continue

            batch = [first]
            while not self._requests.empty():
                request = self._requests.get_nowait()
                if not isinstance(request, Append | Checkpoint):
                    held = request
                    break
                batch.append(request)
            self._commit(db, batch)

    def _commit(self, db: sqlite3.Connection, batch: list[Append | Checkpoint]) -> None:
        try:
            before, outcomes = sqlite_writer.commit(db, batch, self._heads)
        except Exception as error:  # the whole transaction failed: fail every request
            logger.exception("the SQLite log at %s failed to commit a batch", self.path)
            failure = StoreError(f"appending to the SQLite log at {self.path} failed: {error}")
            self._loop.call_soon_threadsafe(_fail, batch, failure)
            return
        self._loop.call_soon_threadsafe(self._committed, before, batch, outcomes)

    def _run_job(self, db: sqlite3.Connection, job: _Job) -> None:
        self._heads.forget()  # the job may write rows of its own (an import)
        try:
            result = job.work(db, *job.args)
        except BaseException as error:
            self._loop.call_soon_threadsafe(_settle, job.done, None, error)
        else:
            self._loop.call_soon_threadsafe(_settle, job.done, result, None)


def _settle(done: asyncio.Future[Any], result: object, error: BaseException | None) -> None:
    if done.done():
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(result)


def _fail(requests: Sequence[Append | Checkpoint | _Job], failure: Exception) -> None:
    for request in requests:
        _settle(request.done, None, failure)
