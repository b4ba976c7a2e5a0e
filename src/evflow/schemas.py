"""JSON Schemas of what evflow answers, publishes and stores, generated from its msgspec types.

``evflow schemas`` writes them, with the AsyncAPI document of the subjects (``asyncapi``),
to the repository's ``schemas/`` folder; a test fails when the checked-in files differ
from what this module generates, so the published contract cannot drift from the types
the engine encodes with. Each file stands alone (the types it uses are in its own
``$defs``), so any JSON Schema 2020-12 validator can check a message with one file.

msgspec writes the shapes; this module adds what msgspec cannot know: the ``$schema``,
``$id`` and title of each file, each field's description (the docstring under the field),
``date-time`` on every timestamp (the engine only ever writes them with an offset, in
UTC), the notification kinds, and the error object with its codes.
"""

from __future__ import annotations

import ast
import functools
import inspect
import json
import textwrap
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi

from . import asyncapi
from .chain import Record
from .commands import CancelBody
from .errors import WIRE_ERRORS, Conflict
from .events import EVENT_TYPES, AnyEvent, StoredEvent
from .fields import schema as body_schema
from .flow import App
from .messages import (
    Cancelled,
    Completed,
    ErrorReply,
    ExecutionList,
    Failed,
    GetQuery,
    History,
    ListQuery,
    Notification,
    Paused,
    Rejection,
    Settled,
    Waiting,
)
from .state import ExecutionState, Status

DIALECT = "https://json-schema.org/draft/2020-12/schema"
ID_PREFIX = "urn:evflow:schemas:"
"""Each file's ``$id`` is this prefix and its path in the schemas folder."""

_REF = "#/$defs/{name}"


class Document(msgspec.Struct, frozen=True):
    """One schema file: where it goes, the type it describes, and its title."""

    path: str
    """Path in the schemas folder."""
    kind: Any
    """The msgspec type (a Struct, a union of them, or a builtin type)."""
    title: str
    """Title of the file's schema."""
    description: str | None = None
    """Description of the file's schema; None keeps the type's docstring."""


DOCUMENTS: tuple[Document, ...] = (
    Document(
        "commands/invoke.json",
        dict[str, Any],
        "Invoke body",
        "The flow's input fields, as a JSON object (an empty body stands for {}). Each flow "
        "declares its own fields: `evflow schemas --app MODULE:ATTR` writes them per flow.",
    ),
    Document(
        "commands/resume.json",
        dict[str, Any],
        "Resume body",
        "The pause's output fields, as a JSON object (an empty body stands for {}). Each "
        "pause declares its own: the `output_schema` of its paused reply or notification.",
    ),
    Document("commands/cancel.json", CancelBody, "Cancel body"),
    Document("commands/get.json", GetQuery, "Get query body"),
    Document("commands/list.json", ListQuery, "List query body"),
    Document(
        "replies/settled.json",
        Settled,
        "Settle point",
        "The reply to an invoke, a resume or a cancel: where the execution settled, tagged "
        "by `status`.",
    ),
    Document("replies/paused.json", Paused, "Paused reply"),
    Document("replies/waiting.json", Waiting, "Waiting reply"),
    Document("replies/completed.json", Completed, "Completed reply"),
    Document("replies/failed.json", Failed, "Failed reply"),
    Document("replies/cancelled.json", Cancelled, "Cancelled reply"),
    Document("replies/state.json", ExecutionState, "Execution state (reply to get)"),
    Document("replies/history.json", History, "History (reply to history)"),
    Document("replies/list.json", ExecutionList, "Execution list (reply to list)"),
    Document("error.json", ErrorReply, "Error reply"),
    Document("notification.json", Notification, "Notification"),
    Document("rejection.json", Rejection, "Rejection of a durable command"),
    Document("stored-event.json", StoredEvent, "Stored event"),
    Document(
        "export-record.json",
        Record,
        "Exported event",
        "One line of `evflow export`: an event exactly as the log stores it, its `data` the "
        "event object, with the hash chain that `evflow verify` checks.",
    ),
    Document(
        "event.json",
        AnyEvent,
        "Event",
        "Any event, tagged by `type`: the `event` of a stored event, and the `data` column "
        "of the SQLite log.",
    ),
    *(Document(f"events/{cls.__name__}.json", cls, f"{cls.__name__} event") for cls in EVENT_TYPES),
)
"""Every schema file; a new wire type is one more line here."""


