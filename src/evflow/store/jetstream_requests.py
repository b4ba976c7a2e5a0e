"""The JetStream requests the JetStream log makes: API calls, gets from the stream's leader,
batched direct gets from any replica (of a subject's messages in order, or of the latest
message of each of many subjects), atomic batches and single checked publishes."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from typing import Any, NamedTuple

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from ..errors import StoreError, Unavailable

CATCH_UP = (0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
"""Seconds between reads a replica answered from behind what the stream's leader holds."""
DIRECT_BATCH = 256
"""Messages asked for at once from a direct get."""
MULTI_LAST = 1024
"""Subjects one direct get of latest messages (``multi_last``) may match: nats-server
answers 413 past it (``maxAllowedResponses`` in its stream.go, 2.11 to 2.12 at least)."""
SUBJECT_PAGE = 100_000
"""Subjects one stream info lists at most (nats-server's ``JSMaxSubjectDetails``)."""
_NO_MESSAGE = 10037
"""JetStream's error code for a message get that finds none."""
_PASSING = frozenset({10004, 10005, 10008, 10009, 10040})
"""JetStream's error codes for a cluster still forming or electing: incomplete (10004), no
peer to place replicas on yet (10005), temporarily unavailable (10008), not the leader
(10009), a peer not yet a member (10040)."""


class Message(NamedTuple):
    """A message as the stream's leader returned it."""

    sequence: int
    subject: str
    data: bytes


class TooManySubjects(StoreError):
    """A direct get of latest messages matched more than ``MULTI_LAST`` subjects: ask for
    fewer at a time."""


encode = msgspec.json.Encoder().encode


def refusal_may_pass(code: int | None, err_code: int | None) -> bool:
    """Whether JetStream's refusal (HTTP-like ``code``, its own ``err_code``) may not be
    given again once the cluster has its leaders: a 503, or a cluster still forming.

    Known limit: "no peer to place replicas on" also answers a stream asking for more
    replicas than the cluster has nodes; it is taken to pass (a node may be restarting),
    so such a start waits out its timeout before saying so.
    """
    return code == 503 or err_code in _PASSING


class StreamRequests:
    """Requests about one stream on one connection, each bounded by ``timeout`` seconds."""

    def __init__(self, nc: NATS, stream: str, timeout: float):
        self.nc = nc
        self.stream = stream
        self.timeout = timeout

    async def api(self, subject: str, body: dict[str, Any]) -> dict[str, Any]:
        """JetStream's answer to an API request, decoded."""
        nc = self.nc
        try:
            reply = await nc.request(subject, encode(body), timeout=self.timeout)
        except Exception as error:
            raise Unavailable(
                f"JetStream did not answer {subject} ({error!r}); check that the NATS "
                "servers run with JetStream (-js), then try again"
            ) from error
        return msgspec.json.decode(reply.data)

    async def leader_last(self, subject: str) -> Message | None:
        """The last message on ``subject`` (wildcards allowed), as the stream's leader holds
        it; None if there is none."""
        return await self._leader_get({"last_by_subj": subject}, subject)

    async def leader_at(self, sequence: int) -> Message | None:
        """The message at ``sequence``, as the stream's leader holds it; None if none."""
        return await self._leader_get({"seq": sequence}, f"sequence {sequence}")

    async def _leader_get(self, request: dict[str, Any], what: str) -> Message | None:
        reply = await self.api(f"$JS.API.STREAM.MSG.GET.{self.stream}", request)
        error = reply.get("error")
        if error is not None:
            if error.get("err_code") == _NO_MESSAGE:
                return None
            if refusal_may_pass(error.get("code"), error.get("err_code")):
                raise Unavailable(
                    f"JetStream could not answer a read of {what} in {self.stream} "
                    f"({error.get('description')}); try again once the cluster has a leader"
                )
            raise StoreError(
                f"JetStream refused a read of {what} in {self.stream} "
                f"({error.get('description')}); check that the stream exists (nats stream ls)"
            )
        message = reply["message"]
        data = base64.b64decode(message.get("data") or b"")
        return Message(int(message["seq"]), message["subject"], data)

    async def leader_subjects(self, subject: str) -> list[str]:
        """The subjects matching ``subject`` that hold messages, as the stream's leader
        holds them, a page of ``SUBJECT_PAGE`` at a time."""
        found: list[str] = []
        while True:
            request = {"subjects_filter": subject, "offset": len(found)}
            reply = await self.api(f"$JS.API.STREAM.INFO.{self.stream}", request)
            if "error" in reply:
                raise StoreError(
                    f"JetStream refused to list the subjects {subject} of {self.stream} "
                    f"({reply['error'].get('description')}); check that the stream exists"
                )
            page = list(reply.get("state", {}).get("subjects") or {})
            found += page
            if not page or len(found) >= int(reply.get("total", 0)):
                return found

    async def direct_all(self, subject: str, first: int, limit: int | None) -> list[Msg]:
        """The messages on ``subject`` from sequence ``first``, up to ``limit`` of them (all
        if None), in order, by batched direct gets."""
        found: list[Msg] = []
        start = first
        while limit is None or len(found) < limit:
            want = DIRECT_BATCH if limit is None else min(DIRECT_BATCH, limit - len(found))
            page, pending = await self._direct_batch(subject, start, want)
            found += page
            if not page or not pending:
                break
            start = sequence_of(page[-1]) + 1
        return found

    async def latest(self, subjects: list[str], up_to: int) -> list[Msg]:
        """The latest message at or before sequence ``up_to`` of each subject matching
        ``subjects`` (wildcards allowed), in sequence order, by direct gets from one
        replica at a time. Raises ``TooManySubjects`` past ``MULTI_LAST`` subjects."""
        found: list[Msg] = []
        request: dict[str, Any] = {"multi_last": subjects, "up_to_seq": up_to}
        while True:
            page, pending = await self._direct(request, subjects[0])
            found += page
            if not page or not pending:
                return found
            request["seq"] = sequence_of(page[-1]) + 1

    async def _direct_batch(self, subject: str, start: int, batch: int) -> tuple[list[Msg], int]:
        """One direct get of up to ``batch`` messages from sequence ``start``, and how many
        more the stream holds after them."""
        return await self._direct({"next_by_subj": subject, "seq": start, "batch": batch}, subject)

    async def _direct(self, request: dict[str, Any], subject: str) -> tuple[list[Msg], int]:
        """The messages one direct get answers with, and how many more it has after them.

        The answer is gathered by a callback rather than a wait per message: an answer of
        a thousand messages costs a thousand waits otherwise."""
        nc = self.nc
        page: list[Msg] = []
        closing: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()

        async def gather(msg: Msg) -> None:
            if msg.headers and "Status" in msg.headers:
                if not closing.done():
                    closing.set_result(msg)
            else:
                page.append(msg)

        inbox = nc.new_inbox()
        subscription = await nc.subscribe(inbox, cb=gather)
        try:
            await nc.publish(f"$JS.API.DIRECT.GET.{self.stream}", encode(request), reply=inbox)
            end = await asyncio.wait_for(closing, self.timeout)
        except TimeoutError as error:
            raise Unavailable(
                f"JetStream did not answer a read of {subject} in {self.stream} in time; "
                "try again once the cluster has a leader for it"
            ) from error
        finally:
            await subscription.unsubscribe()
        assert end.headers is not None
        return page, self._pending(end, end.headers["Status"], subject)

    def _pending(self, msg: Msg, status: str, subject: str) -> int:
        """What a direct get's closing status says: how many more messages it has."""
        assert msg.headers is not None
        if status == "404":
            return 0
        if status == "204":
            return int(msg.headers.get("Nats-Num-Pending", "0"))
        if status == "413":
            raise TooManySubjects(
                f"a read of the latest events of {subject} in {self.stream} matched more "
                f"than {MULTI_LAST} executions; read fewer at a time"
            )
        if status == "503":  # no replica answers: a node restarting, an election
            raise Unavailable(
                f"no JetStream replica answered a read of {subject} in {self.stream}; "
                "try again once the cluster has a leader for it"
            )
        raise StoreError(
            f"JetStream refused a read of {subject} in {self.stream} ({status} "
            f"{msg.headers.get('Description', '')}); the stream needs allow_direct, "
            "which the engine sets when it creates it"
        )


