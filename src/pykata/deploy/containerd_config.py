"""pykata's runtime handler in containerd's configuration, added and removed without touching the rest.

The handler goes in as one block appended at the end of the file between two marker comments, so
the admin's text stays byte-for-byte what it was, a second install finds the block and changes
nothing, and `remove` takes exactly that block out again. Before the first change the original is
copied to `<config>.pykata-backup` (or, when there was no file, `<config>.pykata-created` records
that); removing the block restores the backup byte-for-byte when nothing else changed since.

containerd's configuration versions: 1 (no `version` key: containerd 1.x's old layout), 2 (containerd
1.5-1.7) and 3 (containerd 2.x); others are refused with an error naming the version.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pykata.errors import PykataError
from pykata.fsutil import KEEP_MODE, atomic_write

RUNTIME_TYPE = "io.containerd.pykata.v2"
HANDLER = "pykata"
BEGIN = "# >>> pykata runtime handler (added by `pykata install node`; `--uninstall` removes it) >>>"
END = "# <<< pykata runtime handler <<<"
BACKUP_SUFFIX = ".pykata-backup"
CREATED_SUFFIX = ".pykata-created"
# The table that holds CRI's runtimes, per configuration version.
RUNTIMES_TABLE = {
    1: ("plugins", "cri", "containerd", "runtimes"),
    2: ("plugins", "io.containerd.grpc.v1.cri", "containerd", "runtimes"),
    3: ("plugins", "io.containerd.cri.v1.runtime", "containerd", "runtimes"),
}


class ContainerdConfigError(PykataError):
    """containerd's configuration cannot be read, understood or changed; the message names the file
    and, where there is one, the field."""


def _toml_key(parts: tuple[str, ...]) -> str:
    return ".".join(p if p.replace("_", "").replace("-", "").isalnum() else f'"{p}"' for p in parts)


def runtime_table(version: int, handler: str = HANDLER) -> str:
    """The dotted TOML name of the handler's table for a configuration of `version`."""
    return _toml_key((*RUNTIMES_TABLE[version], handler))


def snippet(version: int, config_path: str | None = None, handler: str = HANDLER) -> str:
    """The handler's TOML for a configuration of `version`; with `config_path`, containerd hands it to the
    shim as the runtime option ConfigPath (which pykata configuration file the shim loads)."""
    table = runtime_table(version, handler)
    text = (f"[{table}]\n"
            f'  runtime_type = "{RUNTIME_TYPE}"\n'
            f'  pod_annotations = ["io.katacontainers.*"]\n'
            f"  privileged_without_host_devices = true\n")
    if config_path is not None:
        text += f"[{table}.options]\n  ConfigPath = {_toml_string(config_path)}\n"
    return text


def _toml_string(value: str) -> str:
    if any(c in value for c in '"\\\n\r\t') or not value.isprintable():
        raise ContainerdConfigError(f"ConfigPath: {value!r} cannot be written into containerd's configuration")
    return f'"{value}"'


def block(version: int, config_path: str | None) -> str:
    """The marked block `merge` appends."""
    return f"{BEGIN}\n{snippet(version, config_path)}{END}\n"


@dataclass(frozen=True)
class Plan:
    """What `merge` or `remove` would write: `text` None means the file stays as it is."""

    path: Path
    version: int
    text: str | None
    message: str


