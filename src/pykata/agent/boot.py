"""How the agent starts: the guest's /init (pykata.agent.pid1) and `python -m pykata.agent` (__main__)
both turn the garbage collector off and defer imports first.

Under TCG the agent's start-up (~260 modules imported) is the largest part of a cold boot, so what
start-up does not need is kept out of it:
- The cyclic garbage collector is off until the agent has started (`main.run` freezes what start-up
  made, then turns it on again). Imports allocate thousands of long-lived objects, and each
  collection walks them all: in the guest that was ~25% of importing the agent.
- Modules that protobuf imports unconditionally but that its C (upb) implementation, which the guest
  uses, never calls are loaded on first use instead (importlib.util.LazyLoader): the pure-Python
  message runtime pulls in text_format, decoder, encoder and containers (~10% of the imports).
- Standard library modules that linecache and traceback import at the top but use only to format
  tracebacks (tokenize, textwrap: ~3% of the imports under TCG) are deferred the same way, and the
  agent loads them right after its ready line (pykata.agent.main.LateAgent), so a VM template, saved
  once the agent has settled, holds them. (inspect, with ast and dis, would be another ~4%, but
  asyncio's add_signal_handler calls inspect.iscoroutinefunction, and the serial channel adds one
  before the ready line.)
  Python 3.11's `import x` reads `x.__spec__` of a module already in sys.modules, which would load a
  plain LazyLoader module at once; these modules answer `__spec__` without loading.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

# Imported by google.protobuf.descriptor_pool; used there only by the pure-Python implementation.
DEFERRED_MODULES = ("google.protobuf.internal.python_message",)
# Imported at the top by linecache (tokenize) and traceback (textwrap), used only when a traceback is
# formatted; loaded after the ready line (load_deferred).
LATE_STDLIB = ("tokenize", "textwrap")


_LazyModule: Any = importlib.util._LazyModule  # type: ignore[attr-defined]  # (LazyLoader's module class)


class _SpecSafeLazyModule(_LazyModule):  # type: ignore[misc]
    """A LazyLoader module that answers `__spec__` without loading: Python 3.11's `import x` of a module
    already in sys.modules reads it (import_ensure_initialized); any other attribute loads the module."""

    def __getattribute__(self, attr: str) -> Any:
        if attr == "__spec__":
            return object.__getattribute__(self, "__dict__")["__spec__"]
        return super().__getattribute__(attr)


def defer_imports(names: tuple[str, ...] = DEFERRED_MODULES + LATE_STDLIB) -> None:
    """Make each module in `names` load on its first attribute access instead of when imported.

    A module that is already imported or cannot be found is left alone. Raises nothing else.
    """
    for name in names:
        if name in sys.modules:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except ImportError:  # a parent package is missing
            continue
        if spec is None or spec.loader is None:
            continue
        loader = importlib.util.LazyLoader(spec.loader)
        spec.loader = loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        loader.exec_module(module)
        module.__class__ = _SpecSafeLazyModule
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)


def load_deferred(name: str) -> None:
    """Load module `name` now if defer_imports left it waiting for its first use."""
    module = sys.modules.get(name)
    if type(module) is _SpecSafeLazyModule:  # (isinstance would read __class__, which loads it)
        module.__doc__  # noqa: B018 (any attribute but __spec__ loads it)

