"""Every error evflow raises, on the engine side and in the client.

The tree::

    EvflowError                     base; ``status`` (HTTP-like) and ``code`` (wire)
    ├── InvalidJson                 400 invalid_json: the body is not a JSON object
    ├── InvalidInput                400 invalid_input: a field is missing, mistyped or unknown
    ├── TooLarge                    413 too_large: a body or a reply exceeds what NATS carries
    ├── UnknownFlow                 404 unknown_flow
    ├── UnknownExecution            404 unknown_execution
    ├── Conflict                    409; carries the execution's status and version
    │   ├── NotPaused               409 not_paused
    │   ├── AlreadyResumed          409 already_resumed
    │   ├── Expired                 409 expired: the pause timed out before the resume came
    │   ├── Finished                409 finished
    │   └── FlowVersionGone         409 flow_version_gone: its flow version is not served
    ├── NondeterminismError         500 nondeterminism: flow code diverged from its history
    ├── ConcurrencyError            500 concurrency: another writer appended first
    ├── StoreError                  500 store: the log cannot be read or written
    ├── InternalError               500 internal: anything unexpected (details are logged)
    ├── Unavailable                 503 unavailable: NATS or the engine cannot be reached
    ├── StepError                   raised inside a flow when a step's function failed
    └── PauseTimedOut               raised inside a flow when a pause's deadline passed

The same classes travel over the wire: the service encodes one as an error reply and the
client decodes it back into the same class, so callers branch on the type or on ``code``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar


class EvflowError(Exception):
    """Base of every evflow error.

    Attributes:
        status: the HTTP-like status sent as ``Nats-Service-Error-Code``.
        code: the stable machine-readable code sent in the error body.
        message: a sentence naming the execution or field concerned and what to do.
        execution_id: the execution concerned, when there is one.
        details: extra fields carried in the error body (``field``, ``status``, ...).
    """

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"

    def __init__(self, message: str, *, execution_id: str | None = None, **details: Any):
        super().__init__(message)
        self.message = message
        self.execution_id = execution_id
        self.details = details

    def to_body(self) -> dict[str, Any]:
        """The ``error`` object of an error reply."""
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.execution_id is not None:
            body["execution_id"] = self.execution_id
        body.update(self.details)
        return body


class InvalidJson(EvflowError):
    """The command body is not a JSON object."""

    status = 400
    code = "invalid_json"


class InvalidInput(EvflowError):
    """A field of the command body is missing, of the wrong type, or unknown."""

    status = 400
    code = "invalid_input"

    @property
    def field(self) -> str | None:
        """The field concerned."""
        return self.details.get("field")


class TooLarge(EvflowError):
    """A command body, or the reply to a query, is larger than evflow or NATS carries."""

    status = 413
    code = "too_large"


class UnknownFlow(EvflowError):
    """No flow of that name is registered on the engine."""

    status = 404
    code = "unknown_flow"


class UnknownExecution(EvflowError):
    """No such execution, or it belongs to another flow."""

    status = 404
    code = "unknown_execution"


class Conflict(EvflowError):
    """The execution is not in a state that allows the command."""

    status = 409
    code = "conflict"

    @property
    def execution_status(self) -> str | None:
        """The execution's status when the command was refused (``status`` on the wire)."""
        return self.details.get("status")

    @property
    def version(self) -> int | None:
        """The execution's version when the command was refused."""
        return self.details.get("version")


class NotPaused(Conflict):
    """The execution is running or waiting on a timer, so there is nothing to resume."""

    code = "not_paused"


class AlreadyResumed(Conflict):
    """The pause named by the command was already answered."""

    code = "already_resumed"


class Expired(Conflict):
    """The pause the resume answers timed out before the resume arrived."""

    code = "expired"


class Finished(Conflict):
    """The execution completed, failed or was cancelled."""

    code = "finished"


class FlowVersionGone(Conflict):
    """The execution started on a version of its flow that this engine does not serve.

    It is a conflict between the execution and the engine's code, not a missing resource:
    the execution and its flow exist, and serving the old version beside the new one lets
    the same command succeed. Nothing was appended. Besides ``status`` and ``version`` (the
    execution's), the body carries ``flow``, ``flow_version`` (the version the execution
    started on) and ``registered`` (the versions the engine serves).
    """

    code = "flow_version_gone"

    @property
    def flow_version(self) -> int | None:
        """The version of the flow the execution started on."""
        return self.details.get("flow_version")

    @property
    def registered(self) -> list[int]:
        """The versions of the flow the engine serves."""
        return list(self.details.get("registered", []))


class NondeterminismError(EvflowError):
    """Replaying flow code issued a different operation than its history recorded."""

    code = "nondeterminism"


class ConcurrencyError(EvflowError):
    """An append found another version than it expected: another writer won."""

    code = "concurrency"


class DuplicateCommand(EvflowError):
    """An idempotency key was already used; the first command's outcome stands."""

    code = "duplicate"


class StoreError(EvflowError):
    """The log cannot be read or written."""

    code = "store"


class InternalError(EvflowError):
    """Something unexpected; the engine logged the details."""

    code = "internal"


class Unavailable(EvflowError):
    """NATS cannot be reached, no engine answers on the subject in time, or JetStream did
    not store a message."""

    status = 503
    code = "unavailable"


class StepError(EvflowError):
    """Raised inside a flow when a step's function raised.

    The same exception is raised when the failure happens and when it is replayed, so a
    flow's ``except StepError`` behaves identically on both paths. ``error_type`` is the
    original exception's class name.
    """

    code = "step_failed"

    def __init__(self, step: str, error_type: str, message: str):
        super().__init__(f"step '{step}' raised {error_type}: {message}")
        self.step = step
        self.error_type = error_type
        self.error_message = message


class PauseTimedOut(EvflowError):
    """Raised inside a flow when a pause got no answer before its deadline.

    A flow may catch it and carry on (escalate, remind, give up). A pause given a
    ``default`` returns that instead of raising. The same exception is raised live and on
    every replay.
    """

    code = "pause_timed_out"

    def __init__(self, pause: str, sequence: int, deadline: datetime, execution_id: str):
        super().__init__(
            f"pause '{pause}' (operation {sequence}) of execution {execution_id} got no "
            f"answer by its deadline {deadline.isoformat()}",
            execution_id=execution_id,
        )
        self.pause = pause
        self.sequence = sequence
        self.deadline = deadline


WIRE_ERRORS: tuple[type[EvflowError], ...] = (
    InvalidJson,
    InvalidInput,
    TooLarge,
    UnknownFlow,
    UnknownExecution,
    NotPaused,
    AlreadyResumed,
    Expired,
    Finished,
    FlowVersionGone,
    NondeterminismError,
    ConcurrencyError,
    StoreError,
    InternalError,
)
"""The errors an engine sends in error replies and rejections (``Unavailable`` is the
client's own); the published error schema lists their codes."""

_BY_CODE: dict[str, type[EvflowError]] = {cls.code: cls for cls in (*WIRE_ERRORS, Unavailable)}


def from_body(body: dict[str, Any]) -> EvflowError:
    """Rebuild the error a service sent, as the same class, from an error body."""
    fields = dict(body)
    code = str(fields.pop("code", "internal"))
    message = str(fields.pop("message", "the engine sent an error without a message"))
    execution_id = fields.pop("execution_id", None)
    cls = _BY_CODE.get(code, EvflowError)
    error = cls(message, execution_id=execution_id, **fields)
    if cls is EvflowError:
        error.details["code"] = code
    return error
