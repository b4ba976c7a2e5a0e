"""The NATS subjects evflow listens and publishes on, built and parsed in one place.

The shape mirrors hosted workflow products' endpoints: ``<prefix>.flo.<flow>.invoke`` and
``<prefix>.flo.<flow>.resume.<execution_id>``.
"""

from __future__ import annotations

import re

import msgspec

from .errors import InvalidInput

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
"""What a flow name or an execution ID must be to travel as one token of a subject."""


def token(value: str, field: str) -> str:
    """``value``, once it is known to be usable as a subject token for ``field``.

    NATS splits subjects on dots, treats ``*`` and ``>`` as wildcards, refuses spaces, and
    drops a connection whose subject is too long; a name that breaks one of these is
    refused here, naming it, rather than sent to a subject no engine listens on.
    """
    if not _TOKEN.match(value):
        shown = value if len(value) <= 40 else f"{value[:40]}... ({len(value)} characters)"
        raise InvalidInput(
            f"the {field.replace('_', ' ')} '{shown}' cannot be part of a NATS subject; use "
            "1 to 128 letters, digits, '-' or '_' (execution IDs are 32 hex digits)",
            field=field,
        )
    return value


class Subjects(msgspec.Struct, frozen=True):
    """Subjects under one prefix (``evflow`` unless configured otherwise).

    Every flow name and execution ID placed in a subject is checked by ``token`` first.
    """

    prefix: str = "evflow"

    def invoke(self, flow: str) -> str:
        """Where an invoke of ``flow`` is requested."""
        return f"{self.prefix}.flo.{token(flow, 'flow')}.invoke"

    def resume(self, flow: str, execution_id: str) -> str:
        """Where a resume of one execution is requested."""
        return f"{self.prefix}.flo.{_execution(flow, execution_id, 'resume')}"

    def cancel(self, flow: str, execution_id: str) -> str:
        """Where a cancel of one execution is requested."""
        return f"{self.prefix}.flo.{_execution(flow, execution_id, 'cancel')}"

    def durable_invoke(self, flow: str) -> str:
        """Where an invoke of ``flow`` is published for durable intake (no reply)."""
        return f"{self.prefix}.cmd.flo.{token(flow, 'flow')}.invoke"

    def durable_resume(self, flow: str, execution_id: str) -> str:
        """Where a resume of one execution is published for durable intake (no reply)."""
        return f"{self.prefix}.cmd.flo.{_execution(flow, execution_id, 'resume')}"

    def durable_cancel(self, flow: str, execution_id: str) -> str:
        """Where a cancel of one execution is published for durable intake (no reply)."""
        return f"{self.prefix}.cmd.flo.{_execution(flow, execution_id, 'cancel')}"

    def get(self, execution_id: str) -> str:
        """Where an execution's folded state is queried."""
        return f"{self.prefix}.executions.get.{token(execution_id, 'execution_id')}"

    def history(self, execution_id: str) -> str:
        """Where an execution's events are queried."""
        return f"{self.prefix}.executions.history.{token(execution_id, 'execution_id')}"

    def partition(self, partition: int) -> str:
        """Where engines send a command to the engine that holds its execution's partition
        (``router``); internal to a cluster of engines."""
        return f"{self.prefix}.part.{partition}"

    def appended(self) -> str:
        """Where engines sharing a log say they appended, so the publishing outbox wakes."""
        return f"{self.prefix}.appended"

    def list_executions(self) -> str:
        """Where executions are listed, the most recently changed first, a page at a time."""
        return f"{self.prefix}.executions.list"

    def notification(self, flow: str, execution_id: str, kind: str) -> str:
        """Where the notification of one event is published."""
        return f"{self.prefix}.events.{flow}.{execution_id}.{kind}"

    def rejected(self) -> str:
        """Where the refusals of durable commands are published."""
        return f"{self.prefix}.events.rejected"

    def notifications(self, flow: str | None = None, kind: str | None = None) -> str:
        """A subscription pattern for notifications, of one flow or kind if given."""
        flow = token(flow, "flow") if flow else "*"
        kind = token(kind, "kind") if kind else "*"
        return f"{self.prefix}.events.{flow}.*.{kind}"

    def tokens(self, subject: str) -> list[str]:
        """The tokens of a subject after the prefix."""
        return subject[len(self.prefix) + 1 :].split(".")


def _execution(flow: str, execution_id: str, command: str) -> str:
    """``<flow>.<command>.<execution_id>``, both names checked."""
    return f"{token(flow, 'flow')}.{command}.{token(execution_id, 'execution_id')}"
