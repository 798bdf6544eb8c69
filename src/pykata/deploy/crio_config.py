"""pykata's runtime handler for CRI-O: one drop-in file under /etc/crio/crio.conf.d, which is CRI-O's own
way to add configuration without editing crio.conf. The file starts with a marker line, so uninstalling
removes only a file pykata wrote."""

from __future__ import annotations

from pathlib import Path

from pykata.errors import PykataError
from pykata.fsutil import atomic_write

MARKER = "# written by `pykata install node`; `pykata install node --uninstall` removes this file"


class CrioConfigError(PykataError):
    """The drop-in cannot be written or removed; the message names the file."""


def snippet(shim: Path, config_path: Path | None = None, handler: str = "pykata") -> str:
    """CRI-O's runtime table for pykata: a shim-v2 runtime is CRI-O's `runtime_type = "vm"` (as Kata's);
    `runtime_config_path` reaches the shim as its ConfigPath option."""
    text = (f"[crio.runtime.runtimes.{handler}]\n"
            f'runtime_path = "{shim}"\n'
            f'runtime_type = "vm"\n'
            f'runtime_root = "/run/vc"\n'
            f"privileged_without_host_devices = true\n"
            f'allowed_annotations = ["io.katacontainers.*"]\n')
    if config_path is not None:
        text += f'runtime_config_path = "{config_path}"\n'
    return text


def differs(dropin: Path, text: str) -> bool:
    """Whether `write(dropin, text)` would change the file."""
    try:
        return dropin.read_text() != f"{MARKER}\n{text}"
    except OSError:
        return True


def write(dropin: Path, text: str) -> bool:
    """Write pykata's drop-in (with its marker) at `dropin`; False when it is already so.

    Raises CrioConfigError (a file pykata did not write is there) or OSError."""
    content = f"{MARKER}\n{text}"
    try:
        current = dropin.read_text()
    except FileNotFoundError:
        current = None
    if current == content:
        return False
    if current is not None and not current.startswith(MARKER + "\n"):
        raise CrioConfigError(f"{dropin}: exists and was not written by pykata; remove it or pass another "
                              "--crio-dropin")
    atomic_write(dropin, content)
    return True


def remove(dropin: Path) -> bool:
    """Remove pykata's drop-in; False when there is none. Raises CrioConfigError for a file pykata did not
    write, or OSError."""
    try:
        current = dropin.read_text()
    except FileNotFoundError:
        return False
    if not current.startswith(MARKER + "\n"):
        raise CrioConfigError(f"{dropin}: was not written by pykata; not removing it")
    dropin.unlink()
    return True
