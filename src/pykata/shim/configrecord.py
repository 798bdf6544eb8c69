"""Which configuration a shim ran with, recorded in its bundle for the `delete` that cleans up after it.

containerd hands the runtime options (and so `ConfigPath`) to `start` only; `delete`, which it runs
after a shim died, gets none. Read the default configuration there and a node whose options name a
configuration with another `runtime_dir` never has its dead shims' VMs, mounts, sandbox directories or
cgroups removed. So `start` writes `<bundle>/pykata-config.json`: the configuration file it loaded
("" for the packaged default), its SHA-256 and the effective runtime_dir, and `delete` loads the same.

The bundle directory is containerd's (root's), but config.json in it is the pod's spec, so the record is
believed only when it is a regular file (not a symlink) owned by this process's user, not writable by
group or others, at most MAX_RECORD_BYTES, and well-formed; otherwise `delete` says why on stderr (the
shim's log) and falls back to the default lookup.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pykata.config import Config

RECORD_NAME = "pykata-config.json"
# pykata.config.CONFIG_PATH_ANNOTATION, written out: importing pykata.config is what the fast path avoids
POD_CONFIG_ANNOTATION = "io.katacontainers.config_path"
MAX_RECORD_BYTES = 8192


if TYPE_CHECKING:
    from typing import NamedTuple

    class ConfigRecord(NamedTuple):
        """The configuration a shim loaded: `path` ("" = the packaged default), its digest, its
        runtime_dir, and whether it has a warm pool (whose entries `delete` may have to prune)."""

        path: str
        sha256: str
        runtime_dir: str
        pool: bool
else:  # the same tuple without importing typing, which the `delete` fast path otherwise never does
    from collections import namedtuple

    ConfigRecord = namedtuple("ConfigRecord", ["path", "sha256", "runtime_dir", "pool"])


def _digest(path: str) -> str:
    import hashlib

    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read(1 << 20)).hexdigest()
    except OSError:
        return ""


def write_record(bundle: Path, config: Config) -> None:
    """Record in the bundle the configuration `start` loaded (pykata.config.find_config_path). Raises OSError."""
    from pykata.config import find_config_path
    from pykata.fsutil import atomic_write

    found = find_config_path()
    path = str(found.absolute()) if found is not None else ""
    body = {"config": path, "sha256": _digest(path), "runtime_dir": config.runtime.runtime_dir,
            "pool": config.factory.pool_size > 0}
    atomic_write(bundle / RECORD_NAME, json.dumps(body), mode=0o600, make_parents=False)


def read_record(bundle: Path) -> tuple[ConfigRecord | None, str]:
    """The record of `bundle` and "", or None and why it is not believed."""
    try:
        fd = os.open(bundle / RECORD_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, "no record (a shim of an older pykata, or `start` failed)"
    except OSError as e:
        return None, f"cannot open it: {e.strerror or e}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, "not a regular file"
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            return None, f"owner {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}: not written by the shim"
        data = os.read(fd, MAX_RECORD_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_RECORD_BYTES:
        return None, f"larger than {MAX_RECORD_BYTES} bytes"
    try:
        body = json.loads(data)
        path, digest, runtime_dir, pool = body["config"], body["sha256"], body["runtime_dir"], body["pool"]
    except (ValueError, TypeError, KeyError):
        return None, "not the JSON the shim writes"
    if not all(isinstance(v, str) for v in (path, digest, runtime_dir)) or not isinstance(pool, bool):
        return None, "not the JSON the shim writes"
    if (path and not path.startswith("/")) or not runtime_dir.startswith("/"):
        return None, "a path in it is not absolute"
    return ConfigRecord(path, digest, runtime_dir, pool), ""


def may_have_leftovers(record: ConfigRecord, sandbox_id: str) -> bool:
    """Whether a dead shim of this record may have left something for `delete` to remove: its sandbox
    directory, its cgroups' record, or warm pool entries. False after an orderly exit, so `delete`
    need not load the configuration at all."""
    run = Path(record.runtime_dir)
    return ((record.pool and _claimed_pool_dir_left(run / "pool"))
            or os.path.lexists(run / "sandboxes" / sandbox_id)
            or os.path.lexists(run / "cgroups" / f"{sandbox_id}.json"))


def _claimed_pool_dir_left(pool: Path) -> bool:
    """Whether the warm pool holds the directory of a claimed VM (pool-<id>/ without pool-<id>.json)
    whose owner is not a live process, what pykata.factory.pool.prune removes. Dead waiting entries
    are pruned by every refill; loading the configuration and the pool's code for them cost each pooled
    pod's `delete` a tenth of a second on a loaded host."""
    try:
        names = set(os.listdir(pool))
    except FileNotFoundError:
        return False
    except OSError:
        return True
    for name in names:
        # a waiting entry is pool-<id>/ with pool-<id>.json and its socket pool-<id>.sock
        if not name.startswith("pool-") or "." in name or f"{name}.json" in names:
            continue
        try:
            with open(pool / name / "state.json", "rb") as f:
                owner = int(json.loads(f.read(1 << 20))["owner_pid"])
            os.kill(owner, 0)
        except (OSError, ValueError, KeyError, TypeError):
            return True  # dead, unreadable, or being made: the full cleanup judges it
    return False


def _warn(bundle: Path, message: str) -> None:
    print(f"containerd-shim-pykata-v2 delete: {bundle / RECORD_NAME}: {message}", file=sys.stderr)


def load_recorded(bundle: Path, record: ConfigRecord | None, why: str) -> Config:
    """The configuration the bundle's shim ran with (`record`, from read_record), else (saying `why`
    on stderr) the default one.

    Raises:
        ConfigError: only from the default lookup, as `pykata.config.load_config`.
    """
    import dataclasses

    from pykata.config import load_config, load_config_file, packaged_default_text
    from pykata.config.parse import parse_toml
    from pykata.errors import ConfigError

    if record is None:
        _warn(bundle, f"{why}; using the default configuration")
        return load_config()
    try:
        if record.path:
            config = load_config_file(record.path)
        else:
            config = parse_toml(packaged_default_text(), source="<packaged default>")
    except ConfigError as e:
        _warn(bundle, f"the shim's configuration no longer loads ({e}); using the default one, with the "
                      f"shim's runtime_dir {record.runtime_dir}")
        config = load_config()
    else:
        if record.path and _digest(record.path) != record.sha256:
            _warn(bundle, f"{record.path} changed since the shim started; using it, with the shim's runtime_dir")
    if config.runtime.runtime_dir != record.runtime_dir:
        config = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime,
                                                                         runtime_dir=record.runtime_dir))
    return config


def load_for_delete(bundle: Path, record: ConfigRecord | None, why: str, annotations: dict[str, str]) -> Config:
    """The configuration the dead shim's sandbox ran with: the recorded one (load_recorded), or the file
    the pod named with io.katacontainers.config_path when the recorded one's valid_config_paths allow it,
    as the shim judged it (pykata.config.load_pod_config_file); a refused one is said on stderr.

    Raises:
        ConfigError: only from the default lookup, as `pykata.config.load_config`.
    """
    from pykata.config import load_pod_config_file
    from pykata.errors import ConfigError

    config = load_recorded(bundle, record, why)
    path = annotations.get(POD_CONFIG_ANNOTATION)
    if not path:
        return config
    try:
        return load_pod_config_file(path, config.runtime.valid_config_paths)
    except ConfigError as e:  # the shim refused it too, so the sandbox ran with the node's
        _warn(bundle, f"the pod's configuration is not used ({e})")
        return config
