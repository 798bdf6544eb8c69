"""pykata: run OCI containers inside lightweight virtual machines.

The Python API: `pykata.Sandbox` (blocking) and `pykata.AsyncSandbox` (asyncio), see pykata.sdk.
"""

# (no `typing` import here: it costs every shim `delete` and every agent start ~5-15 ms; mypy reads any
# constant named TYPE_CHECKING as true)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from pykata.errors import PykataError
# PykataError too is answered by the module __getattr__: pykata.errors imports enum and builds an
# IntEnum (~7 ms of CPU, a third of a `shim start` or `shim delete` process, which need neither)
__version__: str  # a module __getattr__ answers it

_SDK_NAMES = ("Sandbox", "AsyncSandbox", "ExecResult", "ExecTimeoutError", "SandboxTimeoutError", "NotFoundError",
              "PolicyDeniedError", "SandboxGoneError", "SdkError", "Pool", "AsyncPool", "Pty", "AsyncPty",
              "Proc", "AsyncProcess", "FileInfo", "SandboxInfo", "SnapshotError")
__all__ = ["AsyncPool", "AsyncProcess", "AsyncPty", "AsyncSandbox", "ExecResult", "ExecTimeoutError", "FileInfo",
           "NotFoundError", "PolicyDeniedError", "Pool", "Proc", "Pty", "PykataError", "Sandbox", "SandboxGoneError",
           "SandboxInfo", "SandboxTimeoutError", "SdkError", "SnapshotError", "__version__"]


def __getattr__(name: str) -> object:
    # Lazy: the guest agent imports pykata.* on every VM boot, where importlib.metadata alone costs
    # a noticeable part of start-up under TCG, and it needs none of the host-only SDK.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("pykata")
        except PackageNotFoundError:  # a source tree that was never installed (e.g. the guest)
            return "0.0.0"
    if name == "PykataError":
        from pykata.errors import PykataError

        return PykataError
    if name in _SDK_NAMES:
        from pykata import sdk

        return getattr(sdk, name)
    raise AttributeError(name)