def read(path: Path) -> str | None:
    """The file's text, None when it does not exist. Raises ContainerdConfigError."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ContainerdConfigError(f"{path}: {e.strerror}") from None
    try:
        return raw.decode()
    except UnicodeDecodeError as e:
        raise ContainerdConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _parse(path: Path, text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ContainerdConfigError(f"{path}: not valid TOML ({e}); fix it first") from None


def version_of(path: Path, data: dict[str, Any]) -> int:
    """The configuration's version (1 when it has no `version` key, as containerd reads it).

    Raises ContainerdConfigError for a version pykata does not know."""
    version = data.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version not in RUNTIMES_TABLE:
        raise ContainerdConfigError(
            f"{path}: version = {version!r}: pykata knows containerd configuration versions 1, 2 and 3")
    return version


def _runtimes(data: dict[str, Any], version: int) -> Any:
    node: Any = data
    for part in RUNTIMES_TABLE[version]:
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _split(path: Path, text: str) -> tuple[str, str, str] | None:
    """(before, the marked block, after) or None when there is no block. Raises on a half block."""
    start = text.find(BEGIN + "\n")
    if start < 0:
        if END in text:
            raise ContainerdConfigError(f"{path}: has pykata's end marker without its start; remove it by hand")
        return None
    if start > 0 and text[start - 1] != "\n":
        raise ContainerdConfigError(f"{path}: pykata's start marker is not at the start of a line")
    end = text.find(END + "\n", start)
    if end < 0:
        raise ContainerdConfigError(f"{path}: pykata's block has no end marker ({END!r}); remove it by hand")
    end += len(END) + 1
    return text[:start], text[start:end], text[end:]


def _appended(original: str, blk: str) -> str:
    """`original` with `blk` appended after one blank line (a missing final newline is added first)."""
    if not original:
        return blk
    return original + ("\n" if original.endswith("\n") else "\n\n") + blk


def _unappended(before: str) -> str:
    """The inverse of _appended's separator: `before` is the text up to the block's start marker."""
    if before.endswith("\n\n"):
        return before[:-1]
    return before


def plan_merge(path: Path, config_path: str | None) -> Plan:
    """What adding pykata's handler to the configuration at `path` writes. Raises ContainerdConfigError."""
    text = read(path)
    if text is None:
        blk = block(2, config_path)
        return Plan(path, 2, "version = 2\n\n" + blk, f"{path}: created with the pykata runtime handler")
    data = _parse(path, text)
    version = version_of(path, data)
    blk = block(version, config_path)
    parts = _split(path, text)
    if parts is not None:
        before, old, after = parts
        if old == blk:
            return Plan(path, version, None, f"{path}: already has the pykata runtime handler")
        new = before + blk + after
    else:
        runtimes = _runtimes(data, version)
        if isinstance(runtimes, dict) and HANDLER in runtimes:
            field = f"{runtime_table(version)}.runtime_type"
            got = runtimes[HANDLER].get("runtime_type") if isinstance(runtimes[HANDLER], dict) else None
            if got == RUNTIME_TYPE:
                return Plan(path, version, None,
                            f"{path}: has a pykata runtime handler written by hand; left as it is")
            raise ContainerdConfigError(f"{path}: {field} is {got!r}, not {RUNTIME_TYPE!r}: a runtime named "
                                        f"{HANDLER} exists already; rename or remove it")
        new = _appended(text, blk)
    try:  # appending must never leave containerd a file it cannot read
        merged = tomllib.loads(new)
    except tomllib.TOMLDecodeError as e:
        raise ContainerdConfigError(f"{path}: adding pykata's block as {runtime_table(version)} would make it "
                                    f"invalid ({e}): an inline table defines a parent? add it by hand") from None
    table = (_runtimes(merged, version) or {}).get(HANDLER)
    if not isinstance(table, dict) or table.get("runtime_type") != RUNTIME_TYPE:
        raise ContainerdConfigError(f"{path}: after adding pykata's block, {runtime_table(version)} does not "
                                    "read back (an inline table or dotted key defines a parent?); add it by hand")
    return Plan(path, version, new, f"{path}: added the pykata runtime handler (version {version} layout)")


def backup_path(path: Path) -> Path:
    return path.with_name(path.name + BACKUP_SUFFIX)


def created_path(path: Path) -> Path:
    return path.with_name(path.name + CREATED_SUFFIX)


def merge(path: Path, config_path: str | None) -> Plan:
    """Add pykata's handler to the configuration at `path` (backed up first, once). Raises
    ContainerdConfigError or OSError."""
    plan = plan_merge(path, config_path)
    if plan.text is None:
        return plan
    original = read(path)
    if original is None:
        if not backup_path(path).exists():
            atomic_write(created_path(path), "")
    elif _split(path, original) is None:
        # No block yet: the file as it is now is the admin's. An earlier install that stopped between
        # the backup and the change left a backup of this very text; rewriting it is harmless.
        atomic_write(backup_path(path), original.encode(), mode=path.stat().st_mode & 0o7777)
        created_path(path).unlink(missing_ok=True)
    atomic_write(path, plan.text, mode=KEEP_MODE)
    return plan


def plan_remove(path: Path) -> tuple[Plan, bool]:
    """(what removing pykata's block writes, whether the file is to be deleted: pykata created it).

    Raises ContainerdConfigError."""
    text = read(path)
    if text is None:
        return Plan(path, 0, None, f"{path}: does not exist; nothing to remove"), False
    parts = _split(path, text)
    if parts is None:
        return Plan(path, 0, None, f"{path}: has no pykata block; left as it is"), False
    before, blk, after = parts
    new = _unappended(before) + after
    if created_path(path).exists() and new.strip() in ("", "version = 2"):
        return Plan(path, 2, "", f"{path}: removed (pykata created it)"), True
    backup = read(backup_path(path))
    if backup is not None and text == _appended(backup, blk):
        new = backup  # exactly what install appended to it (a missing final newline included)
    if backup is not None and backup != new:
        return Plan(path, 0, new, f"{path}: removed the pykata block; the file changed since the install, so "
                                  f"the backup {backup_path(path)} is kept for comparison"), False
    return Plan(path, 0, new, f"{path}: removed the pykata runtime handler (the file equals its backup)"), False


def remove(path: Path) -> Plan:
    """Take pykata's block out of the configuration at `path`; delete the backup when the result equals it.

    Raises ContainerdConfigError or OSError."""
    plan, delete = plan_remove(path)
    if plan.text is None:
        current = read(path)
        if current is None:
            created_path(path).unlink(missing_ok=True)
        elif current == read(backup_path(path)):
            backup_path(path).unlink()  # an install stopped after its backup: nothing left to undo
        return plan
    if delete:
        path.unlink()
        created_path(path).unlink(missing_ok=True)
        return plan
    backup = read(backup_path(path))
    if backup == plan.text:
        # byte-for-byte the backup, mode included
        atomic_write(path, backup_path(path).read_bytes(), mode=KEEP_MODE)
        backup_path(path).unlink()
    else:
        atomic_write(path, plan.text, mode=KEEP_MODE)
    created_path(path).unlink(missing_ok=True)
    return plan
