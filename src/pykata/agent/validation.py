"""Checks of everything the host sends the agent, and the status errors the agent answers with.

The host is more trusted than a container, but a confused or compromised host must not make the
agent write outside its directories, mount over the guest, or grow without bound. Every check raises
`InvalidArgument` (pykata.errors: it answers INVALID_ARGUMENT) whose message starts with the name of
the bad field.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from pykata import ids
from pykata.errors import InvalidArgument

# A cgroup name below the agent's cgroup parent (letters, digits, '_', '.', '-').
CGROUP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
ENV_KEY_RE = re.compile(r"^[^=\x00]+$")

MAX_SPEC_BYTES = 1 << 20          # oci_spec_json
MAX_RESOURCES_BYTES = 64 << 10    # linux_resources_json
MAX_IO_CHUNK = 1 << 20            # ReadStdout/ReadStderr max_length cap and WriteStdin data
MAX_ARGS = 4096
MAX_ENV = 4096
MAX_STRING = 128 << 10            # one argv/env entry
MAX_PATH = 4096
MAX_LIST = 1024                   # storages, devices, mounts, dns lines, ...


def check_id(field: str, value: str) -> str:
    """A container or sandbox id by the one rule of pykata.ids (the host checks the same). Raises
    InvalidArgument naming `field`."""
    return ids.check_id(field, value)


def check_exec_id(field: str, value: str, *, allow_empty: bool = True) -> str:
    """An exec id; "" names the container's init process when `allow_empty`. Raises InvalidArgument."""
    return ids.check_exec_id(value, field, allow_empty=allow_empty)


def check_string(field: str, value: str, *, max_len: int = MAX_STRING, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(field, "must be a string")
    if "\x00" in value:
        raise InvalidArgument(field, "contains a NUL byte")
    if len(value) > max_len:
        raise InvalidArgument(field, f"longer than {max_len} characters")
    if not value and not allow_empty:
        raise InvalidArgument(field, "must not be empty")
    return value


def check_count(field: str, items: Sequence[object], limit: int = MAX_LIST) -> None:
    if len(items) > limit:
        raise InvalidArgument(field, f"{len(items)} entries, at most {limit} allowed")


def check_args(field: str, args: object) -> list[str]:
    """A non-empty argv of strings without NUL bytes."""
    if not isinstance(args, list) or not args:
        raise InvalidArgument(field, "must be a non-empty list of strings")
    check_count(field, args, MAX_ARGS)
    return [check_string(f"{field}[{i}]", a) for i, a in enumerate(args)]


def check_env(field: str, env: object) -> list[str]:
    """"KEY=value" entries: the key is not empty and holds neither '=' nor NUL."""
    if env is None:
        return []
    if not isinstance(env, list):
        raise InvalidArgument(field, "must be a list of KEY=value strings")
    check_count(field, env, MAX_ENV)
    out = []
    for i, entry in enumerate(env):
        check_string(f"{field}[{i}]", entry)
        key, sep, _ = entry.partition("=")
        if not sep or not ENV_KEY_RE.match(key):
            raise InvalidArgument(f"{field}[{i}]", f"{_show(entry)} is not KEY=value")
        out.append(entry)
    return out


def check_abs_path(field: str, path: object) -> str:
    """An absolute path with no '..' component; returned normalized ('//', '.', trailing '/')."""
    if not isinstance(path, str) or not path:
        raise InvalidArgument(field, "must be an absolute path")
    check_string(field, path, max_len=MAX_PATH)
    if not path.startswith("/"):
        raise InvalidArgument(field, f"{_show(path)} is not absolute")
    if ".." in path.split("/"):
        raise InvalidArgument(field, f"{_show(path)} contains '..'")
    norm = posixpath.normpath(path)
    return "/" + norm.lstrip("/")


def is_within(path: str | Path, root: str | Path) -> bool:
    p, r = str(path), str(root).rstrip("/") or "/"
    return p == r or p.startswith(r + "/") or r == "/"


def check_within(field: str, path: object, roots: Iterable[Path], *, must_exist: bool = True) -> Path:
    """`path` (absolute, no '..'), with every symlink resolved, lies inside one of `roots`.

    Raises InvalidArgument naming `field` otherwise, or when it does not exist and
    `must_exist`.
    """
    norm = check_abs_path(field, path)
    real = os.path.realpath(norm)
    if not any(is_within(real, os.path.realpath(r)) for r in roots):
        raise InvalidArgument(field, f"{_show(norm)} is outside the agent's allowed directories")
    if must_exist and not os.path.lexists(real):
        raise InvalidArgument(field, f"{_show(norm)} does not exist")
    return Path(real)


def check_relative(field: str, path: str) -> list[str]:
    """The components of a path below some root; refuses '..', NUL and empty paths."""
    norm = check_abs_path(field, "/" + path.lstrip("/"))
    parts = [p for p in norm.split("/") if p]
    if not parts:
        raise InvalidArgument(field, "names the root itself")
    return parts


def open_dir_below(root: Path, parts: Sequence[str], *, create_mode: int | None = None,
                   field: str = "path") -> int:
    """Open (O_PATH) the directory root/parts..., never following a symlink below `root`.

    Missing directories are made with `create_mode` when given. Returns a descriptor the caller
    closes. Raises InvalidArgument when a component is a symlink or not a directory.
    """
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            if create_mode is not None:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, create_mode, dir_fd=fd)
            try:
                nxt = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise InvalidArgument(field, f"{part!r} is a symlink or not a directory") from None
                if exc.errno == errno.ENOENT:
                    raise InvalidArgument(field, f"{part!r} does not exist") from None
                raise
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
