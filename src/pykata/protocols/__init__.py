"""Wire protocols: containerd's task/events APIs and the pykata agent API, as ttrpc service specs.

    from pykata.protocols import TASK_SERVICE, AGENT_SERVICE, shim_pb2, agent_pb2

`TASK_SERVICE` / `EVENTS_SERVICE` and their message modules live in `pykata.protocols.containerd`,
`AGENT_SERVICE` / `HEALTH_SERVICE` in `pykata.protocols.agent`. They are loaded on first use, so the
guest agent (which needs only the agent API) does not pay for compiling containerd's descriptors.
Generated code is in `pykata.protocols.gen` (scripts/gen_protos.py; never edit it by hand).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pykata.protocols.spec import MethodSpec, ServiceSpec, UnknownMethodError, spec_from_descriptor

if TYPE_CHECKING:
    from pykata.protocols.agent import AGENT_SERVICE, HEALTH_SERVICE, PROTOCOL_VERSION, agent_pb2
    from pykata.protocols.containerd import (
        EVENTS_SERVICE,
        TASK_SERVICE,
        cgroups_v1_pb2,
        cgroups_v2_pb2,
        events_pb2,
        mount_pb2,
        runc_options_pb2,
        runtimeoptions_pb2,
        shim_pb2,
        task_types_pb2,
        ttrpc_events_pb2,
    )

_LAZY = {
    **dict.fromkeys(["AGENT_SERVICE", "HEALTH_SERVICE", "PROTOCOL_VERSION", "agent_pb2"],
                    "pykata.protocols.agent"),
    **dict.fromkeys(
        ["EVENTS_SERVICE", "TASK_SERVICE", "cgroups_v1_pb2", "cgroups_v2_pb2", "events_pb2", "mount_pb2",
         "runc_options_pb2", "runtimeoptions_pb2", "shim_pb2", "task_types_pb2", "ttrpc_events_pb2"],
        "pykata.protocols.containerd",
    ),
}

__all__ = [
    "AGENT_SERVICE",
    "EVENTS_SERVICE",
    "HEALTH_SERVICE",
    "PROTOCOL_VERSION",
    "TASK_SERVICE",
    "MethodSpec",
    "ServiceSpec",
    "UnknownMethodError",
    "agent_pb2",
    "cgroups_v1_pb2",
    "cgroups_v2_pb2",
    "events_pb2",
    "mount_pb2",
    "runc_options_pb2",
    "runtimeoptions_pb2",
    "shim_pb2",
    "spec_from_descriptor",
    "task_types_pb2",
    "ttrpc_events_pb2",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
