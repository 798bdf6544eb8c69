"""Errors of the hypervisor layer; all are `HypervisorError`s."""

from __future__ import annotations

from pykata.errors import HypervisorError


class QmpError(HypervisorError):
    """A QMP command failed, timed out, or the QMP connection is gone. `command` names it."""

    def __init__(self, command: str, message: str, error_class: str | None = None) -> None:
        super().__init__(f"QMP {command}: {message}")
        self.command = command
        self.error_class = error_class


class VmExitedError(HypervisorError):
    """The VM's QEMU process is gone (on its own, killed, or stopped) while something still needed it."""


class NotSupportedError(HypervisorError):
    """The operation is not available for this machine type or not implemented yet."""


class RestoreError(HypervisorError):
    """A VM could not load the saved state it was started from (the saved VM is unusable)."""
