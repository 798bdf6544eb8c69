"""The boot bundle: the bytecode of the modules the guest agent imports as it starts, in one file.

Under TCG every system call and every line of the import machinery costs, and the agent imports
~200 modules before its ready line (and ~100 more right after it: LateAgent). Python's path finder
walks sys.path for each (stat calls, a directory listing per directory, an open, fstat, read and
close per module). The bundle holds those modules' pyc data in one file with an index; the guest's
/init puts a finder in front of the path finder (pykata.agent.boot.use_bundle) that answers from the
index and reads each module's bytecode with one pread. The pyc files stay where they are for every
other use (a module the bundle lacks, another Python process).

Which modules: those the image's own interpreter imports when it runs the guest's start-up imports
(pykata.agent.pid1, rtnl, main, then the late stdlib modules and the AgentService) with only the
image's library directories on sys.path: the same interpreter, code and order as in the guest.
Modules loaded at interpreter start-up (before /init runs) and extension modules are left out.

File format (integers little-endian): b"PYKPYCS1", the interpreter's pyc magic (4 bytes), the
index's length (4 bytes); the index (pykata.agent.boot.parse_bundle_index); then each module's pyc
data without its 16-byte header, in import order.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from pykata.errors import PykataError

BUNDLE_MAGIC = b"PYKPYCS1"  # (pykata.agent.boot.BUNDLE_MAGIC, which reads it: the agent imports no builder code)
BUNDLE = "usr/lib/pykata/boot.pycs"
PYC_HEADER = 16
# What /init and the agent import, in the guest's order (guestimage/init, pykata.agent.pid1,
# pykata.agent.main: the ready line, then LATE_STDLIB and LATE_MODULES).
_DRIVER = r"""
import gc, sys
gc.disable()
before = set(sys.modules)  # what the interpreter's start loaded: the guest's start loads it too
root, paths = sys.argv[1], sys.argv[2:]
sys.path[:] = paths
from pykata.agent.boot import defer_imports
defer_imports()
import pykata.agent.pid1, pykata.agent.rtnl, pykata.agent.main
from pykata.agent.boot import LATE_STDLIB, load_deferred
for name in LATE_STDLIB:
    load_deferred(name)
import importlib, importlib.machinery as m
for name in pykata.agent.main.LATE_MODULES:
    importlib.import_module(name)
out = []
for name, mod in sys.modules.items():
    spec = getattr(mod, "__spec__", None)
    if name in before or spec is None or not isinstance(spec.loader, (m.SourceFileLoader, m.SourcelessFileLoader)):
        continue
    origin = spec.origin or ""
    if not origin.startswith(root + "/"):
        continue
    pyc = spec.cached if origin.endswith(".py") else origin
    out.append([name, origin[len(root):], spec.submodule_search_locations is not None, pyc])
import json
json.dump(out, sys.stdout)
"""


class BundleError(PykataError):
    """The boot bundle cannot be made (the image's interpreter failed, a pyc is not what it should be)."""


def entry_bytes(name: str, origin: str, is_package: bool, offset: int, size: int) -> bytes:
    """One index entry (pykata.agent.boot.parse_bundle_index reads it)."""
    n, o = name.encode(), origin.encode()
    return (len(n).to_bytes(2, "little") + n + len(o).to_bytes(2, "little") + o + bytes([is_package])
            + offset.to_bytes(4, "little") + size.to_bytes(4, "little"))


def pack(modules: list[tuple[str, str, bool, bytes]], pyc_magic: bytes) -> bytes:
    """The bundle of `modules` (name, origin in the guest, is a package, pyc data without its header)."""
    index_len = sum(len(entry_bytes(name, origin, pkg, 0, 0)) for name, origin, pkg, _ in modules)
    offset = len(BUNDLE_MAGIC) + 8 + index_len
    index, blobs = [], []
    for name, origin, pkg, data in modules:
        index.append(entry_bytes(name, origin, pkg, offset, len(data)))
        blobs.append(data)
        offset += len(data)
    return BUNDLE_MAGIC + pyc_magic + index_len.to_bytes(4, "little") + b"".join(index) + b"".join(blobs)


def write_bundle(root: Path, python: Path, paths: list[str]) -> int:
    """Write root/BUNDLE from the modules the guest's start-up imports, found by running `python` (the
    image's interpreter) with `paths` (directories under `root`, the guest's sys.path) as its sys.path;
    return how many modules it holds. Run after the image's bytecode is compiled. Raises BundleError."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "LC_ALL": "C"}
    proc = subprocess.run([str(python), "-I", "-S", "-B", "-X", "utf8", "-c", _DRIVER, str(root),
                           *(str(root / p) for p in paths)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    if proc.returncode != 0:
        raise BundleError(f"the image's interpreter failed to import the agent: {proc.stderr.strip()[-2000:]}")
    try:
        found = json.loads(proc.stdout)
    except ValueError as exc:
        raise BundleError(f"the image's interpreter printed no module list: {exc}") from exc
    modules, magic = [], None
    for name, origin, is_package, pyc in found:
        raw = Path(pyc).read_bytes()
        # Only unchecked-hash pycs (flags 0b01): their data cannot go stale against a source.
        if len(raw) < PYC_HEADER or int.from_bytes(raw[4:8], "little") != 1:
            raise BundleError(f"{pyc}: not an unchecked-hash pyc")
        if magic is not None and raw[:4] != magic:
            raise BundleError(f"{pyc}: pyc magic {raw[:4].hex()} differs from {magic.hex()}")
        magic = raw[:4]
        modules.append((name, origin, bool(is_package), raw[PYC_HEADER:]))
    if magic is None:
        raise BundleError("the image's interpreter imported no module from the image")
    (root / BUNDLE).write_bytes(pack(modules, magic))
    return len(modules)
