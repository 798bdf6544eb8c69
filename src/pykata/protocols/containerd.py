"""containerd's ttrpc services and messages (compiled from containerd 1.6's own .proto files).

Module aliases name the generated modules by what they hold; the specs are what ttrpc takes.
"""

from __future__ import annotations

from pykata.protocols.gen.cgroups.stats.v1 import metrics_pb2 as cgroups_v1_pb2
from pykata.protocols.gen.cgroups.v2.stats import metrics_pb2 as cgroups_v2_pb2
from pykata.protocols.gen.containerd.api.events import task_pb2 as events_pb2
from pykata.protocols.gen.containerd.api.services.ttrpc.events.v1 import events_pb2 as ttrpc_events_pb2
from pykata.protocols.gen.containerd.api.types import mount_pb2
from pykata.protocols.gen.containerd.api.types.task import task_pb2 as task_types_pb2
from pykata.protocols.gen.containerd.pkg.runtimeoptions.v1 import api_pb2 as runtimeoptions_pb2
from pykata.protocols.gen.containerd.runtime.v2.runc.options import oci_pb2 as runc_options_pb2
from pykata.protocols.gen.containerd.runtime.v2.task import shim_pb2
from pykata.protocols.spec import ServiceSpec, spec_from_descriptor

__all__ = [
    "EVENTS_SERVICE",
    "TASK_SERVICE",
    "cgroups_v1_pb2",
    "cgroups_v2_pb2",
    "events_pb2",
    "mount_pb2",
    "runc_options_pb2",
    "runtimeoptions_pb2",
    "shim_pb2",
    "task_types_pb2",
    "ttrpc_events_pb2",
]

# "containerd.task.v2.Task": what containerd calls on every shim (runtime v2).
TASK_SERVICE: ServiceSpec = spec_from_descriptor(shim_pb2.DESCRIPTOR.services_by_name["Task"])
# "containerd.services.events.ttrpc.v1.Events": where a shim can Forward events to containerd (1.6+)
# instead of exec'ing `containerd publish`.
EVENTS_SERVICE: ServiceSpec = spec_from_descriptor(ttrpc_events_pb2.DESCRIPTOR.services_by_name["Events"])
