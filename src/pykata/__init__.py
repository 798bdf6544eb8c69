"""pykata: run OCI containers inside lightweight virtual machines."""

from importlib.metadata import PackageNotFoundError, version

from pykata.errors import PykataError

try:
    __version__ = version("pykata")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["PykataError", "__version__"]
