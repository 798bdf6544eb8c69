"""What the SDK raises: one hierarchy under pykata's root, `PykataError`.

    PykataError
      SdkError                     a sandbox operation failed (message says which and why)
        SandboxTimeoutError        a command, a wait or the sandbox's lifetime ran out (also a TimeoutError)
        NotFoundError              no such file, directory or sandbox (also a FileNotFoundError)
        PolicyDeniedError          refused by a rule: a bad path, a permission, a paused sandbox
        SandboxGoneError           the sandbox was closed, timed out or its VM ended

Each carries `sandbox_id` ("" when there is none yet).
"""

from __future__ import annotations

from pykata.errors import PykataError


class SdkError(PykataError):
    """A sandbox operation failed."""

    def __init__(self, message: str, *, sandbox_id: str = "") -> None:
        super().__init__(f"sandbox {sandbox_id[:12]}: {message}" if sandbox_id else message)
        self.sandbox_id = sandbox_id


class SandboxTimeoutError(SdkError, TimeoutError):
    """A command, a wait or the sandbox's lifetime ran out. A command that timed out was killed;
    `stdout`/`stderr` hold what it printed until then."""

    def __init__(self, message: str, *, sandbox_id: str = "", stdout: bytes = b"", stderr: bytes = b"") -> None:
        super().__init__(message, sandbox_id=sandbox_id)
        self.stdout, self.stderr = stdout, stderr


class NotFoundError(SdkError, FileNotFoundError):
    """No such file, directory or sandbox."""


class PolicyDeniedError(SdkError, PermissionError):
    """Refused: a path or argument breaks a rule, the guest denied access, or the sandbox is paused."""


class SandboxGoneError(SdkError):
    """The sandbox was closed, reached its timeout, or its VM ended: nothing more can run in it."""


# the name the first SDK used
ExecTimeoutError = SandboxTimeoutError
