"""kubelet's AtomicWriter, played by tests: a configmap/secret volume directory as kubelet writes it
(files of a version in `..<timestamp>/`, `..data` swapped to it by a rename, one user-visible symlink
per key through `..data`, the old version removed last)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path


def write_volume(volume: Path, files: dict[str, bytes], mode: int = 0o644) -> None:
    """Make `volume` hold exactly `files` (key -> content), in kubelet's order."""
    volume.mkdir(parents=True, exist_ok=True)
    data = volume / "..data"
    old = os.readlink(data) if data.is_symlink() else None
    ts = volume / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    ts.mkdir(mode=0o755)
    for key, content in files.items():
        (ts / key).parent.mkdir(parents=True, exist_ok=True)
        (ts / key).write_bytes(content)
        (ts / key).chmod(mode)
    tmp = volume / "..data_tmp"
    os.symlink(ts.name, tmp)
    os.rename(tmp, data)
    for key in files:
        top = key.split("/")[0]
        if not (volume / top).is_symlink():
            os.symlink(f"..data/{top}", volume / top)
    if old is not None:
        for entry in volume.iterdir():
            if not entry.name.startswith("..") and entry.name not in {k.split("/")[0] for k in files}:
                entry.unlink()
        shutil.rmtree(volume / old)
