"""How the agent starts: the guest's /init (pykata.agent.pid1) and `python -m pykata.agent` (`boot()`)
both turn the garbage collector off and defer imports first.

Under TCG the agent's start-up (~260 modules imported) is the largest part of a cold boot, so what
start-up does not need is kept out of it:
- The cyclic garbage collector is off until the agent has started (`main.run` freezes what start-up
  made, then turns it on again). Imports allocate thousands of long-lived objects, and each
  collection walks them all: in the guest that was ~25% of importing the agent.
- Modules that protobuf imports unconditionally but that its C (upb) implementation, which the guest
  uses, never calls are loaded on first use instead (importlib.util.LazyLoader): the pure-Python
  message runtime pulls in text_format, decoder, encoder and containers (~10% of the imports).
"""

from __future__ import annotations

import gc
import importlib.util
import sys

# Imported by google.protobuf.descriptor_pool; used there only by the pure-Python implementation.
DEFERRED_MODULES = ("google.protobuf.internal.python_message",)


def defer_imports(names: tuple[str, ...] = DEFERRED_MODULES) -> None:
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
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, module)


def boot() -> None:
    """Start the agent (argv from sys.argv) and exit with its status."""
    gc.disable()  # main.run turns it on once start-up's objects are frozen
    defer_imports()
    from pykata.agent.main import main

    raise SystemExit(main())
