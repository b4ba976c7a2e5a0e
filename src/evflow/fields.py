"""Declared fields: the typed shape of an invoke body or a resume body, and its validation.

A flow's parameters and a pause's ``outputs`` both become a msgspec Struct type that
forbids unknown fields. Bodies are decoded straight into it, and every failure becomes an
error that names the field and says what was expected, before anything is appended.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from typing import Any

import msgspec

from .errors import InvalidInput, InvalidJson, NondeterminismError

_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_NAMED = re.compile(r"(?:missing required|unknown) field `(?P<name>[^`]+)`")


def from_signature(name: str, fn: Callable[..., Any]) -> type[msgspec.Struct]:
    """The invoke body type of a flow: its parameters after ``ctx``, defaults honoured."""
    params = list(inspect.signature(fn, eval_str=True).parameters.values())[1:]
    fields: list[tuple[Any, ...]] = []
    for param in params:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise TypeError(
                f"flow '{name}': parameter '{param.name}' must be a plain named parameter "
                "(no *args, **kwargs or positional-only), since invoke bodies are JSON objects"
            )
        kind = Any if param.annotation is param.empty else param.annotation
        if param.default is param.empty:
            fields.append((param.name, kind))
        else:
            fields.append((param.name, kind, param.default))
    return _struct(f"{name}_inputs", fields)


def from_outputs(name: str, outputs: dict[str, Any] | type[msgspec.Struct]) -> type[msgspec.Struct]:
    """The resume body type of a pause: a dict of name to type, or a msgspec Struct type."""
    if isinstance(outputs, type) and issubclass(outputs, msgspec.Struct):
        if outputs.__struct_config__.forbid_unknown_fields:
            return outputs
        return msgspec.defstruct(outputs.__name__, [], bases=(outputs,), forbid_unknown_fields=True)
    if isinstance(outputs, dict):
        items = tuple(outputs.items())
        try:
            hash(items)
        except TypeError:  # a type that cannot key the cache: build it afresh each time
            return _struct(f"{name}_outputs", list(items))
        return _outputs_struct(f"{name}_outputs", items)
    raise TypeError(
        f"pause '{name}': outputs must be a dict of field name to type or a msgspec Struct "
        f"type, not {type(outputs).__name__}"
    )


@functools.lru_cache(maxsize=1024)
def _outputs_struct(name: str, fields: tuple[tuple[Any, ...], ...]) -> type[msgspec.Struct]:
    """The body type of a pause's outputs, built once per distinct pause: a flow pauses with
    the same outputs every time, and building the type and its schema is not cheap."""
    return _struct(name, list(fields))


def _struct(name: str, fields: list[tuple[Any, ...]]) -> type[msgspec.Struct]:
    try:
        return msgspec.defstruct(name, fields, forbid_unknown_fields=True)
    except TypeError as error:
        raise TypeError(f"{name}: the declared fields cannot be used: {error}") from error


def decode(
    body: bytes, kind: type[msgspec.Struct], what: str, execution_id: str | None = None
) -> msgspec.Struct:
    """Decode a JSON body into ``kind``, or raise an error naming the field at fault.

    An empty body counts as ``{}``, so a command without fields needs no body at all.
    ``what`` says which body this is ("invoke of flow 'approval'") for the message.
    """
    try:
        return msgspec.json.decode(body or b"{}", type=kind)
    except msgspec.ValidationError as error:
        text = str(error)
        if text.startswith("Expected `object`, got") and " - at " not in text:
            raise InvalidJson(
                f"the body of the {what} must be a JSON object, {text.lower()}",
                execution_id=execution_id,
            ) from None
        field = _field(text)
        raise InvalidInput(
            f"the body of the {what} is invalid: {_explain(text)}; send the declared "
            f"fields {describe(kind)}",
            execution_id=execution_id,
            field=field,
        ) from None
    except msgspec.DecodeError as error:
        raise InvalidJson(
            f"the body of the {what} is not valid JSON ({error}); send a JSON object such as "
            f"{example(kind)}",
            execution_id=execution_id,
        ) from None


def _field(text: str) -> str | None:
    path = _PATH.search(text)
    named = _NAMED.search(text)
    parts = [p for p in ((path and path["path"]), (named and named["name"])) if p]
    if named is not None and not named["name"]:
        parts.append('""')  # a field whose name is the empty string
    return ".".join(parts) or None


def _explain(text: str) -> str:
    field = _field(text)
    reason = _PATH.sub("", text)
    if field and _NAMED.search(text) is None:
        return f"field '{field}': {reason.lower()}"
    return reason[0].lower() + reason[1:]


def describe(kind: type[msgspec.Struct]) -> dict[str, str]:
    """Field name to a readable type name, as shown in pause replies and errors."""
    return dict(_described(kind))


@functools.lru_cache(maxsize=1024)
def _described(kind: type[msgspec.Struct]) -> dict[str, str]:
    info = msgspec.inspect.type_info(kind)
    assert isinstance(info, msgspec.inspect.StructType)
    return {f.encode_name: _type_name(f.type) for f in info.fields}


def _type_name(info: msgspec.inspect.Type) -> str:
    names = {
        msgspec.inspect.BoolType: "bool",
        msgspec.inspect.IntType: "int",
        msgspec.inspect.FloatType: "float",
        msgspec.inspect.StrType: "str",
        msgspec.inspect.AnyType: "any",
        msgspec.inspect.NoneType: "null",
        msgspec.inspect.DateTimeType: "datetime",
        msgspec.inspect.DictType: "object",
        msgspec.inspect.ListType: "list",
    }
    if isinstance(info, msgspec.inspect.UnionType):
        return " | ".join(_type_name(t) for t in info.types)
    return names.get(type(info), type(info).__name__.removesuffix("Type").lower())


def schema(kind: type[msgspec.Struct]) -> dict[str, Any]:
    """JSON Schema of a body type, with the body itself at the top rather than behind a $ref.

    Each call gets its own copy, decoded from JSON built once per type (ten times cheaper
    than a deep copy of the cached dict, which profiling showed at a tenth of the engine).
    """
    return msgspec.json.decode(_schema(kind))


@functools.lru_cache(maxsize=1024)
def _schema(kind: type[msgspec.Struct]) -> bytes:
    full = msgspec.json.schema(kind)
    defs = full.get("$defs", {})
    ref = full.get("$ref", "")
    top = dict(defs.get(ref.rsplit("/", 1)[-1], full))
    others = {k: v for k, v in defs.items() if f"#/$defs/{k}" != ref}
    if others:
        top["$defs"] = others
    return msgspec.json.encode(top)


def example(kind: type[msgspec.Struct]) -> str:
    """A one-line sketch of a valid body, for error messages."""
    samples = {"bool": "true", "int": "1", "float": "1.5", "str": '"text"'}
    pairs = [f'"{n}": {samples.get(t, "...")}' for n, t in describe(kind).items()]
    return "{" + ", ".join(pairs) + "}"


def to_builtins(value: msgspec.Struct) -> dict[str, Any]:
    """The JSON-ready dict of a decoded body, as stored in the log."""
    return msgspec.to_builtins(value)


def reload(
    recorded: dict[str, Any], kind: type[msgspec.Struct], execution_id: str, what: str
) -> msgspec.Struct:
    """Decode a stored body again, so that live and replayed flows see identical values.

    A recorded body the current code refuses means the code changed under the execution,
    not that the flow failed: it is reported as non-determinism and the log is left as is.
    """
    try:
        return msgspec.json.decode(msgspec.json.encode(recorded), type=kind)
    except msgspec.ValidationError as error:
        raise NondeterminismError(
            f"execution {execution_id}: the recorded {what} no longer fit the flow code "
            f"({error}); the flow code changed since the execution started: restore the old "
            "code, or register the new code as a new flow version",
            execution_id=execution_id,
        ) from error
