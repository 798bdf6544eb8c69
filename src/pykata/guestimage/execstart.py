"""The agent's exec starter (execstart.c), built with the host's C compiler at image build time.

A static program (it runs after setns into the container's mount namespace, where the image's libraries
are not): ~0.7 MB in the image. Its bytes come from its source (a builder input, in the image's sources
hash), the compiler (crunlib.tool, in the image's key) and the C library it links statically (libc.a,
Debian's libc6-dev), which `tool()` puts in the key: another compiler or libc is another image.

Without a compiler or a static libc, or when the build fails, the image has no starter and the agent forks
its exec children itself (nsexec._child: the same process, ~2x the time of ExecProcess under TCG). That
fallback is kept on purpose, but never silently: the build says so, the image's manifest records why
(`exec_starter`), and `pykata check` warns about an image without it.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from pykata.guestimage import crunlib

# where the agent looks for it (pykata.agent.nsexec.EXECSTART)
PATH = "usr/libexec/pykata/execstart"
SOURCE = Path(__file__).with_name("execstart.c")
WHY_NONE = "the agent forks its exec children (slower execs)"

# `tool()` runs on every image lookup, a cold VM start among them: cc's libc.a is remembered by cc's (path,
# size, mtime, inode), and libc.a is known by its size and mtime (dpkg gives a package's files its archive's
# times), not its 5 MB's sha256 (6.5 ms a process): a lookup costs two stats, a process's first one
# `cc -print-file-name` (~3 ms)
_libcs: dict[tuple[str, int, int, int], Path | None] = {}


def _stat_key(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return str(path), st.st_size, st.st_mtime_ns, st.st_ino


def static_libc(cc: str) -> Path | None:
    """The libc.a `cc -static` links (libc6-dev's), or None when it has none."""
    try:
        key = _stat_key(Path(cc))
    except OSError:
        return None
    if key not in _libcs:
        _libcs[key] = _find_static_libc(cc)
    found = _libcs[key]
    return found if found is not None and found.is_file() else None


def _find_static_libc(cc: str) -> Path | None:
    try:
        done = subprocess.run([cc, "-print-file-name=libc.a"], capture_output=True, text=True, timeout=30,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = Path(done.stdout.strip())
    return found.resolve() if done.returncode == 0 and found.is_absolute() and found.is_file() else None


def tool() -> str:
    """What decides the starter's bytes beside its source and the compiler (both in the image's hash already:
    the builder's sources, crunlib.tool), for the image's hash: the static C library it links (its path, size
    and mtime), or why there is none."""
    cc = crunlib.compiler()
    if cc is None:
        return "none: no cc on the host"
    libc = static_libc(cc)
    if libc is None:
        return f"none: no static C library (libc.a) for {cc}"
    try:
        st = libc.stat()
        return f"libc.a {libc} size {st.st_size} mtime {st.st_mtime_ns}"
    except OSError as exc:
        return f"none: cannot read {libc}: {exc.strerror}"


def install(root: Path) -> str | None:
    """Build the program into `root`/PATH; None when installed, else why not."""
    cc = crunlib.compiler()
    if cc is None:
        return "no C compiler (cc) on the host: install build-essential"
    if static_libc(cc) is None:
        return f"no static C library (libc.a) for {cc}: install libc6-dev"
    out = root / PATH
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pykata-execstart-") as d:
        built = Path(d) / "execstart"
        argv = [cc, "-static", "-O2", "-s", "-Wall", "-Werror", "-Wl,--build-id=none", "-o", str(built), str(SOURCE)]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            return f"cc failed: {done.stderr.strip()[:300]}"
        out.write_bytes(built.read_bytes())
    os.chmod(out, 0o755)
    return None
