"""The agent's exec starter (execstart.c), built with the host's C compiler at image build time.

A static program (it runs after setns into the container's mount namespace, where the image's libraries
are not): ~0.7 MB in the image. Its bytes come from its source (a builder input, in the image's sources
hash), the compiler and the C library it links statically (libc.a, Debian's libc6-dev): `tool()` puts both
in the image's key, so another compiler or libc is another image.

Without a compiler or a static libc, or when the build fails, the image has no starter and the agent forks
its exec children itself (nsexec._child: the same process, ~2x the time of ExecProcess under TCG). That
fallback is kept on purpose, but never silently: the build says so, the image's manifest records why
(`exec_starter`), and `pykata check` warns about an image without it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

from pykata.guestimage import crunlib

# where the agent looks for it (pykata.agent.nsexec.EXECSTART)
PATH = "usr/libexec/pykata/execstart"
SOURCE = Path(__file__).with_name("execstart.c")
WHY_NONE = "the agent forks its exec children (slower execs)"

# libc.a's sha256 by (path, size, mtime, inode): `tool()` runs on every image lookup, a VM start among them
_digests: dict[tuple[str, int, int, int], str] = {}


def static_libc(cc: str) -> Path | None:
    """The libc.a `cc -static` links (libc6-dev's), or None when it has none."""
    try:
        done = subprocess.run([cc, "-print-file-name=libc.a"], capture_output=True, text=True, timeout=30,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = Path(done.stdout.strip())
    return found.resolve() if done.returncode == 0 and found.is_absolute() and found.is_file() else None


def _sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _digests:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        _digests[key] = h.hexdigest()
    return _digests[key]


def tool() -> str:
    """What decides the starter's bytes beside its source, for the image's hash: the compiler (crunlib.tool)
    and the static C library it links, by sha256, or why there is none."""
    cc = crunlib.compiler()
    if cc is None:
        return "none: no cc on the host"
    libc = static_libc(cc)
    if libc is None:
        return f"{crunlib.tool()}; none: no static C library (libc.a) for {cc}"
    try:
        return f"{crunlib.tool()}; libc.a sha256:{_sha256(libc)}"
    except OSError as exc:
        return f"{crunlib.tool()}; none: cannot read {libc}: {exc.strerror}"


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
