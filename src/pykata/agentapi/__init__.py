"""The host's typed client of the guest agent: one async method per agent RPC.

    agent = await Agent.connect(socket, sandbox_id)
    pid = await agent.create_container(cid, spec_json, terminal=False)
    status = await agent.wait_process(cid)        # an int in 0..255

`pykata.agentapi.client` is the only module that writes agent RPC names (Kata runtime-rs's
`crates/agent` shape); `pykata.agentapi.replies` checks each answer, because everything the guest
sends is untrusted. Callers above (sandbox, and through it the shim, CLI and SDK) never build agent
requests for RPCs by name.
"""

from pykata.agentapi.client import DEFAULT_TIMEOUT, Agent
from pykata.agentapi.errors import AgentCallError, AgentReplyError, AgentVersionError
from pykata.agentapi.replies import AgentVersion, Reseeded

__all__ = ["DEFAULT_TIMEOUT", "Agent", "AgentCallError", "AgentReplyError", "AgentVersion", "AgentVersionError",
           "Reseeded"]
