"""Any agent RPC by name with a JSON body: the one generic entry point, for `pykata agent-ctl` (Kata's
agent-ctl), an admin's debugging tool. Everything else calls the typed methods of `Agent`.

The request is built with protobuf's json_format (unknown fields are an error naming the field); the
reply is bounded by the ttrpc frame cap (4 MiB) and rendered back to JSON, unchecked beyond that: it is
shown to the admin, not acted on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from pykata.agentapi.client import DEFAULT_TIMEOUT, Agent
from pykata.agentapi.errors import AgentCallError
from pykata.errors import PykataError
from pykata.protocols.agent import AGENT_SERVICE, HEALTH_SERVICE
from pykata.ttrpc import RpcError
from pykata.ttrpc.service import MethodSpec, ServiceSpec

SERVICES: tuple[ServiceSpec, ...] = (AGENT_SERVICE, HEALTH_SERVICE)
MAX_BODY = 1 << 20


class RequestError(PykataError):
    """The RPC name or its JSON body is wrong; says which."""


@dataclass(frozen=True)
class RpcInfo:
    service: str
    name: str
    request: str
    response: str
    fields: dict[str, str]  # request field -> its type

    def to_json(self) -> dict[str, Any]:
        return {"service": self.service, "rpc": self.name, "request": self.request, "response": self.response,
                "fields": self.fields}


def _type_name(f: FieldDescriptor) -> str:
    if f.message_type is not None:
        base = f.message_type.name
    elif f.enum_type is not None:
        base = f.enum_type.name
    else:
        base = {FieldDescriptor.TYPE_STRING: "string", FieldDescriptor.TYPE_BYTES: "bytes (base64)",
                FieldDescriptor.TYPE_BOOL: "bool", FieldDescriptor.TYPE_DOUBLE: "double",
                FieldDescriptor.TYPE_FLOAT: "float"}.get(f.type, "int")
    return f"repeated {base}" if f.is_repeated else base


def _fields(d: Any) -> dict[str, str]:
    return {f.json_name: _type_name(f) for f in d.fields}


def catalog() -> list[RpcInfo]:
    """Every RPC of the agent with its request fields (JSON names)."""
    return [RpcInfo(s.name, m.name, m.request_type.DESCRIPTOR.full_name, m.response_type.DESCRIPTOR.full_name,
                    _fields(m.request_type.DESCRIPTOR)) for s in SERVICES for m in s.methods.values()]


def find_rpc(name: str) -> tuple[ServiceSpec, MethodSpec]:
    """The RPC called `name` (short, e.g. "ListInterfaces", or "grpc.Health.Check"-style "Health.Check").
    Raises RequestError."""
    service_part, _, short = name.rpartition(".")
    for s in SERVICES:
        if short in s.methods and (not service_part or s.name.endswith(service_part)):
            return s, s.methods[short]
    raise RequestError(f"no agent RPC {name!r} (pykata agent-ctl --list shows them)")


def build_request(method: MethodSpec, body: str) -> Any:
    """The request message from JSON. Raises RequestError naming the bad field."""
    if len(body) > MAX_BODY:
        raise RequestError(f"request JSON: {len(body)} bytes, at most {MAX_BODY}")
    request = method.request_type()
    try:
        json_format.Parse(body or "{}", request)
    except json_format.ParseError as e:
        raise RequestError(f"{method.name} request: {e}") from None
    return request


async def call_json(agent: Agent, name: str, body: str = "{}", *, timeout: float | None = DEFAULT_TIMEOUT) -> str:
    """Call RPC `name` with a JSON body; the reply as JSON. Raises RequestError, AgentCallError."""
    service, method = find_rpc(name)
    request = build_request(method, body)
    try:
        reply = await agent.ttrpc.call(service, method.name, request, timeout=timeout)
    except RpcError as e:
        raise AgentCallError(agent.sandbox_id, method.name, e.code, e.message) from None
    return json.dumps(json_format.MessageToDict(reply, preserving_proto_field_name=False), indent=1)