async def bucket_if_any(js: Any, bucket: str) -> Any:
    """The key-value bucket, or None if no engine made it yet (a read-only open)."""
    try:
        return await js.key_value(bucket)
    except Exception:  # nats-py raises BucketNotFoundError, or NotFoundError on old servers
        return None


async def stored_at(js: Any, subject: str, payload: bytes, after: int | None) -> int:
    """Publish one message, right after sequence ``after`` if given (else on an empty
    subject), and return its sequence."""
    headers = (
        {"Nats-Expected-Last-Sequence": str(after)}
        if after is not None
        else {"Nats-Expected-Last-Subject-Sequence": "0"}
    )
    try:
        ack = await js.publish(subject, payload, headers=headers)
    except Exception as error:
        raise StoreError(
            f"JetStream refused an imported message on {subject} ({error}); the log is "
            "partly imported: remove its stream (nats stream rm) and import again"
        ) from error
    return int(ack.seq)


async def atomic_batch(
    nc: NATS, messages: list[tuple[str, bytes, dict[str, str]]], timeout: float, stream: str
) -> dict[str, Any]:
    """Publish ``messages`` as one atomic batch and return JetStream's answer to its commit."""
    batch = hashlib.sha256(nc.new_inbox().encode()).hexdigest()[:32]
    inbox = nc.new_inbox()
    subscription = await nc.subscribe(inbox, max_msgs=1)
    try:
        for number, (subject, payload, headers) in enumerate(messages, start=1):
            headers = {**headers, "Nats-Batch-Id": batch, "Nats-Batch-Sequence": str(number)}
            if number == len(messages):
                headers["Nats-Batch-Commit"] = "1"
                await nc.publish(subject, payload, reply=inbox, headers=headers)
            else:
                await nc.publish(subject, payload, headers=headers)
        try:
            reply = await subscription.next_msg(timeout=timeout)
        except nats.errors.TimeoutError as error:
            raise Unavailable(
                "JetStream did not acknowledge an append in time; it may or may not have "
                "been stored: read the execution again before retrying"
            ) from error
    finally:
        await subscription.unsubscribe()
    if reply.headers and reply.headers.get("Status") == "503":
        raise Unavailable(
            f"no JetStream stream {stream} answered an append, so nothing was stored; it may "
            "be electing a leader (try again), or be missing (start the engine to create it)"
        )
    return msgspec.json.decode(reply.data)


def sequence_of(msg: Msg) -> int:
    """The stream sequence of a message a direct get answered with."""
    assert msg.headers is not None
    return int(msg.headers["Nats-Sequence"])
