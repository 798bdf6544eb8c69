"""What the client and server need to know about a service: names, message types, streaming.

`spec_from_descriptor` builds them from protobuf service descriptors (`pykata.protocols` does this for
the generated modules); the client and server accept any object with the same attributes.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Protocol

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from pykata.record import FrozenRecord, Record
from pykata.ttrpc.errors import UnknownMethodError


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


class MethodSpec(Record):
    """One RPC: its short name ("Create"), message classes and streaming flags."""

    __slots__ = ("client_streaming", "name", "request_type", "response_type", "server_streaming")
    __match_args__ = ("name", "request_type", "response_type", "client_streaming", "server_streaming")

    def __init__(self, name: str, request_type: type[Message], response_type: type[Message],
                 client_streaming: bool = False, server_streaming: bool = False) -> None:
        self.name = name
        self.request_type = request_type
        self.response_type = response_type
        self.client_streaming = client_streaming
        self.server_streaming = server_streaming


class ServiceSpec(FrozenRecord):
    """A service's full wire name and its methods by short name (read-only)."""

    __slots__ = ("methods", "name")
    __match_args__ = ("name", "methods")
    name: str
    methods: Mapping[str, MethodSpec]

    def __init__(self, name: str, methods: Mapping[str, MethodSpec] | None = None) -> None:
        self._init("name", name)
        # Frozen means frozen: callers must not be able to add methods to a shared spec.
        self._init("methods", MappingProxyType(dict(methods or {})))

    def __hash__(self) -> int:
        return hash(self.name)

    def method(self, name: str) -> MethodSpec:
        """The method called `name`.

        Raises:
            UnknownMethodError: the service has no such method.
        """
        try:
            return self.methods[name]
        except KeyError:
            raise UnknownMethodError(self.name, name) from None

    def path(self, method: str) -> str:
        """gRPC-style path "/<service>/<method>" (ttrpc itself sends service and method apart).

        Raises:
            UnknownMethodError: the service has no such method.
        """
        return f"/{self.name}/{self.method(method).name}"


def spec_from_descriptor(service: ServiceDescriptor) -> ServiceSpec:
    """Build the `ServiceSpec` of a service descriptor of a generated module.

    The message classes are the ones the generated modules define (protobuf keeps one class per
    descriptor), so `isinstance` checks against e.g. `shim_pb2.CreateTaskRequest` hold.
    """
    methods = {
        m.name: MethodSpec(
            name=m.name,
            request_type=GetMessageClass(m.input_type),
            response_type=GetMessageClass(m.output_type),
            client_streaming=bool(getattr(m, "client_streaming", False)),
            server_streaming=bool(getattr(m, "server_streaming", False)),
        )
        for m in service.methods
    }
    return ServiceSpec(service.full_name, methods)
