"""pykata's configuration: configuration.toml as typed frozen dataclasses, plus pod annotation overrides.

    config = load_config()                       # $PYKATA_CONFIG, /etc/pykata, or the packaged default
    config = apply_annotations(config, pod_annotations)
    config.qemu.default_memory                   # MiB
"""

from pykata.config.annotations import apply_annotations
from pykata.config.load import (
    CONFIG_PATH_ANNOTATION,
    ENV_VAR,
    SHARED_FS_ANNOTATION,
    SYSTEM_PATH,
    find_config_path,
    load_config,
    load_config_file,
    load_for_annotations,
    load_pod_config_file,
    packaged_default_text,
    with_shared_fs,
)
from pykata.config.parse import parse_mapping, parse_toml
from pykata.config.schema import (
    AgentSection,
    Config,
    FactoryConfig,
    HypervisorSection,
    ImageSection,
    PykataAgentConfig,
    QemuConfig,
    RuntimeConfig,
)

__all__ = [
    "CONFIG_PATH_ANNOTATION",
    "ENV_VAR",
    "SHARED_FS_ANNOTATION",
    "SYSTEM_PATH",
    "AgentSection",
    "Config",
    "FactoryConfig",
    "HypervisorSection",
    "ImageSection",
    "PykataAgentConfig",
    "QemuConfig",
    "RuntimeConfig",
    "apply_annotations",
    "find_config_path",
    "load_config",
    "load_config_file",
    "load_for_annotations",
    "load_pod_config_file",
    "packaged_default_text",
    "parse_mapping",
    "parse_toml",
    "with_shared_fs",
]
