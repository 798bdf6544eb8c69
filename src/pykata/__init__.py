"""pykata: run OCI containers inside lightweight virtual machines.

The Python API: `pykata.Sandbox` (blocking) and `pykata.AsyncSandbox` (asyncio), see pykata.sdk.
"""

from importlib.metadata import PackageNotFoundError, version

from pykata.errors import PykataError

try:
    __version__ = version("pykata")
except PackageNotFoundError:  # running from a source tree that was never installed (e.g. the guest)
    __version__ = "0.0.0"

__all__ = ["AsyncSandbox", "ExecResult", "PykataError", "Sandbox", "__version__"]


def __getattr__(name: str) -> object:
    # lazy: the guest agent imports pykata.* without the host-only SDK dependencies
    if name in ("Sandbox", "AsyncSandbox", "ExecResult", "ExecTimeoutError"):
        from pykata import sdk

        return getattr(sdk, name)
    raise AttributeError(name)
