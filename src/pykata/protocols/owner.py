"""The owner API (protos/owner/owner.proto): what a sandbox's owner process tells `pykata monitor`."""

from __future__ import annotations

from pykata.protocols.gen.owner import owner_pb2
from pykata.protocols.spec import ServiceSpec, spec_from_descriptor

__all__ = ["OWNER_SERVICE", "owner_pb2"]

# "pykata.owner.v1.Owner"
OWNER_SERVICE: ServiceSpec = spec_from_descriptor(owner_pb2.DESCRIPTOR.services_by_name["Owner"])
