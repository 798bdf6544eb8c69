"""ttrpc, containerd's lightweight RPC, for asyncio: a sans-IO core plus a client and a server.

Sans-IO: `frames` (framing) and `connection` (stream state machine) need no event loop.
asyncio: `connect_unix` / `connect_fd` give a `Client`; `Server` serves unix sockets and descriptors.
"""

from pykata.ttrpc.client import Client, ClientStream, Stub, connect_fd, connect_unix
from pykata.ttrpc.codes import Code
from pykata.ttrpc.connection import Connection, DataReceived, RequestReceived, ResponseReceived, Role
from pykata.ttrpc.errors import (
    ConnectionClosedError,
    LocalProtocolError,
    RemoteProtocolError,
    RpcError,
    SessionRefused,
    TtrpcError,
    UnknownMethodError,
)
from pykata.ttrpc.frames import MAX_MESSAGE_SIZE, Flags, Frame, FrameDecoder, FrameType, encode_frame
from pykata.ttrpc.server import CallContext, Server
from pykata.ttrpc.service import MethodSpec, ServiceSpec, spec_from_descriptor

__all__ = [
    "MAX_MESSAGE_SIZE",
    "CallContext",
    "Client",
    "ClientStream",
    "Code",
    "Connection",
    "ConnectionClosedError",
    "DataReceived",
    "Flags",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "LocalProtocolError",
    "MethodSpec",
    "RemoteProtocolError",
    "RequestReceived",
    "ResponseReceived",
    "Role",
    "RpcError",
    "Server",
    "ServiceSpec",
    "SessionRefused",
    "Stub",
    "TtrpcError",
    "UnknownMethodError",
    "connect_fd",
    "connect_unix",
    "encode_frame",
    "spec_from_descriptor",
]
