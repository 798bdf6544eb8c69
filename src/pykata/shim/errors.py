"""Errors of the shim, each with the google.rpc code containerd maps to its errdefs.

containerd turns the codes back into errdefs (NOT_FOUND -> ErrNotFound, ...) and tolerates some of
them on purpose: a Kill or Delete answered NOT_FOUND means "already gone", which is how repeated
and racing requests end quietly. The messages follow runc's shim where containerd's users match them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from pykata.agentapi import AgentCallError
from pykata.errors import PykataError
from pykata.ttrpc import Code


class ShimError(PykataError):
    """A Task RPC failed; `rpc_code` is the status the ttrpc server answers with."""

    rpc_code: Code = Code.UNKNOWN

    def __init__(self, message: str, code: Code | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.rpc_code = code


class NotFoundError(ShimError):
    rpc_code = Code.NOT_FOUND


class AlreadyExistsError(ShimError):
    rpc_code = Code.ALREADY_EXISTS


class FailedPreconditionError(ShimError):
    rpc_code = Code.FAILED_PRECONDITION


class InvalidArgumentError(ShimError):
    """A request field is invalid; `field` names it."""

    rpc_code = Code.INVALID_ARGUMENT

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@contextlib.contextmanager
def agent_errors(what: str) -> Iterator[None]:
    """Re-raise an agent failure as a ShimError keeping its code (NOT_FOUND stays NOT_FOUND), and any
    other pykata failure as UNKNOWN with `what` in front."""
    try:
        yield
    except ShimError:
        raise
    except AgentCallError as e:
        raise ShimError(f"{what}: {e.message}", e.code) from None
    except PykataError as e:
        raise ShimError(f"{what}: {e}") from None
