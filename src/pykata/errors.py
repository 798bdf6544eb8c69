"""The one exception hierarchy of pykata, and the wire code each error answers an RPC with.

Every error that crosses a layer boundary is a `PykataError`; subclasses carry the context
(sandbox id, container id, RPC method) a person needs to act on it, and `rpc_code`: the google.rpc
status a ttrpc server answers when a handler raises it (pykata.ttrpc.server maps it, in one place).
Agent and shim raise the same domain errors: `raise NotFound(f"container {cid}")` answers NOT_FOUND
whoever raises it. `pykata.ttrpc.RpcError` is different: it means only "a call I made failed".

Stdlib only: the guest agent imports this module too.
"""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """google.rpc status codes (the numbers are the wire contract, shared with gRPC)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    @classmethod
    def from_wire(cls, value: int) -> Code:
        """Map a received number to a Code; numbers we do not know become UNKNOWN."""
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


class PykataError(Exception):
    """Root of all pykata errors. `rpc_code` is the status an RPC that fails with it answers."""

    rpc_code: Code = Code.UNKNOWN


# -- domain errors named by what went wrong (each carries its wire code) ------------------------------

class InvalidArgument(PykataError):
    """A request field is invalid; `field` names it (and starts the message)."""

    rpc_code = Code.INVALID_ARGUMENT

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(PykataError):
    rpc_code = Code.NOT_FOUND


class AlreadyExists(PykataError):
    rpc_code = Code.ALREADY_EXISTS


class FailedPrecondition(PykataError):
    """The request is valid but the state does not allow it (start a started process)."""

    rpc_code = Code.FAILED_PRECONDITION


class ResourceExhausted(PykataError):
    """A bound was reached (too many containers, a file too large)."""

    rpc_code = Code.RESOURCE_EXHAUSTED


class PermissionDenied(PykataError):
    """A rule (the agent policy, an allow-list) refuses the request; the message names the rule."""

    rpc_code = Code.PERMISSION_DENIED


class DeadlineExceeded(PykataError):
    rpc_code = Code.DEADLINE_EXCEEDED


class Unavailable(PykataError):
    """The service cannot answer now (not started, shutting down, its peer gone)."""

    rpc_code = Code.UNAVAILABLE


class Unimplemented(PykataError):
    rpc_code = Code.UNIMPLEMENTED


class Internal(PykataError):
    """Something below us failed (a syscall, a helper program) although the request was fine."""

    rpc_code = Code.INTERNAL


_BY_CODE: dict[Code, type[PykataError]] = {
    cls.rpc_code: cls
    for cls in (NotFound, AlreadyExists, FailedPrecondition, ResourceExhausted, PermissionDenied, DeadlineExceeded,
                Unavailable, Unimplemented, Internal)
}


def error_for(code: Code, message: str) -> PykataError:
    """The domain error for `code` (NotFound for NOT_FOUND, ...): to pass on, with our own words, a status
    some call answered. A code with no class of its own gives a PykataError whose `rpc_code` is `code`."""
    cls = _BY_CODE.get(code)
    if cls is not None:
        return cls(message)
    err = PykataError(message)
    err.rpc_code = code
    return err


# -- quoting what the guest wrote ----------------------------------------------------------------------

# What the host quotes of text the guest wrote (an agent's error status, its console): the guest chooses
# it, up to a whole 4 MiB frame, and it goes into the errors containerd logs and hands on (CRI: kubelet's
# events and pod status), the shim's log and the SDK's exceptions. The agent's own messages (crun's
# errors, a policy rule) stay far below it.
MAX_GUEST_TEXT = 2048


def _escaped(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def guest_text(message: str, limit: int = MAX_GUEST_TEXT) -> str:
    """`message`, written by the guest, as the host may quote it: at most `limit` characters (the rest
    counted), every character that is not printable escaped (a newline or carriage return cannot
    forge a log line, an escape sequence cannot drive the reader's terminal, a bidi control cannot
    reorder what follows)."""
    head = _escaped(message[:limit])[:limit]
    cut = len(message) - limit
    return f"{head}... ({cut} more characters)" if cut > 0 else head


def guest_tail(text: str, limit: int = MAX_GUEST_TEXT) -> str:
    """The end of `text` (a log the guest writes, e.g. its console), as guest_text quotes the start: at
    most `limit` characters of its end, escaped, "..." before them when some were left out. Line ends
    ("\\r\\n" or "\\n") are shown as "\\n", so the lines stay apart without starting lines of their own."""
    tail = _escaped(text[-limit:].replace("\r\n", "\n"))
    return "..." + tail[-limit:] if len(tail) > limit or len(text) > limit else tail


# -- errors of a layer ---------------------------------------------------------------------------------

class ConfigError(PykataError):
    """A configuration value is missing or invalid; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class HypervisorError(PykataError):
    """The VMM could not be started, controlled or stopped."""


class AgentError(PykataError):
    """The guest agent failed or answered an RPC with an error."""


class SandboxError(PykataError):
    """A sandbox lifecycle step failed; `sandbox_id` names the sandbox."""

    def __init__(self, sandbox_id: str, message: str) -> None:
        super().__init__(f"sandbox {sandbox_id}: {message}")
        self.sandbox_id = sandbox_id
