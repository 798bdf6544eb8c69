"""The one exception hierarchy of pykata.

Every error that crosses a layer boundary is a `PykataError`; subclasses carry the context
(sandbox id, container id, RPC method) a person needs to act on it.
"""

from __future__ import annotations


class PykataError(Exception):
    """Root of all pykata errors."""


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
