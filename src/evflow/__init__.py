"""evflow: an event-sourced pause-and-resume flow engine on NATS.

Flows are async functions registered on an ``App``; they run steps exactly once, pause for
outside input, and are resumed by replaying their code against an append-only log.
"""

__version__ = "0.1.0"

from .client import Client
from .context import Context
from .engine import Engine
from .errors import (
    AlreadyResumed,
    Conflict,
    EvflowError,
    Expired,
    Finished,
    FlowVersionGone,
    InvalidInput,
    InvalidJson,
    NondeterminismError,
    NotPaused,
    PauseTimedOut,
    StepError,
    TooLarge,
    Unavailable,
    UnknownExecution,
    UnknownFlow,
)
from .flow import App
from .state import ExecutionState, Status, fold
from .timers import ManualClock

__all__ = [
    "AlreadyResumed",
    "App",
    "Client",
    "Conflict",
    "Context",
    "Engine",
    "EvflowError",
    "ExecutionState",
    "Expired",
    "Finished",
    "FlowVersionGone",
    "InvalidInput",
    "InvalidJson",
    "ManualClock",
    "NondeterminismError",
    "NotPaused",
    "PauseTimedOut",
    "Status",
    "StepError",
    "TooLarge",
    "Unavailable",
    "UnknownExecution",
    "UnknownFlow",
    "__version__",
    "fold",
]
