"""Errors of the ttrpc layer.

Two kinds at the protocol boundary, as in h11: `LocalProtocolError` (we misused the protocol, a bug
here) and `RemoteProtocolError` (the peer sent something invalid; the connection is finished).
`RpcError` is the failure of one call and carries the status code and the method name.
"""

from __future__ import annotations

from pykata.errors import PykataError
from pykata.ttrpc.codes import Code


class TtrpcError(PykataError):
    """Root of ttrpc errors."""


class LocalProtocolError(TtrpcError):
    """This side tried to do something the protocol does not allow (e.g. an oversize message)."""


class RemoteProtocolError(TtrpcError):
    """The peer sent bytes that are not valid ttrpc; the connection cannot continue."""


class SessionRefused(TtrpcError):
    """A host session on a virtio-serial port could not begin (pykata.ttrpc.session): the agent is too
    old to echo the hello (`old_agent`), or sent too much of an earlier session without echoing it."""

    def __init__(self, message: str, *, old_agent: bool = False) -> None:
        super().__init__(message)
        self.old_agent = old_agent


class UnknownMethodError(TtrpcError):
    """A method name that the service does not have."""

    rpc_code = Code.UNIMPLEMENTED

    def __init__(self, service: str, method: str) -> None:
        super().__init__(f"{service}: no method {method!r}")
        self.service = service
        self.method = method


class RpcError(TtrpcError):
    """A call I made failed with a google.rpc status (never raised for a failure of our own: those are
    the domain errors of pykata.errors, which carry their code).

    `method` is the full method name ("/containerd.task.v2.Task/State") when known.
    """

    def __init__(self, code: Code, message: str, method: str = "", details: tuple[object, ...] = ()) -> None:
        self.code = code
        self.message = message
        self.method = method
        self.details = details
        where = f"{method}: " if method else ""
        super().__init__(f"{where}{code.name}: {message}")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.code, self.message, self.method, self.details))


class ConnectionClosedError(RpcError):
    """The connection ended before the call got its answer."""

    def __init__(self, message: str, method: str = "") -> None:
        super().__init__(Code.UNAVAILABLE, message, method)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.message, self.method))
