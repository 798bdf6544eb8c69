"""Turn a staged root tree into the two boot forms: an initramfs and a read-only ext4 image.

Both are reproducible: the initrd is written by pykata's own cpio writer (sorted, root-owned, one
mtime); the ext4 image gets a fixed UUID and hash seed, and e2fsprogs' fake clock.
"""

from __future__ import annotations

import gzip
import os
import stat
import subprocess
import uuid
from pathlib import Path
from typing import Literal

from pykata.errors import PykataError
from pykata.guestimage import cpio

Compression = Literal["none", "gzip", "zstd"]
INITRD_SUFFIX: dict[str, str] = {"none": "", "gzip": ".gz", "zstd": ".zst"}
# A fixed namespace: the image UUID is derived from the cache key, so same inputs, same UUID.
_UUID_NS = uuid.UUID("6c1d2f4e-3b8a-4c4f-9a55-0d8e7f0b1a2c")


class ImageError(PykataError):
    """An initrd or file system image could not be written."""


def initrd_entries(root: Path) -> list[cpio.CpioEntry]:
    """The archive members for `root`, plus /dev/console.

    The kernel opens /dev/console on the initramfs before init runs (devtmpfs is mounted later,
    by init), so the node must be in the archive itself; the cpio can carry it without mknod.
    """
    entries = list(cpio.tree_entries(root))
    if not any(e.path == "dev/console" for e in entries):
        entries.append(cpio.CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=os.makedev(5, 1)))
    entries.sort(key=lambda e: e.path)
    return entries


def write_initrd(root: Path, out: Path, *, epoch: int, compression: Compression) -> int:
    """Write `root` as a newc initramfs to `out`, compressed as asked; return its size in bytes.

    Raises ImageError when zstd fails.
    """
    entries = initrd_entries(root)
    if compression == "none":
        with out.open("wb") as f:
            cpio.write_archive(entries, f, epoch)
    elif compression == "gzip":
        with out.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                                 compresslevel=6) as gz:
            cpio.write_archive(entries, gz, epoch)  # type: ignore[arg-type]
    else:
        plain = out.with_name(out.name + ".cpio")
        with plain.open("wb") as f:
            cpio.write_archive(entries, f, epoch)
        # --check adds a checksum the kernel's decompressor verifies; -T0 uses every core, and
        # zstd's output does not depend on the thread count.
        proc = subprocess.run(["zstd", "-q", "-f", "-12", "--check", "-T0", str(plain), "-o", str(out)],
                              capture_output=True, text=True, check=False)
        plain.unlink()
        if proc.returncode != 0:
            raise ImageError(f"zstd failed: {proc.stderr.strip()}")
    return out.stat().st_size


def image_uuid(key: str) -> str:
    return str(uuid.uuid5(_UUID_NS, key))


def write_ext4(root: Path, out: Path, *, epoch: int, key: str) -> int:
    """Write `root` as an ext4 file system image (no journal: it is mounted read-only).

    Returns its size in bytes. Raises ImageError when mkfs.ext4 fails.
    """
    files_bytes, entries = 0, 0
    for dirpath, dirs, names in os.walk(root):
        for name in names + dirs:
            entries += 1
            st = (Path(dirpath) / name).lstat()
            if stat.S_ISREG(st.st_mode):
                files_bytes += -(-st.st_size // 4096) * 4096
    # Room for directories, inode tables and block group metadata: about a fifth, at least 8 MiB.
    size = files_bytes + entries * 512 + max(files_bytes // 5, 8 << 20)
    size = -(-size // (1 << 20)) * (1 << 20)
    if out.exists():
        out.unlink()
    fs_uuid = image_uuid(key)
    cmd = [
        "mkfs.ext4", "-q", "-F", "-d", str(root), "-b", "4096", "-m", "0", "-N", str(entries + 256),
        "-L", "pykata-root", "-U", fs_uuid, "-O", "^has_journal,^resize_inode",
        "-E", f"root_owner=0:0,hash_seed={fs_uuid},lazy_itable_init=0,nodiscard",
        "-T", "default", str(out), f"{size // 1024}k",
    ]
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": str(epoch), "SOURCE_DATE_EPOCH": str(epoch), "LC_ALL": "C"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise ImageError(f"mkfs.ext4 failed: {proc.stderr.strip()[-1000:]}")
    _fix_inode_times(root, out, epoch, env)
    return out.stat().st_size


def _fix_inode_times(root: Path, image: Path, epoch: int, env: dict[str, str]) -> None:
    """Set every inode's atime and ctime to `epoch` (mkfs -d copies them from the staging files,
    where reading changes atime and ctime cannot be set at all)."""
    paths = ["/", "/lost+found"]
    for dirpath, dirs, names in os.walk(root):
        for name in sorted(names + dirs):
            paths.append("/" + (Path(dirpath) / name).relative_to(root).as_posix())
    lines = []
    for p in paths:
        if any(c in p for c in '"\n\\'):
            raise ImageError(f"{p!r}: a path with quotes, backslashes or newlines cannot be fixed up")
        lines += [f'sif "{p}" {field} @{epoch}' for field in ("atime", "ctime", "mtime", "crtime")]
    proc = subprocess.run(["debugfs", "-w", "-f", "-", str(image)], input="\n".join(lines) + "\n",
                          capture_output=True, text=True, env=env, check=False)
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("debugfs ")]
    if proc.returncode != 0 or errors:
        raise ImageError(f"debugfs could not fix inode times: {(errors or [proc.stderr])[0][:500]}")