def generate(app: App | None = None) -> dict[str, bytes]:
    """Every file of the schemas folder, path to content; with ``app``, its invoke bodies."""
    documents = {doc.path: schema_of(doc) for doc in DOCUMENTS}
    if app is not None:
        for flow in app.latest():  # invokes start on, and validate against, the latest
            documents[f"flows/{flow.name}.invoke.json"] = flow_schema(
                flow.name, flow.inputs, flow.fn
            )
    files = {path: _dump(schema) for path, schema in documents.items()}
    files[asyncapi.PATH] = _dump(asyncapi.document())
    files["README.md"] = _readme(documents).encode()
    return dict(sorted(files.items()))


def schema_of(doc: Document) -> dict[str, Any]:
    """The standalone JSON Schema of one document."""
    (top,), components = msgspec.json.schema_components([doc.kind], ref_template=_REF)
    _describe(components, doc.kind)

    # A Struct is the root itself, not a $ref to it, so the file reads from the top.
    name = top.get("$ref", "").removeprefix(_REF.format(name=""))
    if name in components and _REF.format(name=name) not in json.dumps(components):
        root = components.pop(name)
    else:
        root = top

    root.update({"$schema": DIALECT, "$id": ID_PREFIX + doc.path, "title": doc.title})
    if doc.description is not None:
        root["description"] = doc.description
    if components:
        root["$defs"] = components
    return root


def flow_schema(name: str, inputs: type[msgspec.Struct], fn: Any) -> dict[str, Any]:
    """The JSON Schema of one flow's invoke body, the type its signature declares."""
    schema = body_schema(inputs)
    schema.update(
        {
            "$schema": DIALECT,
            "$id": f"{ID_PREFIX}flows/{name}.invoke.json",
            "title": f"Invoke body of flow '{name}'",
        }
    )
    if fn.__doc__:
        schema["description"] = inspect.cleandoc(fn.__doc__)
    return schema


def stale(folder: Path, files: dict[str, bytes]) -> list[str]:
    """What in ``folder`` differs from ``files``: one line per file missing, changed or extra."""
    problems = []
    for path, content in files.items():
        target = folder / path
        if not target.is_file():
            problems.append(f"{target}: missing")
        elif target.read_bytes() != content:
            problems.append(f"{target}: differs from what the code generates")
    for extra in sorted(_present(folder) - set(files)):
        problems.append(f"{folder / extra}: not generated by this command (delete it if stale)")
    return problems


def write(folder: Path, files: dict[str, bytes]) -> list[str]:
    """Write ``files`` under ``folder``; returns the files there that were not generated."""
    for path, content in files.items():
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.is_file() or target.read_bytes() != content:
            target.write_bytes(content)
    return sorted(_present(folder) - set(files))


