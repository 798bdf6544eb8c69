"""google.protobuf.Any as containerd fills it (github.com/containerd/typeurl v1).

containerd 1.6 does not use the "type.googleapis.com/" prefix that protobuf's `Any.Pack` writes: a
protobuf message's type URL is its bare full name ("containerd.events.TaskExit",
"io.containerd.cgroups.v1.Metrics"), and OCI runtime-spec structures travel as JSON under
"types.containerd.io/opencontainers/runtime-spec/1/<Type>". containerd resolves an unknown URL by
bare name, so an event packed with `Any.Pack` would be unreadable to it.
"""

from __future__ import annotations

import json
from typing import Any as JSONValue
from typing import TypeVar

from google.protobuf.any_pb2 import Any
from google.protobuf.message import DecodeError, Message

from pykata.errors import PykataError

_M = TypeVar("_M", bound=Message)

_GOOGLE_PREFIX = "type.googleapis.com/"
OCI_SPEC_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
OCI_PROCESS_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
OCI_LINUX_RESOURCES_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"


class TypeURLError(PykataError):
    """An Any holds another type than expected, or its value does not decode."""


def type_url(message: Message | type[Message]) -> str:
    """The type URL containerd uses for a protobuf message (its full name)."""
    return message.DESCRIPTOR.full_name


def pack(message: Message) -> Any:
    """Wrap `message` in an Any with containerd's type URL."""
    return Any(type_url=type_url(message), value=message.SerializeToString())


def is_type(any_value: Any, cls: type[Message]) -> bool:
    """Whether `any_value` holds a `cls` (bare or "type.googleapis.com/"-prefixed URL)."""
    url = any_value.type_url.removeprefix(_GOOGLE_PREFIX)
    return url == cls.DESCRIPTOR.full_name


def unpack(any_value: Any, cls: type[_M]) -> _M:
    """Decode the `cls` inside `any_value`.

    Raises:
        TypeURLError: the Any holds another type, or its bytes are not a valid `cls`.
    """
    if not is_type(any_value, cls):
        raise TypeURLError(f"expected {type_url(cls)}, got type_url {any_value.type_url!r}")
    out = cls()
    try:
        out.ParseFromString(any_value.value)
    except DecodeError as e:
        raise TypeURLError(f"{type_url(cls)}: undecodable value: {e}") from e
    return out


def pack_json(url: str, value: JSONValue) -> Any:
    """Wrap a JSON-able value (an OCI Process, Spec, LinuxResources) the way containerd does."""
    return Any(type_url=url, value=json.dumps(value, separators=(",", ":")).encode())


def unpack_json(any_value: Any, url: str, *, max_bytes: int = 4 << 20) -> JSONValue:
    """Decode the JSON document inside an Any whose type URL must be `url`.

    Raises:
        TypeURLError: wrong type URL, larger than `max_bytes`, or not valid JSON.
    """
    if any_value.type_url != url:
        raise TypeURLError(f"expected {url}, got type_url {any_value.type_url!r}")
    if len(any_value.value) > max_bytes:
        raise TypeURLError(f"{url}: {len(any_value.value)} bytes exceeds the limit of {max_bytes}")
    try:
        return json.loads(any_value.value)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TypeURLError(f"{url}: invalid JSON: {e}") from e
