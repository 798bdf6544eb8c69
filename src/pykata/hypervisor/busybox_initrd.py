"""A tiny initrd of busybox-static plus an init script: for the KVM trial boot and for driver tests.

The driver works with any kernel and initrd; this one boots in a fraction of a second, which is what a
capability probe needs.
"""

from __future__ import annotations

import io
import shutil
import stat
from pathlib import Path

from pykata.errors import HypervisorError
from pykata.fsutil import atomic_write
from pykata.guestimage.cpio import CpioEntry, write_archive

BUSYBOX_PATHS = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
APPLETS = ("sh", "echo", "cat", "mount", "umount", "mkdir", "ls", "sleep", "poweroff", "reboot", "sync",
           "dmesg", "ps", "kill", "head", "tail", "grep", "true", "false", "test", "[", "printf", "date")
_DIR = stat.S_IFDIR | 0o755
_FILE = stat.S_IFREG | 0o755


def find_busybox() -> Path | None:
    """A static busybox on the host (Debian's busybox-static), or None."""
    for path in BUSYBOX_PATHS:
        if path.is_file():
            return path
    found = shutil.which("busybox")
    return Path(found) if found else None


def busybox_initrd_bytes(init_script: str, busybox: Path | None = None,
                         files: dict[str, bytes] | None = None) -> bytes:
    """A newc cpio with /bin/busybox, applet symlinks, /dev/console and `/init` = `init_script`.

    Raises:
        HypervisorError: no busybox on the host.
    """
    bb = busybox or find_busybox()
    if bb is None:
        raise HypervisorError("busybox not found (install busybox-static)")
    entries = [CpioEntry(d, _DIR) for d in ("bin", "dev", "proc", "sys", "mnt", "tmp", "run")]
    # The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
    entries.append(CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5 << 8) | 1))
    entries.append(CpioEntry("bin/busybox", _FILE, bb.read_bytes()))
    entries += [CpioEntry(f"bin/{a}", stat.S_IFLNK | 0o777, b"busybox") for a in APPLETS]
    entries.append(CpioEntry("init", _FILE, init_script.encode()))
    for path, data in sorted((files or {}).items()):
        entries.append(CpioEntry(path.lstrip("/"), _FILE, data))
    out = io.BytesIO()
    write_archive(entries, out, mtime=0)
    return out.getvalue()


def write_busybox_initrd(path: Path, init_script: str, busybox: Path | None = None) -> Path:
    """Write `busybox_initrd_bytes(...)` to `path` atomically; return `path`.

    Raises:
        HypervisorError: no busybox on the host.
        OSError: `path` cannot be written.
    """
    data = busybox_initrd_bytes(init_script, busybox)
    atomic_write(path, data, make_parents=False)
    return path
