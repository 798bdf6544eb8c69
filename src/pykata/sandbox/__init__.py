"""Host side of a sandbox: the VM, its agent, shared directory, containers and persisted state.

The names below load on first use (PEP 562): `from pykata.sandbox import state` (the persisted record,
which the shim's short-lived `delete` reads) must not pay for importing the whole VM stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pykata.sandbox.ocispec import SpecError, Volume, build_spec
    from pykata.sandbox.process import Process
    from pykata.sandbox.sandbox import Container, Sandbox, sandboxes_dir

__all__ = ["Container", "Process", "Sandbox", "SpecError", "Volume",
           "build_spec", "sandboxes_dir"]

_LAZY = {
    **dict.fromkeys(["SpecError", "Volume", "build_spec"], "pykata.sandbox.ocispec"),
    "Process": "pykata.sandbox.process",
    **dict.fromkeys(["Container", "Sandbox", "sandboxes_dir"], "pykata.sandbox.sandbox"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
