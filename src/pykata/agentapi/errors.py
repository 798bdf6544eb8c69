"""Errors of the agent client: a call that failed, and an answer that broke the contract."""

from __future__ import annotations

# guest_text and MAX_GUEST_TEXT live in pykata.errors (the hypervisor quotes the guest's console too)
from pykata.errors import MAX_GUEST_TEXT as MAX_GUEST_TEXT
from pykata.errors import AgentError
from pykata.errors import guest_text as guest_text
from pykata.ttrpc import Code


class AgentCallError(AgentError):
    """An agent RPC failed; carries the status code, the RPC and the sandbox. `message` is the
    agent's, bounded and escaped (guest_text)."""

    def __init__(self, sandbox_id: str, rpc: str, code: Code, message: str) -> None:
        message = guest_text(message)
        super().__init__(f"sandbox {sandbox_id}: agent {rpc}: {code.name}: {message}")
        self.sandbox_id, self.rpc, self.code, self.message = sandbox_id, rpc, code, message


class AgentReplyError(AgentCallError):
    """The agent answered with something out of its contract (a pid of 0, an exit status of 300, more
    bytes than asked for): the guest is broken or hostile. Code DATA_LOSS; `field` names the field."""

    def __init__(self, sandbox_id: str, rpc: str, field: str, message: str) -> None:
        super().__init__(sandbox_id, rpc, Code.DATA_LOSS, f"bad reply: {field}: {message}")
        self.field = field


class AgentVersionError(AgentError):
    """The guest's agent speaks an older protocol than this host needs (a guest image built from older
    pykata code, or an agent that says so): the sandbox cannot be used."""

    def __init__(self, sandbox_id: str, agent_protocol: int, agent_version: str, needed: int, host: int) -> None:
        super().__init__(
            f"sandbox {sandbox_id}: the guest's agent speaks protocol {agent_protocol} (pykata {agent_version!r}); "
            f"this host speaks {host} and needs at least {needed}: rebuild the guest image "
            "(`pykata image build`) and the template (`pykata factory init`)")
        self.sandbox_id, self.agent_protocol, self.needed = sandbox_id, agent_protocol, needed


class GuestTickError(AgentError):
    """The guest has no timer tick: its agent answers, but every sleep, timeout and timer in it would
    wait forever. Seen when a boot's APIC timer calibration was stalled by the host ("APIC frequency too
    slow"); a template made from such a boot would pass it on to every clone."""

    def __init__(self, sandbox_id: str, tick_clock_ns: int, stalled_ns: int) -> None:
        super().__init__(
            f"sandbox {sandbox_id}: the guest has no timer tick (its tick clock stood still at "
            f"{tick_clock_ns / 1e9:.2f} s while its monotonic clock went on by {stalled_ns / 1e9:.2f} s): "
            "sleeps and timeouts in it would never end; see the guest's console log for its APIC timer")
        self.sandbox_id = sandbox_id
