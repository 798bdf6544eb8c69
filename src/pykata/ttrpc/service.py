"""What the client and server need to know about a service: names, message types, streaming.

`pykata.protocols` builds these from the generated protobuf descriptors; any object with the same
attributes works (structural typing), so this layer never imports the generated code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol


class MethodLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def request_type(self) -> Any: ...
    @property
    def response_type(self) -> Any: ...
    @property
    def client_streaming(self) -> bool: ...
    @property
    def server_streaming(self) -> bool: ...


class ServiceLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def methods(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class MethodSpec:
    name: str
    request_type: Any
    response_type: Any
    client_streaming: bool = False
    server_streaming: bool = False


@dataclass(frozen=True)
class ServiceSpec:
    """A service's full name ("containerd.task.v2.Task") and its methods by name."""

    name: str
    methods: Mapping[str, MethodSpec]

    @classmethod
    def from_descriptor(cls, service_descriptor: Any, message_classes: Mapping[str, Any]) -> ServiceSpec:
        """Build from a protobuf ServiceDescriptor; `message_classes` maps full message names
        to generated classes (protobuf's symbol database gives them)."""
        methods = {}
        for m in service_descriptor.methods:
            methods[m.name] = MethodSpec(
                m.name,
                message_classes[m.input_type.full_name],
                message_classes[m.output_type.full_name],
                bool(getattr(m, "client_streaming", False)),
                bool(getattr(m, "server_streaming", False)),
            )
        return cls(service_descriptor.full_name, methods)
