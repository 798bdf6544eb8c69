"""Per-pod overrides through Kata's annotations `io.katacontainers.config.*`.

Hypervisor keys are honoured only when the configuration allows them (`enable_annotations`), and never
one that chooses a host binary, file or argument (`NEVER_ANNOTATABLE_HYPERVISOR_KEYS`): a pod spec is
less trusted than the host's file. Every value is bounded by the same checks as the file's.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from pykata.config.parse import convert, field_types, validate
from pykata.config.schema import (
    ANNOTATABLE_HYPERVISOR_KEYS,
    NEVER_ANNOTATABLE_HYPERVISOR_KEYS,
    Config,
    PykataAgentConfig,
    QemuConfig,
)
from pykata.errors import ConfigError

PREFIX = "io.katacontainers.config."
HYPERVISOR_PREFIX = PREFIX + "hypervisor."
AGENT_PREFIX = PREFIX + "agent."
# Agent settings only affect the pod's own guest, so like Kata they need no allow-list.
ANNOTATABLE_AGENT_KEYS = ("debug", "dial_timeout", "kernel_modules")
# Longer values are not a configuration, they are a mistake or an attack.
MAX_VALUE_LEN = 4096
# Kata's annotation for the agent policy; a document is at most 64 KiB, base64 makes it 4/3 longer.
POLICY_ANNOTATION = AGENT_PREFIX + "policy"
MAX_POLICY_ANNOTATION_LEN = (64 << 10) * 4 // 3 + 4


def apply_annotations(config: Config, annotations: Mapping[str, str]) -> Config:
    """Return `config` with the pod's `io.katacontainers.config.*` annotations applied.

    Annotations outside `io.katacontainers.config.` are ignored (pods carry many). `kernel_params` are
    appended to the configured ones; other values replace them.

    Raises:
        ConfigError: naming the annotation, when it is unknown, not allowed by
            `hypervisor.qemu.enable_annotations`, one that is never allowed, or has a bad value.
    """
    qemu_changes: dict[str, Any] = {}
    agent_changes: dict[str, Any] = {}
    for name in sorted(annotations):
        if not name.startswith(PREFIX):
            continue
        raw = annotations[name]
        if len(name) > 256:
            raise ConfigError(name[:256] + "...", "annotation name too long")
        if name == POLICY_ANNOTATION:
            agent_changes["policy"] = _policy_value(config, name, raw)
            continue
        if not isinstance(raw, str) or len(raw) > MAX_VALUE_LEN:
            raise ConfigError(name, f"value must be a string of at most {MAX_VALUE_LEN} characters")
        if name.startswith(HYPERVISOR_PREFIX):
            key = name[len(HYPERVISOR_PREFIX):]
            qemu_changes[key] = _hypervisor_value(config.qemu, name, key, raw)
        elif name.startswith(AGENT_PREFIX):
            key = name[len(AGENT_PREFIX):]
            if key not in ANNOTATABLE_AGENT_KEYS:
                known = ", ".join(ANNOTATABLE_AGENT_KEYS)
                raise ConfigError(name, f"unknown agent annotation (known: {known})")
            agent_changes[key] = _decode(field_types(PykataAgentConfig)[key], raw, name)
        else:
            raise ConfigError(name, "unknown or unsupported annotation")
    if not qemu_changes and not agent_changes:
        return config
    qemu = dataclasses.replace(config.qemu, **qemu_changes)
    agent = dataclasses.replace(config.agent.pykata, **agent_changes)
    new = dataclasses.replace(
        config,
        hypervisor=dataclasses.replace(config.hypervisor, qemu=qemu),
        agent=dataclasses.replace(config.agent, pykata=agent),
    )
    try:
        validate(new)
    except ConfigError as exc:
        # Report the annotation that made the configuration invalid, not the file's key.
        raise ConfigError(_annotation_for(exc.field), str(exc).split(": ", 1)[-1]) from None
    return new


def _policy_value(config: Config, name: str, raw: object) -> str:
    """The agent policy a pod gives (base64 of the document), when the configuration allows it."""
    if not config.agent.pykata.enable_policy_annotation:
        raise ConfigError(name, "not allowed: set agent.pykata.enable_policy_annotation = true")
    if not isinstance(raw, str) or len(raw) > MAX_POLICY_ANNOTATION_LEN:
        raise ConfigError(name, f"value must be base64 text of at most {MAX_POLICY_ANNOTATION_LEN} characters")
    try:
        return base64.b64decode(raw.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise ConfigError(name, "must be the policy document, base64-encoded") from None


def _hypervisor_value(q: QemuConfig, name: str, key: str, raw: str) -> Any:
    if key in NEVER_ANNOTATABLE_HYPERVISOR_KEYS:
        raise ConfigError(name, "chooses host binaries, files or their arguments: never settable by annotation")
    if key not in ANNOTATABLE_HYPERVISOR_KEYS:
        raise ConfigError(name, "unknown hypervisor annotation or one that cannot be overridden")
    if key not in q.enable_annotations:
        raise ConfigError(name, f"not allowed: add {key!r} to hypervisor.qemu.enable_annotations")
    value = _decode(field_types(QemuConfig)[key], raw, name)
    if key == "kernel_params":
        value = f"{q.kernel_params} {value}".strip()
    return value


def _decode(hint: Any, raw: str, name: str) -> Any:
    """Annotation values are strings; turn them into the schema's type."""
    if hint is bool:
        lowered = raw.strip().lower()
        if lowered not in ("true", "false", "1", "0"):
            raise ConfigError(name, f"must be true or false, got {_show(raw)}")
        return lowered in ("true", "1")
    if hint is int:
        try:
            return int(raw.strip(), 10)
        except ValueError:
            raise ConfigError(name, f"must be an integer, got {_show(raw)}") from None
    if hint is float:
        try:
            return float(raw.strip())
        except ValueError:
            raise ConfigError(name, f"must be a number, got {_show(raw)}") from None
    value: object = raw
    if getattr(hint, "__origin__", None) is tuple:
        # Kata passes lists as JSON arrays: ["--thread-pool-size=1"].
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):
            raise ConfigError(name, f"must be a JSON list of strings, got {_show(raw)}") from None
    return convert(hint, value, name)


def _show(raw: str) -> str:
    """A value for an error message: an annotation may be 4 KiB, a log line should not."""
    return repr(raw) if len(raw) <= 64 else repr(raw[:64]) + "..."


def _annotation_for(field: str) -> str:
    for section, prefix in (("hypervisor.qemu.", HYPERVISOR_PREFIX), ("agent.pykata.", AGENT_PREFIX)):
        if field.startswith(section):
            return prefix + field[len(section):]
    return field
