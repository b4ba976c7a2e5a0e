"""Time as the engine sees it: an injectable clock.

Every timestamp the engine records comes from one ``Clock``, so tests can substitute a
clock they move by hand. The durable timer scheduler (``wait_for`` / ``wait_until``) is
issue #4 and will live here too.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """A source of the current instant."""

    def now(self) -> datetime:
        """The current instant, timezone-aware, in UTC."""


class SystemClock:
    """The machine's wall clock."""

    def now(self) -> datetime:
        """The current instant, timezone-aware, in UTC."""
        return datetime.now(UTC)
