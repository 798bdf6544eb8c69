"""A template clone's QEMU runs without the capstone disassembler.

Debian's QEMU links libcapstone.so.4 for its logs and monitor (`-d in_asm`, HMP `x/i`), which a pod's
VM never uses; loading it costs every QEMU 1.3-1.5 MiB of private memory (its tables, relocated at
load: ASLR puts the library at another address in each process, so no two QEMUs share those pages).
A clone's QEMU preloads nocapstone.c instead, built once with the host's C compiler under the soname
libcapstone.so.4: the dynamic linker takes it for QEMU's DT_NEEDED entry and never maps the real one.
Its entry points fail as capstone does for an architecture it lacks.

Used only after a QEMU binary was seen to start with it (`-version`, once per binary: QEMU is linked
with BIND_NOW, so a capstone call the stand-in lacks fails there, not later); otherwise, or without a C
compiler, QEMU loads the real library as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
from importlib import resources
from pathlib import Path

from pykata.fsutil import atomic_write
from pykata.hypervisor.qemu.ramreadonly import build

log = logging.getLogger(__name__)

SONAME = "libcapstone.so.4"
_SOURCE = "nocapstone.c"


def stub(cache_dir: Path, qemu: str) -> Path | None:
    """The stand-in library for QEMU binary `qemu`, built into `cache_dir`/nocapstone/<digest>/ when
    missing; None when it cannot be built or that QEMU does not start with it (then QEMU runs as is)."""
    source = resources.files("pykata.hypervisor.qemu").joinpath(_SOURCE).read_bytes()
    out = cache_dir / "nocapstone" / hashlib.sha256(source).hexdigest()[:20] / SONAME
    try:
        build(source, out, (f"-Wl,-soname,{SONAME}",))
        st = os.stat(qemu)
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("QEMU keeps libcapstone: no stand-in (%s)", exc)
        return None
    key = hashlib.sha256(f"{os.path.realpath(qemu)}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    verdict = out.parent / f"qemu-{key[:20]}"
    try:
        ok = verdict.read_text() == "ok"
    except FileNotFoundError:
        ok = _starts_with(qemu, out)
        with contextlib.suppress(OSError):  # asked again next time
            atomic_write(verdict, "ok" if ok else "no")
    return out if ok else None


def _starts_with(qemu: str, lib: Path) -> bool:
    try:
        done = subprocess.run([qemu, "-version"], env={**os.environ, "LD_PRELOAD": str(lib)},
                              capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    if done.returncode != 0:
        log.info("QEMU %s does not start with pykata's libcapstone stand-in: it loads the real one (%s)",
                 qemu, done.stderr.decode(errors="replace")[-200:])
    return done.returncode == 0
