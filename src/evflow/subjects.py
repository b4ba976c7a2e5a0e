"""The NATS subjects evflow listens and publishes on, built and parsed in one place.

The shape mirrors hosted workflow products' endpoints: ``<prefix>.flo.<flow>.invoke`` and
``<prefix>.flo.<flow>.resume.<execution_id>``.
"""

from __future__ import annotations

import msgspec


class Subjects(msgspec.Struct, frozen=True):
    """Subjects under one prefix (``evflow`` unless configured otherwise)."""

    prefix: str = "evflow"

    def invoke(self, flow: str) -> str:
        """Where an invoke of ``flow`` is requested."""
        return f"{self.prefix}.flo.{flow}.invoke"

    def resume(self, flow: str, execution_id: str) -> str:
        """Where a resume of one execution is requested."""
        return f"{self.prefix}.flo.{flow}.resume.{execution_id}"

    def durable_invoke(self, flow: str) -> str:
        """Where an invoke of ``flow`` is published for durable intake (no reply)."""
        return f"{self.prefix}.cmd.flo.{flow}.invoke"

    def durable_resume(self, flow: str, execution_id: str) -> str:
        """Where a resume of one execution is published for durable intake (no reply)."""
        return f"{self.prefix}.cmd.flo.{flow}.resume.{execution_id}"

    def get(self, execution_id: str) -> str:
        """Where an execution's folded state is queried."""
        return f"{self.prefix}.executions.get.{execution_id}"

    def history(self, execution_id: str) -> str:
        """Where an execution's events are queried."""
        return f"{self.prefix}.executions.history.{execution_id}"

    def notification(self, flow: str, execution_id: str, kind: str) -> str:
        """Where the notification of one event is published."""
        return f"{self.prefix}.events.{flow}.{execution_id}.{kind}"

    def rejected(self) -> str:
        """Where the refusals of durable commands are published."""
        return f"{self.prefix}.events.rejected"

    def notifications(self, flow: str | None = None, kind: str | None = None) -> str:
        """A subscription pattern for notifications, of one flow or kind if given."""
        return f"{self.prefix}.events.{flow or '*'}.*.{kind or '*'}"

    def tokens(self, subject: str) -> list[str]:
        """The tokens of a subject after the prefix."""
        return subject[len(self.prefix) + 1 :].split(".")
