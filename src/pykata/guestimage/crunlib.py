"""A small libsystemd for crun in the guest: crun starts without systemd's libraries.

Debian's crun links libsystemd, which pulls in libgcrypt, libgpg-error, liblzma, libzstd and liblz4:
six of crun's ten libraries, ~1270 of its ~1690 symbol relocations and most of the dynamic loader's
work at every crun start (native: 2.6 M of 2.8 M cycles; `LD_DEBUG=statistics crun --version`). Under
TCG that work is paid again in every `crun create`, `delete`, `kill`. crun calls libsystemd only for
the systemd cgroup manager (sd_bus_*), the journald log driver (sd_journal_*) and NOTIFY_SOCKET
(sd_notify*); the agent uses none of them (cgroupfs, `--log=file:`, no NOTIFY_SOCKET in crun's
environment). So the image carries, beside the real library, a stand-in with crun's libsystemd symbols
at their versions: the bus and journal calls fail with -ENOSYS (crun reports such an error as it
would a missing systemd), sd_notify and sd_notify_barrier return 0 as the real ones do without
NOTIFY_SOCKET, and the unref/free calls do nothing. The agent runs crun, and only crun, with
LD_LIBRARY_PATH pointing at it (pykata.agent.crun); a container's processes get their own
environment from the spec.

It is built with the host's C compiler at image build time (its identity is in the image's hash),
and only when it covers every libsystemd symbol the image's crun imports; otherwise the image has
none and crun loads the real library, as before. When it is built, the library directories' name
`libsystemd.so.0` points at it too (`replace_real`: crun is the only program of the image that links
libsystemd), so the real library and the five it alone needs (~3.4 MB, unpacked at every cold boot
from the initramfs) leave the image, and a crun run without LD_LIBRARY_PATH (the boot diagnostics,
a debug console) loads the stand-in as well.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from pykata.guestimage import elf

# where the guest finds it (pykata.agent.crun.CRUN_LIB_DIR names the same directory)
LIB_DIR = "usr/lib/pykata-crun"
SONAME = "libsystemd.so.0"

# crun 1.8's libsystemd imports, by the version that defines each
_VERSIONS: dict[str, tuple[str, ...]] = {
    "LIBSYSTEMD_209": ("sd_journal_send_with_location", "sd_notify"),
    "LIBSYSTEMD_221": ("sd_bus_call", "sd_bus_default_system", "sd_bus_default_user", "sd_bus_error_free",
                       "sd_bus_error_get_errno", "sd_bus_message_append", "sd_bus_message_append_strv",
                       "sd_bus_message_close_container", "sd_bus_message_new_method_call",
                       "sd_bus_message_open_container", "sd_bus_message_read", "sd_bus_message_unref",
                       "sd_bus_process", "sd_bus_unref", "sd_bus_wait"),
    "LIBSYSTEMD_237": ("sd_bus_match_signal_async",),
    "LIBSYSTEMD_246": ("sd_notify_barrier",),
}
SYMBOLS = frozenset(s for names in _VERSIONS.values() for s in names)
_RETURNS_ZERO = frozenset({"sd_notify", "sd_notify_barrier"})
_RETURNS_NOTHING = frozenset({"sd_bus_error_free"})
_RETURNS_NULL = frozenset({"sd_bus_message_unref", "sd_bus_unref"})


def source() -> str:
    """The C source of the stand-in."""
    lines = ["/* pykata: crun's libsystemd stand-in (pykata.guestimage.crunlib) */", "#include <errno.h>"]
    for name in sorted(SYMBOLS):
        if name in _RETURNS_NOTHING:
            lines.append(f"void {name}(void *p) {{ (void)p; }}")
        elif name in _RETURNS_NULL:
            lines.append(f"void *{name}(void *p) {{ (void)p; return 0; }}")
        elif name in _RETURNS_ZERO:
            lines.append(f"int {name}(void) {{ return 0; }}")
        else:
            lines.append(f"int {name}(void) {{ return -ENOSYS; }}")
    return "\n".join(lines) + "\n"


def version_script() -> str:
    out = []
    parent = ""
    for version, names in _VERSIONS.items():
        body = " ".join(f"{n};" for n in names)
        local = " local: *;" if not parent else ""
        out.append(f"{version} {{ global: {body}{local} }}{f' {parent}' if parent else ''};")
        parent = version
    return "\n".join(out) + "\n"


def compiler() -> str | None:
    """The host's C compiler (resolved), or None."""
    found = shutil.which("cc")
    return os.path.realpath(found) if found else None


# the compiler's sha256 by its (path, size, mtime, inode): `tool()` runs on every image lookup, a cold VM
# start among them (hashing the compiler took ~6 ms of each)
_digests: dict[tuple[str, int, int, int], str] = {}


def tool() -> str:
    """What decides the stand-in's bytes beside this module, for the image's hash: the compiler, by the
    sha256 of its executable, or why there is none."""
    cc = compiler()
    if cc is None:
        return "none: no cc on the host"
    try:
        st = os.stat(cc)
        key = (cc, st.st_size, st.st_mtime_ns, st.st_ino)
        if key not in _digests:
            _digests[key] = hashlib.sha256(Path(cc).read_bytes()).hexdigest()
    except OSError as exc:
        return f"none: cannot read {cc}: {exc.strerror}"
    return f"cc sha256:{_digests[key]}"


def install(root: Path) -> str | None:
    """Build the stand-in into `root`/LIB_DIR when the image's crun can use it; None when installed,
    else why not (the image then has none)."""
    crun = root / "usr/bin/crun"
    try:
        _defined, undefined = elf.dynamic_symbols(crun.read_bytes())
    except (OSError, elf.ElfError) as exc:
        return f"cannot read the image's crun: {exc}"
    wanted = {s for s in undefined if s.startswith("sd_")}
    if not wanted or not wanted <= SYMBOLS:
        return f"crun imports libsystemd symbols it does not have: {sorted(wanted - SYMBOLS)}"
    cc = compiler()
    if cc is None:
        return "no cc on the host"
    out = root / LIB_DIR
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pykata-crunlib-") as d:
        (Path(d) / "stub.c").write_text(source())
        (Path(d) / "stub.map").write_text(version_script())
        argv = [cc, "-shared", "-fPIC", "-O2", "-nostdlib", "-o", str(out / SONAME), f"-Wl,-soname,{SONAME}",
                f"-Wl,--version-script={d}/stub.map", "-Wl,--build-id=none", f"{d}/stub.c"]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            shutil.rmtree(out, ignore_errors=True)
            return f"cc failed: {done.stderr.strip()[:300]}"
    os.chmod(out / SONAME, 0o644)
    return None


def replace_real(root: Path) -> list[str]:
    """Point the library directories' `libsystemd.so.0` at the stand-in installed in `root`/LIB_DIR (a
    relative symlink), so the real library is no longer linked by anything (assemble.prune_libraries
    then drops it and what only it needs); return the names replaced. Call only after `install`
    succeeded."""
    stub = root / LIB_DIR / SONAME
    replaced = []
    for d in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"):
        name = root / d / SONAME
        if not (name.is_symlink() or name.exists()):
            continue
        name.unlink()
        name.symlink_to(os.path.relpath(stub, name.parent))
        replaced.append(f"/{d}/{SONAME}")
    return replaced
