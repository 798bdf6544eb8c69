"""Find and load configuration.toml.

Lookup order: `$PYKATA_CONFIG`, then /etc/pykata/configuration.toml, then the default packaged with
pykata. A pod can name another file with the annotation `io.katacontainers.config_path`, and override
allowed keys with `io.katacontainers.config.*` (pykata.config.annotations).
"""

from __future__ import annotations

import dataclasses
import os
from importlib import resources
from pathlib import Path

from pykata.config.annotations import apply_annotations
from pykata.config.parse import parse_toml
from pykata.config.schema import Config
from pykata.errors import ConfigError

ENV_VAR = "PYKATA_CONFIG"
SYSTEM_PATH = Path("/etc/pykata/configuration.toml")
CONFIG_PATH_ANNOTATION = "io.katacontainers.config_path"
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


def load_for_annotations(annotations: dict[str, str], environ: dict[str, str] | None = None) -> Config:
    """The configuration a pod asks for: the file named by `io.katacontainers.config_path` (else the
    default), with the pod's `io.katacontainers.config.*` overrides applied.

    A pod whose overrides change the hypervisor section boots its VM cold instead of from a VM
    template: a template is made only from the host's own configuration. Otherwise every value a pod
    picks (a memory size, a kernel parameter) would make, and keep, another template: ~10 s of boot
    for the first such pod and the template's saved guest RAM (~140 MiB, in factory.template_path,
    a tmpfs by default) for each value, which a pod spec must not be able to make the host pile up.

    Raises:
        ConfigError: as `load_config_file`, with the annotation named as the field; or naming the
            `io.katacontainers.config.*` annotation that is unknown, not allowed or has a bad value.
    """
    path = annotations.get(CONFIG_PATH_ANNOTATION)
    base = load_config_file(path, field=CONFIG_PATH_ANNOTATION) if path else load_config(environ)
    config = apply_annotations(base, annotations)
    if config.qemu != base.qemu and config.factory.enable_template:
        config = dataclasses.replace(config, factory=dataclasses.replace(config.factory, enable_template=False))
    return config
