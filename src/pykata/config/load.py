"""Find and load configuration.toml.

Lookup order: `$PYKATA_CONFIG`, then /etc/pykata/configuration.toml, then the default packaged with
pykata. A pod can name another file with the annotation `io.katacontainers.config_path` from a directory
the admin listed in `runtime.valid_config_paths` (`load_pod_config_file`), and override allowed keys
with `io.katacontainers.config.*` (pykata.config.annotations).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import stat
from importlib import resources
from pathlib import Path

from pykata.config.annotations import apply_annotations
from pykata.config.parse import field_types, parse_toml
from pykata.config.schema import Config, SharedFs
from pykata.errors import ConfigError

ENV_VAR = "PYKATA_CONFIG"
SYSTEM_PATH = Path("/etc/pykata/configuration.toml")
CONFIG_PATH_ANNOTATION = "io.katacontainers.config_path"
# A pod's choice of how its files reach the guest (allowed by hypervisor.qemu.enable_annotations).
SHARED_FS_ANNOTATION = "io.katacontainers.config.hypervisor.shared_fs"
log = logging.getLogger(__name__)
# A configuration file is small; a bigger one is a mistake (or an attack through the annotation).
MAX_CONFIG_BYTES = 1024 * 1024


def packaged_default_text() -> str:
    """The text of the configuration.toml shipped inside the pykata package."""
    return resources.files("pykata.config").joinpath("configuration.toml").read_text(encoding="utf-8")


def find_config_path(environ: dict[str, str] | None = None) -> Path | None:
    """The file `load_config` would read: `$PYKATA_CONFIG`, else /etc/pykata, else None (packaged)."""
    env = os.environ if environ is None else environ
    if env.get(ENV_VAR):
        return Path(env[ENV_VAR])
    if SYSTEM_PATH.is_file():
        return SYSTEM_PATH
    return None


def load_config(environ: dict[str, str] | None = None) -> Config:
    """Load the configuration from the first place of the lookup order.

    Raises:
        ConfigError: the file named by $PYKATA_CONFIG is missing/unreadable, or any value is bad.
    """
    path = find_config_path(environ)
    if path is None:
        return parse_toml(packaged_default_text(), source="<packaged default>")
    key = ENV_VAR if path != SYSTEM_PATH else str(SYSTEM_PATH)
    return load_config_file(path, field=key)


def load_config_file(path: str | os.PathLike[str], *, field: str | None = None) -> Config:
    """Load one given configuration file (e.g. from `io.katacontainers.config_path`).

    Raises:
        ConfigError: the file cannot be read, is too big, is not TOML, or holds a bad value. `field` (default:
            the path) names where the path came from when the file itself is the problem.
    """
    p = Path(path)
    where = field or str(p)
    if not p.is_absolute():
        raise ConfigError(where, f"configuration path must be absolute, got {str(p)!r}")
    try:
        with p.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(where, f"cannot read {p}: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(where, f"{p} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(where, f"{p} is not UTF-8 text") from None
    return parse_toml(text, source=str(p))


def load_pod_config_file(path: str, allowed_dirs: tuple[str, ...]) -> Config:
    """Load the file a pod names with `io.katacontainers.config_path`, as the admin allowed it.

    A pod author can make files appear on the node (an image layer unpacked by containerd, an
    emptyDir), so the file is accepted only when: the admin lists directories in
    `runtime.valid_config_paths`; the path, with its directories' symlinks resolved, lies in one of
    them; the file itself is not a symlink (O_NOFOLLOW), is a regular file (O_NONBLOCK: a FIFO cannot
    block the shim's event loop on open), owned by root and not writable by group or others, in a
    directory that is as well; and it is at most MAX_CONFIG_BYTES. An error never quotes the file:
    a TOML error in /etc/shadow would otherwise show its text (the details go to the log, which only
    the admin reads).

    Raises:
        ConfigError: field `io.katacontainers.config_path`, for any of the above.
    """
    field = CONFIG_PATH_ANNOTATION
    if not allowed_dirs:
        raise ConfigError(field, "not allowed: the configuration lists no directory in "
                                 "runtime.valid_config_paths")
    if not path.startswith("/") or "\0" in path or len(path) > 4096:
        raise ConfigError(field, "must be an absolute path")
    directory, name = os.path.split(path)
    if name in ("", ".", ".."):
        raise ConfigError(field, "must name a file")
    real_dir = os.path.realpath(directory or "/")
    if not any(_inside(real_dir, os.path.realpath(d)) for d in allowed_dirs):
        raise ConfigError(field, f"{path[:256]!r} is not in a directory listed in runtime.valid_config_paths "
                                 f"({', '.join(allowed_dirs)})")
    data = _read_trusted_file(real_dir, name, field)
    try:
        text = data.decode("utf-8")
        return parse_toml(text, source=os.path.join(real_dir, name))
    except (UnicodeDecodeError, ConfigError) as exc:
        # The detail may quote the file (a key, a value, a line and column): only the admin's log sees it;
        # the pod learns which key, when it is one of pykata's (not one the file made up).
        log.warning("%s=%s: %s", field, os.path.join(real_dir, name), exc)
        key = exc.field if isinstance(exc, ConfigError) and _is_schema_key(exc.field) else None
        raise ConfigError(field, f"{path[:256]!r} is not a valid pykata configuration"
                                 f"{f' (bad {key})' if key else ''}; details in the runtime's log") from None


def _is_schema_key(key: str) -> bool:
    """Whether `key` ("hypervisor.qemu.default_memory", "…enable_annotations[0]") names a key of Config."""
    cls: object = Config
    for part in re.sub(r"\[\d{1,3}\]$", "", key).split("."):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields or part == "source":
            return False
        cls = field_types(cls)[part]
    return True


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _read_trusted_file(directory: str, name: str, field: str) -> bytes:
    """The bytes of `directory`/`name` if both are root's and only root can write them."""
    flags = os.O_RDONLY | os.O_CLOEXEC
    try:
        dir_fd = os.open(directory, flags | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ConfigError(field, f"cannot open {directory}: {exc.strerror}") from None
    try:
        # a directory on the way swapped for a symlink after realpath() would land elsewhere
        if os.readlink(f"/proc/self/fd/{dir_fd}") != directory:
            raise ConfigError(field, f"{directory} changed while it was opened")
        _check_owner(os.fstat(dir_fd), directory, field)
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY, dir_fd=dir_fd)
        except OSError as exc:
            why = "is a symlink" if exc.errno == errno.ELOOP else f"cannot be opened: {exc.strerror}"
            raise ConfigError(field, f"{os.path.join(directory, name)} {why}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(field, f"{os.path.join(directory, name)} is not a regular file")
            _check_owner(st, os.path.join(directory, name), field)
            if st.st_size > MAX_CONFIG_BYTES:
                raise ConfigError(field, f"{os.path.join(directory, name)} is larger than "
                                         f"{MAX_CONFIG_BYTES} bytes")
            data = f.read(MAX_CONFIG_BYTES + 1)
    finally:
        os.close(dir_fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(field, f"{os.path.join(directory, name)} is larger than {MAX_CONFIG_BYTES} bytes")
    return data


def _check_owner(st: os.stat_result, path: str, field: str) -> None:
    if st.st_uid != 0:
        raise ConfigError(field, f"{path} is not owned by root (uid {st.st_uid})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(field, f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})")


def load_for_annotations(annotations: dict[str, str], environ: dict[str, str] | None = None) -> Config:
    """The configuration a pod asks for: the admin's configuration (`load_config`), or the file named by
    `io.katacontainers.config_path` where the admin's `runtime.valid_config_paths` allows it
    (`load_pod_config_file`), with the pod's `io.katacontainers.config.*` overrides applied.

    A pod whose overrides change the hypervisor section boots its VM cold instead of from a VM
    template: a template is made only from the host's own configuration. Otherwise every value a pod
    picks (a memory size, a kernel parameter) would make, and keep, another template: ~10 s of boot
    for the first such pod and the template's saved guest RAM (~140 MiB, in factory.template_path,
    a tmpfs by default) for each value, which a pod spec must not be able to make the host pile up.
    A pod that names its shared file system (`SHARED_FS_ANNOTATION`) gets it: "virtio-fs" (native
    semantics for its host volumes) boots cold even where it is the configured default, which
    templated VMs replace with 9p; "virtio-9p" keeps the template (`with_shared_fs`).

    Raises:
        ConfigError: as `load_config` (the admin's file); as `load_pod_config_file`, with the annotation
            named as the field; or naming the `io.katacontainers.config.*` annotation that is unknown,
            not allowed or has a bad value.
    """
    base = load_config(environ)
    path = annotations.get(CONFIG_PATH_ANNOTATION)
    if path:
        base = load_pod_config_file(path, base.runtime.valid_config_paths)
    config = apply_annotations(base, annotations)
    if SHARED_FS_ANNOTATION in annotations:
        # the pod gets the file system it names (a template carries only 9p)
        others = dataclasses.replace(config.qemu, shared_fs=base.qemu.shared_fs)
        return with_shared_fs(config, config.qemu.shared_fs, others_changed=others != base.qemu)
    if config.qemu != base.qemu and config.factory.enable_template:
        config = dataclasses.replace(config, factory=dataclasses.replace(config.factory, enable_template=False))
    return config


def with_shared_fs(config: Config, shared_fs: SharedFs, *, others_changed: bool = False) -> Config:
    """`config` for a VM that must use `shared_fs` (a pod's annotation, `pykata run --shared-fs`).

    Templated VMs always share files over 9p (QEMU 7.2 cannot migrate or hot-plug virtio-fs into a
    microvm clone, and vhost-user needs guest RAM the daemon can map, which a clone's private copy of
    the template's memory is not), so any other choice boots the VM cold. "virtio-9p" keeps the
    template unless `others_changed` (other hypervisor keys of the pod differ from the host's).
    """
    qemu = dataclasses.replace(config.qemu, shared_fs=shared_fs)
    factory = config.factory
    if factory.enable_template and (shared_fs != "virtio-9p" or others_changed):
        factory = dataclasses.replace(factory, enable_template=False)
    return dataclasses.replace(config, factory=factory,
                               hypervisor=dataclasses.replace(config.hypervisor, qemu=qemu))
