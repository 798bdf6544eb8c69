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
- The bytecode of the modules the agent imports (until its ready line and in LateAgent's load) is
  also kept in one file, BUNDLE (written at image build: pykata.guestimage.pycbundle), which
  `use_bundle` puts in front of the path finder: each such import is one dictionary look-up and one
  pread instead of the path finder's walk of sys.path (stat calls, directory listings, an open,
  fstat, read and close per module). The pyc files stay in the image for every other use.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import marshal
import os
import sys
from typing import Any

# Imported by google.protobuf.descriptor_pool; used there only by the pure-Python implementation.
DEFERRED_MODULES = ("google.protobuf.internal.python_message",)
# Imported at the top by linecache (tokenize) and traceback (textwrap), used only when a traceback is
# formatted; loaded after the ready line (load_deferred).
LATE_STDLIB = ("tokenize", "textwrap")


# The boot modules' bytecode in one file (format: pykata.guestimage.pycbundle, which writes it).
BUNDLE = "/usr/lib/pykata/boot.pycs"
BUNDLE_MAGIC = b"PYKPYCS1"
BUNDLE_HEADER = 16  # magic, the interpreter's 4-byte pyc magic, the index's length (4 bytes, little-endian)


def parse_bundle_index(index: bytes) -> dict[str, tuple[str, bool, int, int]]:
    """The bundle's index: module name -> (origin path, is a package, data offset, data size).

    Each entry: 2-byte name length, name, 2-byte origin length, origin, 1-byte package flag, 4-byte
    offset (from the file's start), 4-byte size; integers little-endian. Raises ValueError when the
    index is cut short.
    """
    out: dict[str, tuple[str, bool, int, int]] = {}
    at, end = 0, len(index)
    while at < end:
        n = int.from_bytes(index[at:at + 2], "little")
        name = index[at + 2:at + 2 + n].decode()
        at += 2 + n
        n = int.from_bytes(index[at:at + 2], "little")
        origin = index[at + 2:at + 2 + n].decode()
        at += 2 + n
        if at + 9 > end:
            raise ValueError("bundle index cut short")
        out[name] = (origin, index[at] == 1, int.from_bytes(index[at + 1:at + 5], "little"),
                     int.from_bytes(index[at + 5:at + 9], "little"))
        at += 9
    return out


class _BundledCode:
    """Mixed into the stdlib's file loaders: get_code of the bundled module reads its bytecode from the
    bundle (once: a reload reads the file as usual); everything else (get_source, resources, the
    module's __file__ and __cached__) is the file loader's own."""

    bundle: tuple[int, int, int] | None = None  # (fd, offset, size)

    def get_code(self, fullname: str) -> Any:
        where, self.bundle = self.bundle, None
        if where is None or fullname != self.name:  # type: ignore[attr-defined]
            return super().get_code(fullname)  # type: ignore[misc]
        fd, offset, size = where
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise ImportError(f"{BUNDLE}: {fullname} cut short", name=fullname)
        return marshal.loads(data)


class _BundledSource(_BundledCode, importlib.machinery.SourceFileLoader):  # type: ignore[misc]  # (typeshed)
    pass


class _BundledSourceless(_BundledCode, importlib.machinery.SourcelessFileLoader):
    pass


class BundleFinder:
    """A meta path finder for the modules in the bundle (put before the path finder by use_bundle)."""

    def __init__(self, fd: int, index: dict[str, tuple[str, bool, int, int]]) -> None:
        self.fd = fd
        self.index = index

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        entry = self.index.get(name)
        if entry is None:
            return None
        origin, is_package, offset, size = entry
        loader = (_BundledSource if origin.endswith(".py") else _BundledSourceless)(name, origin)
        loader.bundle = (self.fd, offset, size)
        spec = importlib.machinery.ModuleSpec(name, loader, origin=origin, is_package=is_package)
        spec.has_location = True
        if is_package:
            spec.submodule_search_locations = [origin.rpartition("/")[0]]
        return spec

    def invalidate_caches(self) -> None:
        pass


def use_bundle(path: str = BUNDLE) -> BundleFinder | None:
    """Serve the modules of the bundle at `path` from it, before the path finder; None when there is no
    usable bundle (missing, another interpreter's bytecode, a damaged index): imports then go on as
    usual. Raises nothing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        head = os.pread(fd, BUNDLE_HEADER, 0)
        if len(head) != BUNDLE_HEADER or head[:8] != BUNDLE_MAGIC or head[8:12] != importlib.util.MAGIC_NUMBER:
            raise ValueError("not a bundle of this interpreter's bytecode")
        size = int.from_bytes(head[12:16], "little")
        index = os.pread(fd, size, BUNDLE_HEADER)
        if len(index) != size:
            raise ValueError("bundle index cut short")
        finder = BundleFinder(fd, parse_bundle_index(index))
    except (OSError, ValueError, UnicodeDecodeError):
        os.close(fd)
        return None
    at = next((i for i, f in enumerate(sys.meta_path) if f is importlib.machinery.PathFinder), len(sys.meta_path))
    sys.meta_path.insert(at, finder)
    return finder


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

