"""Turn a TOML document into a validated `Config`.

Types come from the dataclass annotations in `pykata.config.schema`; every error is a `ConfigError`
whose `field` is the full dotted key (`hypervisor.qemu.default_memory`), so a user can find it.
"""

from __future__ import annotations

import dataclasses
import functools
import tomllib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, get_args, get_origin

from pykata.config.schema import ANNOTATABLE_HYPERVISOR_KEYS, Config, QemuConfig
from pykata.errors import ConfigError

T = TypeVar("T")

# Keys of `Config` that are not TOML tables the user writes.
_INTERNAL_FIELDS = frozenset({"source"})


def parse_toml(text: str, source: str | None = None) -> Config:
    """Parse configuration.toml text.

    Raises:
        ConfigError: the text is not TOML (field: the source), or a key is unknown or has a bad value
            (field: the dotted key).
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source or "<config>", f"not valid TOML: {exc}") from None
    return parse_mapping(data, source)


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
                raise ConfigError(f"{prefix}{key}", f"unknown section (known: {known})")
            raise ConfigError(f"{prefix}{key}", f"unknown key (known: {known})")
    values = {name: convert(hints[name], table[name], f"{prefix}{name}")
              for name in fields if name in table}
    return cls(**values)


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
            raise ConfigError(key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
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
# Cross-field and range checks, shared by the file parser and the annotation overrides.

_Q = "hypervisor.qemu."


def validate(config: Config) -> None:
    """Check ranges and relations between fields.

    Raises:
        ConfigError: naming the first offending key.
    """
    validate_qemu(config.qemu, _Q)
    agent = config.agent.pykata
    if agent.dial_timeout <= 0:
        raise ConfigError("agent.pykata.dial_timeout", "must be > 0 seconds")
    for i, module in enumerate(agent.kernel_modules):
        if not module or any(c.isspace() for c in module.split(" ", 1)[0]):
            raise ConfigError(f"agent.pykata.kernel_modules[{i}]", f"bad module spec {module!r}")
    runtime = config.runtime
    _absolute("runtime.runtime_dir", runtime.runtime_dir, allow_empty=False)
    _absolute("runtime.cache_dir", runtime.cache_dir, allow_empty=False)
    _absolute("factory.template_path", config.factory.template_path, allow_empty=False)


def validate_qemu(q: QemuConfig, prefix: str) -> None:
    """Range checks of `[hypervisor.qemu]`; `prefix` is prepended to key names in errors.

    Raises:
        ConfigError: naming the first offending key.
    """
    _absolute(prefix + "path", q.path, allow_empty=False)
    for name in ("kernel", "initrd", "image"):
        _absolute(prefix + name, getattr(q, name), allow_empty=True)
    _absolute(prefix + "virtio_fs_daemon", q.virtio_fs_daemon, allow_empty=q.shared_fs != "virtio-fs")
    if q.initrd and q.image:
        raise ConfigError(prefix + "image", "set either initrd or image, not both")
    if q.default_vcpus < 1:
        raise ConfigError(prefix + "default_vcpus", f"must be >= 1, got {q.default_vcpus}")
    if q.default_maxvcpus < 0:
        raise ConfigError(prefix + "default_maxvcpus",
                          f"must be >= 0 (0: host CPUs), got {q.default_maxvcpus}")
    if q.default_maxvcpus > 255:
        raise ConfigError(prefix + "default_maxvcpus", f"must be <= 255, got {q.default_maxvcpus}")
    if q.default_maxvcpus and q.default_vcpus > q.default_maxvcpus:
        raise ConfigError(prefix + "default_vcpus",
                          f"{q.default_vcpus} is more than default_maxvcpus ({q.default_maxvcpus})")
    if q.default_memory < 64:
        raise ConfigError(prefix + "default_memory", f"must be >= 64 (MiB), got {q.default_memory}")
    if q.default_maxmemory < 0:
        raise ConfigError(prefix + "default_maxmemory",
                          f"must be >= 0 (MiB; 0: host memory), got {q.default_maxmemory}")
    if q.default_maxmemory and q.default_maxmemory < q.default_memory:
        raise ConfigError(prefix + "default_maxmemory",
                          f"{q.default_maxmemory} is less than default_memory ({q.default_memory})")
    if not 0 <= q.memory_slots <= 256:
        raise ConfigError(prefix + "memory_slots", f"must be 0..256, got {q.memory_slots}")
    size = q.virtio_fs_queue_size
    if size < 64 or size > 1024 or size & (size - 1):
        raise ConfigError(prefix + "virtio_fs_queue_size", f"must be a power of two in 64..1024, got {size}")
    if any(ord(c) < 32 for c in q.kernel_params):
        raise ConfigError(prefix + "kernel_params", "must not contain control characters")
    if q.cpu_model and not all(c.isalnum() or c in "-_.,=+" for c in q.cpu_model):
        raise ConfigError(prefix + "cpu_model", f"bad CPU model {q.cpu_model!r}")
    if q.kvm_probe_timeout <= 0:
        raise ConfigError(prefix + "kvm_probe_timeout", "must be > 0 seconds")
    if q.boot_timeout <= 0:
        raise ConfigError(prefix + "boot_timeout", "must be > 0 seconds")
    if not 4 <= q.console_log_max_kib <= 1 << 20:
        raise ConfigError(prefix + "console_log_max_kib", f"must be 4..1048576 (KiB), got {q.console_log_max_kib}")
    if not 1 <= q.jail_uid_base <= 0xFFFF_FFFE:
        raise ConfigError(prefix + "jail_uid_base", f"must be 1..4294967294, got {q.jail_uid_base}")
    if q.jail_uid_count < 1 or q.jail_uid_base + q.jail_uid_count > 0xFFFF_FFFF:
        raise ConfigError(prefix + "jail_uid_count",
                          f"must be >= 1 with jail_uid_base + jail_uid_count <= 4294967295, got {q.jail_uid_count}")
    for i, name in enumerate(q.enable_annotations):
        if name not in ANNOTATABLE_HYPERVISOR_KEYS:
            raise ConfigError(f"{prefix}enable_annotations[{i}]",
                              f"{name!r} cannot be set by annotation (allowed: "
                              f"{', '.join(ANNOTATABLE_HYPERVISOR_KEYS)})")
    for i, arg in enumerate(q.virtio_fs_extra_args):
        if not arg or "\0" in arg:
            raise ConfigError(f"{prefix}virtio_fs_extra_args[{i}]", f"bad argument {arg!r}")


def _absolute(key: str, value: str, *, allow_empty: bool) -> None:
    if not value:
        if allow_empty:
            return
        raise ConfigError(key, "must not be empty")
    if not value.startswith("/"):
        raise ConfigError(key, f"must be an absolute path, got {value!r}")
    if "\0" in value or "\n" in value:
        raise ConfigError(key, "must not contain NUL or newline")
