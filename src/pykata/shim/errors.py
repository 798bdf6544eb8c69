"""How the shim answers a failure of the layer below it (the sandbox and, through it, the agent).

The shim raises the domain errors of pykata.errors (`NotFound`, `FailedPrecondition`, ...), whose
google.rpc code containerd maps back to its errdefs (NOT_FOUND -> ErrNotFound, ...). containerd
tolerates some on purpose: a Kill or Delete answered NOT_FOUND means "already gone", which is how
repeated and racing requests end quietly. The messages follow runc's shim where containerd's users
match them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from pykata.agentapi import AgentCallError
from pykata.errors import Code, PykataError, error_for


@contextlib.contextmanager
def agent_errors(what: str) -> Iterator[None]:
    """Re-raise an agent failure with its code (an agent NOT_FOUND answers NOT_FOUND) and `what` in
    front; a domain error (it has its code) as it is; any other pykata failure as UNKNOWN after `what`."""
    try:
        yield
    except AgentCallError as e:
        raise error_for(e.code, f"{what}: {e.message}") from None
    except PykataError as e:
        if e.rpc_code != Code.UNKNOWN:
            raise
        raise PykataError(f"{what}: {e}") from None
