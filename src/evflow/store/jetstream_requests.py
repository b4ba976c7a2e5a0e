"""The JetStream requests the JetStream log makes: API calls, gets from the stream's leader,
batched direct gets from any replica, atomic batches and single checked publishes."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from ..errors import StoreError, Unavailable

DIRECT_BATCH = 256
"""Messages asked for at once from a direct get."""
_NO_MESSAGE = 10037
"""JetStream's error code for a message get that finds none."""
_PASSING = frozenset({10004, 10005, 10008, 10009, 10040})
"""JetStream's error codes for a cluster still forming or electing: incomplete (10004), no
peer to place replicas on yet (10005), temporarily unavailable (10008), not the leader
(10009), a peer not yet a member (10040)."""

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

    async def leader_last(self, subject: str) -> tuple[int, bytes] | None:
        """The sequence and body of the last message on ``subject`` (wildcards allowed), as
        the stream's leader holds it; None if there is none."""
        reply = await self.api(f"$JS.API.STREAM.MSG.GET.{self.stream}", {"last_by_subj": subject})
        error = reply.get("error")
        if error is not None:
            if error.get("err_code") == _NO_MESSAGE:
                return None
            if refusal_may_pass(error.get("code"), error.get("err_code")):
                raise Unavailable(
                    f"JetStream could not answer a read of {subject} in {self.stream} "
                    f"({error.get('description')}); try again once the cluster has a leader"
                )
            raise StoreError(
                f"JetStream refused a read of {subject} in {self.stream} "
                f"({error.get('description')}); check that the stream exists (nats stream ls)"
            )
        message = reply["message"]
        return int(message["seq"]), base64.b64decode(message.get("data") or b"")

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

    async def _direct_batch(self, subject: str, start: int, batch: int) -> tuple[list[Msg], int]:
        """One direct get of up to ``batch`` messages from sequence ``start``, and how many
        more the stream holds after them."""
        nc = self.nc
        inbox = nc.new_inbox()
        subscription = await nc.subscribe(inbox)
        request = {"next_by_subj": subject, "seq": start, "batch": batch}
        try:
            await nc.publish(f"$JS.API.DIRECT.GET.{self.stream}", encode(request), reply=inbox)
            page: list[Msg] = []
            while True:
                msg = await subscription.next_msg(timeout=self.timeout)
                status = msg.headers.get("Status") if msg.headers else None
                if status is None:
                    page.append(msg)
                    continue
                if status == "404":
                    return page, 0
                if status == "204":
                    return page, int(msg.headers.get("Nats-Num-Pending", "0"))
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
        except nats.errors.TimeoutError as error:
            raise Unavailable(
                f"JetStream did not answer a read of {subject} in {self.stream} in time; "
                "try again once the cluster has a leader for it"
            ) from error
        finally:
            await subscription.unsubscribe()


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
    assert msg.headers is not None
    return int(msg.headers["Nats-Sequence"])
