"""The agent's exec starter (execstart.c), built with the host's C compiler at image build time.

A static program (it runs after setns into the container's mount namespace, where the image's libraries
are not): ~0.7 MB in the image. The compiler's identity is in the image's hash (crunlib.tool); without a
compiler, or when it fails, the image has none and the agent forks its exec children itself.
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


def install(root: Path) -> str | None:
    """Build the program into `root`/PATH; None when installed, else why not."""
    cc = crunlib.compiler()
    if cc is None:
        return "no cc on the host"
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
