"""A template clone's QEMU holds the template's memory file read-only.

A clone maps the template's memory file privately (copy-on-write), but QEMU 7.2's memory-backend-file
opens its mem-path read-write whatever `share` says, so every clone's QEMU held a writable descriptor
on the memory all clones of that template map. A guest that escapes into its QEMU (what the VMM's jail
is for) could write the template's RAM through it (pwrite, or a shared mapping of that descriptor):
its code in the kernel of every other pod started from that template, the running ones included (a
private mapping reads the file's pages until it writes them). A private writable mapping needs only
read access, so a clone's QEMU runs with a small preload library (ramreadonly.c, built once with the
host's C compiler into <cache_dir>/ramro/) whose open() opens exactly that path read-only; QEMU 8.2's
`readonly=on,rom=off` would do it without one. The driver checks QEMU's descriptor once it runs
(`check_read_only`); a host without a C compiler runs clones as before, with a warning.

The same library keeps QEMU's small RAM blocks (ROMs, firmware tables: at most 2 MiB) off transparent
huge pages: QEMU 7.2 asks for huge pages on every RAM block, and the ACPI tables' block (2 MiB of address
space, a few KiB written by the state load) cost each clone a whole 2 MiB huge page (ramreadonly.c).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import subprocess
from importlib import resources
from pathlib import Path

from pykata.errors import HypervisorError
from pykata.fsutil import file_lock

log = logging.getLogger(__name__)

ENV_PATH = "PYKATA_RAM_READONLY"
_SOURCE = "ramreadonly.c"
_warned = False


def _source() -> bytes:
    return resources.files("pykata.hypervisor.qemu").joinpath(_SOURCE).read_bytes()


def library(cache_dir: Path) -> Path | None:
    """The preload library, built into `cache_dir`/ramro/<digest of its source>.so when missing;
    None (logged once) when the host has no C compiler or the build fails."""
    global _warned
    source = _source()
    out = cache_dir / "ramro" / f"{hashlib.sha256(source).hexdigest()[:20]}.so"
    try:
        return build(source, out)
    except (OSError, subprocess.SubprocessError) as exc:
        if not _warned:
            detail: object = exc
            if isinstance(exc, subprocess.CalledProcessError):
                detail = exc.stderr.decode(errors="replace")[-400:]
            log.warning("template clones' QEMU keeps the template's memory file read-write (no preload "
                        "library: %s): a guest escaped into QEMU could change other pods' memory", detail)
            _warned = True
        return None


def build(source: bytes, out: Path, link_flags: tuple[str, ...] = ()) -> Path:
    """The shared library `out` built from C `source` with the host's C compiler, unless a trusted one
    is there already (it is loaded into a QEMU that starts as root).

    Raises:
        OSError: no C compiler, or the file cannot be written.
        subprocess.SubprocessError: the compiler failed.
    """
    if _trusted(out):
        return out
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler (cc) on PATH")
    out.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    with file_lock(out.parent / ".lock"):
        if _trusted(out):
            return out
        src = out.parent / f".{out.stem}.{os.getpid()}.c"
        tmp = out.parent / f".{out.stem}.{os.getpid()}.so"
        src.write_bytes(source)
        try:
            subprocess.run([cc, "-shared", "-fPIC", "-O2", "-Wall", *link_flags, "-o", str(tmp), str(src), "-ldl"],
                           check=True, capture_output=True, timeout=120)
            os.chmod(tmp, 0o755)
            os.replace(tmp, out)
        finally:
            for p in (src, tmp):
                p.unlink(missing_ok=True)
    return out


def _trusted(lib: Path) -> bool:
    """Whether `lib` is a regular file of this user that no one else may change (it is loaded into a
    QEMU that starts as root), in such a directory; a file that is not is built again."""
    try:
        for path, kind in ((lib.parent, stat.S_ISDIR), (lib, stat.S_ISREG)):
            st = os.lstat(path)
            if not kind(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
                return False
    except OSError:
        return False
    return True


def environment(lib: Path, memory_file: Path) -> dict[str, str]:
    """What a clone's QEMU gets in its environment so that it opens `memory_file` read-only."""
    preload = " ".join(p for p in (os.environ.get("LD_PRELOAD", ""), str(lib)) if p)
    return {"LD_PRELOAD": preload, ENV_PATH: str(memory_file)}


def writable_descriptors(pid: int, memory_file: Path) -> list[int]:
    """The descriptors of process `pid` on `memory_file` that are open for writing."""
    found = []
    target = os.path.realpath(memory_file)
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") != target:
                continue
            with open(f"/proc/{pid}/fdinfo/{name}") as f:
                flags = next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))
        except (OSError, StopIteration):
            continue
        if flags & os.O_ACCMODE != os.O_RDONLY:
            found.append(int(name))
    return found


def check_read_only(pid: int, memory_file: Path) -> None:
    """Raise HypervisorError when QEMU `pid` holds `memory_file` open for writing (the preload did
    not take: the clone must not run so)."""
    try:
        bad = writable_descriptors(pid, memory_file)
    except OSError as exc:
        raise HypervisorError(f"QEMU {pid}: cannot read its descriptors: {exc.strerror}") from None
    if bad:
        raise HypervisorError(f"QEMU {pid} holds the template's memory file {memory_file} writable "
                              f"(descriptors {bad}): its preload library did not take")
