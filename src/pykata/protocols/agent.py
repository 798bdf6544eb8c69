"""The pykata agent API (protos/agent/agent.proto): host <-> pykata-agent in the guest."""

from __future__ import annotations

from pykata.protocols.gen.agent import agent_pb2
from pykata.protocols.spec import ServiceSpec, spec_from_descriptor

__all__ = ["AGENT_SERVICE", "HEALTH_SERVICE", "LAZY_SHARE_PROTOCOL_VERSION", "MIN_PROTOCOL_VERSION", "PROTOCOL_VERSION",
           "agent_pb2"]

# "pykata.agent.v1.AgentService"
AGENT_SERVICE: ServiceSpec = spec_from_descriptor(agent_pb2.DESCRIPTOR.services_by_name["AgentService"])
# "pykata.agent.v1.Health"
HEALTH_SERVICE: ServiceSpec = spec_from_descriptor(agent_pb2.DESCRIPTOR.services_by_name["Health"])

# What the agent answers in Health.Version().protocol_version. Bump it whenever agent.proto gains an
# RPC or a field a host may rely on, so a newer host can tell an older guest image apart.
PROTOCOL_VERSION = 10  # 5: DiskFile RPCs; 6: ExecProcess stdin/close_stdin, WaitProcess output_limit;
# 7: WaitProcess output_wait_ms; 8: a session hello on virtio-serial (pykata.ttrpc.session; an agent
# without it is refused there at the hello, before any RPC); 9: SyncVolume (a volume copied into the guest);
# 10: a CreateContainer storage of the shared directory itself is the sandbox's (mounted once, kept until
# DestroySandbox), so the host defers the share's mount to the first container that needs it
# The oldest agent a host works with: 2 brought ReseedRandomDev (clones must not share randomness) and
# SetPolicy (a configured policy must be enforced), which have no fallback. What came later has one
# (pykata.agentapi.Agent answers UNIMPLEMENTED itself for an RPC newer than the agent, and the callers
# already fall back on that: GetGuestMetrics 3, WarmUp 4, DiskFile 5; 6's fields are left unsent).
MIN_PROTOCOL_VERSION = 2
# The first agent protocol that echoes a session hello (Agent.connect needs it on virtio-serial).
SESSION_PROTOCOL_VERSION = 8
# The first agent protocol that keeps the shared directory mounted by a CreateContainer for the sandbox.
LAZY_SHARE_PROTOCOL_VERSION = 10
