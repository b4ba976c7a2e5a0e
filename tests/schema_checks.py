"""Checking messages against the checked-in ``schemas/``: by file, and by subject through the
AsyncAPI document, the way a service that only has that folder would."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


@functools.cache
def validator(path: str, folder: Path = SCHEMAS) -> Draft202012Validator:
    """A validator, format checks included, for one schema file of ``folder``."""
    schema = json.loads((folder / path).read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def problems(path: str, instance: Any, folder: Path = SCHEMAS) -> list[str]:
    """Why ``instance`` does not fit the schema file ``path``; empty when it fits."""
    errors = validator(path, folder).iter_errors(instance)
    return [f"at {list(error.absolute_path)}: {error.message}" for error in errors]


def check(path: str, instance: Any, what: str, folder: Path = SCHEMAS) -> None:
    """Fail, saying what and why, unless ``instance`` fits the schema file ``path``."""
    found = problems(path, instance, folder)
    assert not found, f"{what} does not fit {path}: {found}\n{json.dumps(instance)[:2000]}"


class AsyncApi:
    """The AsyncAPI document, used to find what a subject carries and what answers it."""

    def __init__(self, folder: Path = SCHEMAS) -> None:
        self.folder = folder
        self.doc = json.loads((folder / "asyncapi.json").read_text())
        self.exercised: set[str] = set()
        """Names of the messages checked so far."""

    def channel(self, subject: str) -> str:
        """The one channel whose address matches ``subject``."""
        matches = [
            name
            for name, channel in self.doc["channels"].items()
            if channel["address"] is not None and _pattern(channel["address"]).fullmatch(subject)
        ]
        assert len(matches) == 1, f"{subject} matches channels {matches} of asyncapi.json"
        return matches[0]

    def check_message(self, subject: str, headers: Mapping[str, str] | None, body: bytes) -> str:
        """Check a message on ``subject`` against its channel's message; returns its name."""
        channel = self.channel(subject)
        (ref,) = self.doc["operations"][channel]["messages"]
        return self._check(self.resolve(ref["$ref"]), headers, body, subject)

    def check_reply(self, subject: str, headers: Mapping[str, str] | None, body: bytes) -> str:
        """Check the reply to a request on ``subject``: the error message if its headers say
        so, else the operation's other reply message; returns its name."""
        operation = self.doc["operations"][self.channel(subject)]
        messages = [self.resolve(ref["$ref"]) for ref in operation["reply"]["messages"]]
        is_error = "Nats-Service-Error-Code" in (headers or {})
        (message,) = [m for m in messages if (m["name"] == "error") == is_error]
        return self._check(message, headers, body, f"reply on {subject}")

    def resolve(self, ref: str) -> dict[str, Any]:
        """The object a local ``#/...`` reference of the document points at, refs followed."""
        assert ref.startswith("#/"), ref
        node: Any = self.doc
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return self.resolve(node["$ref"]) if "$ref" in node else node

    def _check(
        self, message: dict[str, Any], headers: Mapping[str, str] | None, body: bytes, what: str
    ) -> str:
        name = message["name"]
        header_schema = message.get("headers", {"type": "object"})
        errors = Draft202012Validator(header_schema).iter_errors(dict(headers or {}))
        found = [f"at {list(error.absolute_path)}: {error.message}" for error in errors]
        assert not found, f"headers of {what} do not fit message {name}: {found}"
        if "payload" in message:
            path = message["payload"]["schema"]["$ref"].removeprefix("./")
            check(path, json.loads(body or b"{}"), f"{what} (message {name})", self.folder)
        else:
            assert not body, f"{what} should have no body, as message {name} says"
        self.exercised.add(name)
        return name


@functools.cache
def _pattern(address: str) -> re.Pattern[str]:
    """A regex of a channel address, each ``{parameter}`` standing for one subject token."""
    parts = re.split(r"(\{[a-z_]+\})", address)
    return re.compile("".join("[^.]+" if p.startswith("{") else re.escape(p) for p in parts))