def _present(folder: Path) -> set[str]:
    if not folder.is_dir():
        return set()
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _dump(schema: dict[str, Any]) -> bytes:
    """Stable bytes: sorted keys, two-space indent, a final newline."""
    return (json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def _describe(components: dict[str, dict[str, Any]], kind: Any) -> None:
    """Add to msgspec's components what it cannot know (see the module docstring)."""
    for cls, info in _structs(kind).items():
        properties = components[cls.__name__]["properties"]
        docs = _field_docs(cls)
        for field in info.fields:
            prop = properties[field.encode_name]
            if field.name in docs:
                prop["description"] = docs[field.name]
            if _is_datetime(field.type):
                _mark_date_time(prop)

    # Fields whose Python type is looser than what the engine puts in them.
    for owner in ("ErrorReply", "Rejection"):
        if owner in components:
            error = components[owner]["properties"]["error"]
            error.pop("type", None)
            error["$ref"] = _REF.format(name="Error")
            components["Error"] = _error_object()
    if "Notification" in components:
        kind_field = components["Notification"]["properties"]["kind"]
        kind_field.pop("type", None)
        kind_field["enum"] = sorted(cls.kind for cls in EVENT_TYPES)


def _structs(kind: Any) -> dict[type, mi.StructType]:
    """Every Struct type reachable from ``kind``."""
    found: dict[type, mi.StructType] = {}

    def visit(info: mi.Type) -> None:
        if isinstance(info, mi.StructType) and info.cls not in found:
            found[info.cls] = info
            for field in info.fields:
                visit(field.type)
        elif isinstance(info, mi.UnionType):
            for member in info.types:
                visit(member)
        elif isinstance(info, mi.Metadata):
            visit(info.type)
        elif isinstance(info, (mi.ListType, mi.VarTupleType, mi.SetType, mi.FrozenSetType)):
            visit(info.item_type)
        elif isinstance(info, mi.DictType):
            visit(info.value_type)

    visit(mi.type_info(kind))
    return found


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under a Struct's fields, its bases' included."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if not issubclass(base, msgspec.Struct) or base is msgspec.Struct:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(base))
        except (OSError, TypeError):  # made at run time (defstruct): nothing written
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for field, doc in zip(body, body[1:], strict=False):
            if (
                isinstance(field, ast.AnnAssign)
                and isinstance(field.target, ast.Name)
                and isinstance(doc, ast.Expr)
                and isinstance(doc.value, ast.Constant)
                and isinstance(doc.value.value, str)
            ):
                docs[field.target.id] = inspect.cleandoc(doc.value.value)
    return docs


def _is_datetime(info: mi.Type) -> bool:
    if isinstance(info, mi.UnionType):
        return any(_is_datetime(member) for member in info.types)
    return isinstance(info, mi.DateTimeType)


def _mark_date_time(prop: dict[str, Any]) -> None:
    """Give the string branch of a timestamp field the ``date-time`` format."""
    for branch in [prop, *prop.get("anyOf", [])]:
        if branch.get("type") == "string":
            branch["format"] = "date-time"


_ERROR_DETAILS: dict[str, tuple[dict[str, Any], str]] = {
    "execution_id": ({"type": "string"}, "The execution concerned."),
    "field": ({"type": ["string", "null"]}, "The field or header at fault (invalid_input)."),
    "valid": ({"type": "array"}, "The values the field takes (invalid_input, for a choice)."),
    "flow": ({"type": "string"}, "The flow name (unknown_flow, flow_version_gone)."),
    "status": (
        {"enum": [status.value for status in Status]},
        "The execution's status when refused (409 codes).",
    ),
    "version": ({"type": "integer"}, "The execution's version when refused (409 codes)."),
    "sequence": ({"type": "integer"}, "The operation where replay diverged (nondeterminism)."),
    "recorded": ({"type": "string"}, "What the history records there (nondeterminism)."),
    "issued": ({"type": "string"}, "What the flow code issued instead (nondeterminism)."),
    "flow_version": (
        {"type": "integer"},
        "The flow version the execution started on (flow_version_gone).",
    ),
    "registered": (
        {"type": "array", "items": {"type": "integer"}},
        "The versions of the flow this engine serves (flow_version_gone).",
    ),
}
"""The fields an error body may carry besides its code and message."""


def _error_object() -> dict[str, Any]:
    """The ``error`` of an error reply or a rejection, from the error classes."""
    codes = sorted(cls.code for cls in WIRE_ERRORS)
    conflicts = sorted(cls.code for cls in WIRE_ERRORS if issubclass(cls, Conflict))
    table = ", ".join(f"{cls.code} ({cls.status})" for cls in WIRE_ERRORS)
    details = {name: {**kind, "description": text} for name, (kind, text) in _ERROR_DETAILS.items()}
    return {
        "title": "Error",
        "description": f"Why a command or query was refused. Codes and statuses: {table}.",
        "type": "object",
        "properties": {
            "code": {"enum": codes, "description": "Stable machine-readable code."},
            "message": {
                "type": "string",
                "description": "What went wrong, naming the execution or field, and the fix.",
            },
            **details,
        },
        "required": ["code", "message"],
        "if": {"properties": {"code": {"enum": conflicts}}, "required": ["code"]},
        "then": {"required": ["status", "version"]},
    }


def _readme(documents: dict[str, dict[str, Any]]) -> str:
    """The folder's README: how the files are made, and one line per file."""
    lines = [
        "# evflow schemas",
        "",
        "Generated from the msgspec types in `src/evflow` by `evflow schemas`; do not edit.",
        "`evflow schemas --check` exits 1, naming each file, when these differ from the code;",
        "the test suite runs the same comparison. JSON Schema draft 2020-12, each file",
        "standalone; `$id` is `urn:evflow:schemas:<path>`.",
        "",
        "| file | what it describes |",
        "| --- | --- |",
        f"| [`{asyncapi.PATH}`]({asyncapi.PATH}) | AsyncAPI 3.0.0 document: the NATS "
        "subjects, their messages and headers, and which reply answers which request |",
    ]
    for path, schema in documents.items():
        summary = schema.get("description", "").split("\n\n")[0].replace("\n", " ")
        lines.append(f"| [`{path}`]({path}) | **{schema['title']}**. {summary} |")
    return "\n".join(lines) + "\n"
