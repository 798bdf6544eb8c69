"""Turn a TOML document into a validated `Config`.

Types come from the dataclass annotations in `pykata.config.schema`; every error is a `ConfigError`
whose `field` is the full dotted key (`hypervisor.qemu.default_memory`), so a user can find it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, get_args, get_origin

from pykata.config.schema import (
    ANNOTATABLE_HYPERVISOR_KEYS,
    NEVER_ANNOTATABLE_HYPERVISOR_KEYS,
    Config,
    ImageSection,
    QemuConfig,
)
from pykata.errors import ConfigError

T = TypeVar("T")

# Keys of `Config` that are not TOML tables the user writes.
_INTERNAL_FIELDS = frozenset({"source"})
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


# The same text parsed again gives the same object: a pod's shim loads its file at `start`, for tracing
# and for the pod (1-3 ms each under TCG load, and garbage in the shim's heap), and the shims' fork
# server hands its children a parse of the file they load too. A Config is frozen and holds only
# immutable values (tests/config/test_parse_cache.py checks), so sharing one is safe; the file is
# still read every time, so a changed file is parsed anew.
_PARSED: dict[tuple[str, str | None], Config] = {}
_PARSED_MAX = 8


def parse_toml(text: str, source: str | None = None) -> Config:
    """Parse configuration.toml text (a text parsed before gives the same frozen object).

    Raises:
        ConfigError: the text is not TOML (field: the source), or a key is unknown or has a bad value
            (field: the dotted key).
    """
    key = (text, source)
    parsed = _PARSED.get(key)
    if parsed is not None:
        return parsed
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source or "<config>", f"not valid TOML: {exc}") from None
    parsed = parse_mapping(data, source)
    if len(_PARSED) >= _PARSED_MAX:
        _PARSED.pop(next(iter(_PARSED)))
    _PARSED[key] = parsed
    return parsed


def parse_mapping(data: Mapping[str, object], source: str | None = None) -> Config:
    """Build a `Config` from already-decoded TOML data.

    Raises:
        ConfigError: a key is unknown or a value has the wrong type or range (field: the dotted key).
    """
    config = build_section(Config, data, "")
    config = dataclasses.replace(config, source=source)
    validate(config)
    return config


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build_section(cls: type[T], table: object, prefix: str) -> T:
    """Build dataclass `cls` from TOML table `table`; `prefix` is its dotted key ("" at the top).

    Raises:
        ConfigError: see `parse_mapping`.
    """
    where = prefix.rstrip(".") or "<config>"
    if not isinstance(table, Mapping):
        raise ConfigError(where, f"must be a table, got {_kind(table)}")
    assert dataclasses.is_dataclass(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in _INTERNAL_FIELDS}
    hints = field_types(cls)
    for key in table:
        if key not in fields:
            known = ", ".join(sorted(fields))
            if all(dataclasses.is_dataclass(hints[f]) for f in fields):
                raise ConfigError(prefix + _toml_key(key), f"unknown section (known: {known})")
            raise ConfigError(prefix + _toml_key(key), f"unknown key (known: {known})")
    values = {name: convert(hints[name], table[name], f"{prefix}{name}")
              for name in fields if name in table}
    return cls(**values)


def _toml_key(key: object) -> str:
    """`key` as TOML writes it: bare when it can be, else quoted (an empty or odd key still shows), and
    never longer than a line."""
    text = str(key)
    if not _BARE_KEY.fullmatch(text):
        text = json.dumps(text[:64], ensure_ascii=True)
    return text if len(text) <= 80 else text[:77] + "..."


def convert(hint: Any, value: object, key: str) -> Any:
    """Check `value` against type `hint` and return it in the dataclass's representation.

    Raises:
        ConfigError: `value` does not fit (field: `key`).
    """
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return build_section(hint, value, f"{key}.")
    origin = get_origin(hint)
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise ConfigError(key, f"must be one of {', '.join(map(repr, choices))}, got {_kind(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, f"must be a list of strings, got {_kind(value)}")
        return tuple(value)
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported schema type {hint} for {key}")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {_kind(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {_kind(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"must be a number, got {_kind(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {_kind(value)}")
        return value
    raise TypeError(f"unsupported schema type {hint} for {key}")


def _kind(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "a table"}
    return names.get(type(value), type(value).__name__) + (f" ({value!r})" if _short(value) else "")


def _short(value: object) -> bool:
    return isinstance(value, bool | int | float | str) and len(repr(value)) <= 40


# ---------------------------------------------------------------------------------------------------------
# Cross-field and range checks, shared by the file parser and the annotation overrides. Every number has
# an upper bound too: an annotation is a pod author's input, and a VM of 2**60 MiB or a timeout of 1e308
# seconds (or nan, which no comparison refuses) is an attack or a typo, never a configuration.

_Q = "hypervisor.qemu."
MAX_VCPUS = 255
MAX_MEMORY_MIB = 1 << 20  # 1 TiB
MAX_TIMEOUT = 3600.0
MAX_PATH = 4096
MAX_KERNEL_PARAMS = 1024  # x86's whole command line is 2048 bytes, pykata's own part included
MAX_LIST = 64
MAX_LOG_SIZE_MIB = 1024
MAX_LOG_BACKUPS = 100
# virtio-mmio slots of microvm are few (and each slot costs a little at boot and restore).
MAX_ROOT_SLOTS = 16


def validate(config: Config) -> None:
    """Check ranges and relations between fields.

    Raises:
        ConfigError: naming the first offending key.
    """
    validate_qemu(config.qemu, _Q)
    agent = config.agent.pykata
    _seconds("agent.pykata.dial_timeout", agent.dial_timeout)
    _seconds("agent.pykata.request_timeout", agent.request_timeout)
    _list("agent.pykata.kernel_modules", agent.kernel_modules)
    _absolute("agent.pykata.policy_file", agent.policy_file, allow_empty=True)
    for i, module in enumerate(agent.kernel_modules):
        if not module or len(module) > 256 or any(c.isspace() for c in module.split(" ", 1)[0]) \
                or any(ord(c) < 32 for c in module):
            raise ConfigError(f"agent.pykata.kernel_modules[{i}]", f"bad module spec {module[:64]!r}")
    runtime = config.runtime
    _absolute("runtime.runtime_dir", runtime.runtime_dir, allow_empty=False)
    _absolute("runtime.cache_dir", runtime.cache_dir, allow_empty=False)
    _absolute("runtime.cgroup_root", runtime.cgroup_root, allow_empty=False)
    _list("runtime.valid_config_paths", runtime.valid_config_paths)
    for i, directory in enumerate(runtime.valid_config_paths):
        _absolute(f"runtime.valid_config_paths[{i}]", directory, allow_empty=False)
        if directory.rstrip("/") == "":
            raise ConfigError(f"runtime.valid_config_paths[{i}]", "must not be / (list the directories "
                              "that hold only configuration files)")
    _range("runtime.run_log_max_size", runtime.run_log_max_size, 1, MAX_LOG_SIZE_MIB, " (MiB)")
    _range("runtime.rootfs_upper_size", runtime.rootfs_upper_size, 0, 1 << 20, " (MiB)")
    _range("runtime.rootfs_block_slots", runtime.rootfs_block_slots, 0, MAX_ROOT_SLOTS, "")
    _range("runtime.rootfs_block_max_mib", runtime.rootfs_block_max_mib, 16, 1 << 20, " (MiB)")
    _range("runtime.rootfs_block_cache_mib", runtime.rootfs_block_cache_mib, 16, 1 << 30, " (MiB)")
    # the agent caps a request at 200,000 entries (pykata.agent.storage.MAX_PREWARM)
    _range("runtime.rootfs_prewarm", runtime.rootfs_prewarm, 0, 200_000, " (entries)")
    _range("runtime.rootfs_prewarm_min_inodes", runtime.rootfs_prewarm_min_inodes, 0, 10_000_000, " (inodes)")
    _range("runtime.data_disk_mib", runtime.data_disk_mib, 0, 4096, " (MiB)")
    _absolute("runtime.kubelet_root_dir", runtime.kubelet_root_dir, allow_empty=False)
    _range("runtime.emptydir_size", runtime.emptydir_size, 0, 1 << 20, " (MiB)")
    _range("runtime.watchable_max_files", runtime.watchable_max_files, 0, 1024, " (files)")
    # the whole tree goes to the agent in one message (pykata.agent.volumesync.MAX_BYTES: 3 MiB)
    _range("runtime.watchable_max_kib", runtime.watchable_max_kib, 1, 3072, " (KiB)")
    _range("runtime.run_log_backups", runtime.run_log_backups, 0, MAX_LOG_BACKUPS, "")
    _absolute("runtime.tracing_file", runtime.tracing_file, allow_empty=True)
    if runtime.tracing_endpoint and not runtime.tracing_endpoint.startswith(("http://", "https://")):
        raise ConfigError("runtime.tracing_endpoint", "must be an http:// or https:// URL (OTLP over HTTP)")
    if runtime.enable_tracing and bool(runtime.tracing_endpoint) == bool(runtime.tracing_file):
        raise ConfigError("runtime.enable_tracing", "set exactly one of runtime.tracing_endpoint (OTLP over "
                          "HTTP) and runtime.tracing_file (JSON lines)")
    _absolute("factory.template_path", config.factory.template_path, allow_empty=False)
    _range("factory.pool_size", config.factory.pool_size, 0, 64, "")
    _range("factory.pool_nics", config.factory.pool_nics, 0, 1, "")
    _range("factory.pool_min_free_mib", config.factory.pool_min_free_mib, 0, 1 << 24, " (MiB)")
    validate_image(config.image)


# Upper bounds keep a typo (or a unit mix-up) from turning a cap off.
_IMAGE_RANGES = {
    "max_layers": (1, 1000),
    "max_unpacked_mib": (1, 1 << 20),
    "max_entries": (1, 10_000_000),
    "max_pax_header_bytes": (512, 64 << 20),
    "max_path_length": (256, 65536),
    "min_free_mib": (0, 1 << 20),
}


def validate_image(image: ImageSection) -> None:
    """Range checks of `[image]`.

    Raises:
        ConfigError: naming the first offending key.
    """
    for name, (low, high) in _IMAGE_RANGES.items():
        _range(f"image.{name}", getattr(image, name), low, high, "")


def validate_qemu(q: QemuConfig, prefix: str) -> None:
    """Range checks of `[hypervisor.qemu]`; `prefix` is prepended to key names in errors.

    Raises:
        ConfigError: naming the first offending key.
    """
    _absolute(prefix + "path", q.path, allow_empty=False)
    for name in ("kernel", "initrd", "image"):
        _absolute(prefix + name, getattr(q, name), allow_empty=True)
    _absolute(prefix + "virtio_fs_daemon", q.virtio_fs_daemon, allow_empty=q.shared_fs != "virtio-fs")
    _absolute(prefix + "entropy_source", q.entropy_source, allow_empty=False)
    if q.initrd and q.image:
        raise ConfigError(prefix + "image", "set either initrd or image, not both")
    _range(prefix + "default_vcpus", q.default_vcpus, 1, MAX_VCPUS, "")
    _range(prefix + "default_maxvcpus", q.default_maxvcpus, 0, MAX_VCPUS, " (0: host CPUs)")
    if q.default_maxvcpus and q.default_vcpus > q.default_maxvcpus:
        raise ConfigError(prefix + "default_vcpus",
                          f"{q.default_vcpus} is more than default_maxvcpus ({q.default_maxvcpus})")
    _range(prefix + "default_memory", q.default_memory, 64, MAX_MEMORY_MIB, " (MiB)")
    _range(prefix + "default_maxmemory", q.default_maxmemory, 0, MAX_MEMORY_MIB, " (MiB; 0: host memory)")
    if q.default_maxmemory and q.default_maxmemory < q.default_memory:
        raise ConfigError(prefix + "default_maxmemory",
                          f"{q.default_maxmemory} is less than default_memory ({q.default_memory})")
    _range(prefix + "memory_slots", q.memory_slots, 0, 256, "")
    size = q.virtio_fs_queue_size
    if size < 64 or size > 1024 or size & (size - 1):
        raise ConfigError(prefix + "virtio_fs_queue_size", f"must be a power of two in 64..1024, got {size}")
    if len(q.kernel_params) > MAX_KERNEL_PARAMS:
        raise ConfigError(prefix + "kernel_params", f"must be at most {MAX_KERNEL_PARAMS} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in q.kernel_params):
        raise ConfigError(prefix + "kernel_params", "must not contain control characters")
    if len(q.cpu_model) > 128 or (q.cpu_model and not all(c.isascii() and (c.isalnum() or c in "-_.,=+")
                                                          for c in q.cpu_model)):
        raise ConfigError(prefix + "cpu_model", f"bad CPU model {q.cpu_model[:64]!r}")
    _seconds(prefix + "kvm_probe_timeout", q.kvm_probe_timeout)
    _seconds(prefix + "boot_timeout", q.boot_timeout)
    if q.tcg_tb_size and not 1 <= q.tcg_tb_size <= 4096:
        raise ConfigError(prefix + "tcg_tb_size", f"must be 0 (QEMU's default) or 1..4096 (MiB), got {q.tcg_tb_size}")
    if not 4 <= q.console_log_max_kib <= 1 << 20:
        raise ConfigError(prefix + "console_log_max_kib", f"must be 4..1048576 (KiB), got {q.console_log_max_kib}")
    if not 1 <= q.jail_uid_base <= 0xFFFF_FFFE:
        raise ConfigError(prefix + "jail_uid_base", f"must be 1..4294967294, got {q.jail_uid_base}")
    if q.jail_uid_count < 1 or q.jail_uid_base + q.jail_uid_count > 0xFFFF_FFFF:
        raise ConfigError(prefix + "jail_uid_count",
                          f"must be >= 1 with jail_uid_base + jail_uid_count <= 4294967295, got {q.jail_uid_count}")
    _list(prefix + "enable_annotations", q.enable_annotations)
    for i, name in enumerate(q.enable_annotations):
        if name in NEVER_ANNOTATABLE_HYPERVISOR_KEYS:
            raise ConfigError(f"{prefix}enable_annotations[{i}]",
                              f"{name!r} chooses host binaries, files or their arguments: it is never "
                              "settable by annotation (set it in this file instead)")
        if name not in ANNOTATABLE_HYPERVISOR_KEYS:
            raise ConfigError(f"{prefix}enable_annotations[{i}]",
                              f"{name[:64]!r} cannot be set by annotation (allowed: "
                              f"{', '.join(ANNOTATABLE_HYPERVISOR_KEYS)})")
    _list(prefix + "virtio_fs_extra_args", q.virtio_fs_extra_args)
    for i, arg in enumerate(q.virtio_fs_extra_args):
        if not arg or "\0" in arg or len(arg) > MAX_PATH:
            raise ConfigError(f"{prefix}virtio_fs_extra_args[{i}]", f"bad argument {arg[:64]!r}")


def _range(key: str, value: int, low: int, high: int, unit: str) -> None:
    if not low <= value <= high:
        raise ConfigError(key, f"must be {low}..{high}{unit}, got {value}")


def _seconds(key: str, value: float) -> None:
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT):
        raise ConfigError(key, f"must be > 0 and <= {MAX_TIMEOUT:g} seconds, got {value}")


def _list(key: str, value: tuple[str, ...]) -> None:
    if len(value) > MAX_LIST:
        raise ConfigError(key, f"must have at most {MAX_LIST} items, got {len(value)}")


def _absolute(key: str, value: str, *, allow_empty: bool) -> None:
    if not value:
        if allow_empty:
            return
        raise ConfigError(key, "must not be empty")
    if not value.startswith("/"):
        raise ConfigError(key, f"must be an absolute path, got {value[:64]!r}")
    if "\0" in value or "\n" in value:
        raise ConfigError(key, "must not contain NUL or newline")
    if len(value) > MAX_PATH:
        raise ConfigError(key, f"must be at most {MAX_PATH} characters")
