"""A sandbox another process owns (a `pykata run`), reached through its agent proxy.

`pykata exec` and `pykata kill` act on a container whose VM they did not start: they attach to the
owner's `<sandbox>/agent.sock` and go through this object, never to the agent by hand.

    async with await AttachedSandbox.attach(found) as sb:
        proc = await sb.exec(cid, ["sh"], terminal=True)
"""

from __future__ import annotations

from collections.abc import Sequence

from pykata.agentapi import Agent, generic
from pykata.agentapi.replies import GuestClocks
from pykata.errors import AgentError
from pykata.protocols.agent import agent_pb2
from pykata.protocols.owner import OWNER_SERVICE, owner_pb2
from pykata.sandbox.lookup import Found
from pykata.sandbox.process import Process, exec_spec, new_exec_id, start_exec
from pykata.ttrpc import RpcError


def agent_rpcs() -> list[generic.RpcInfo]:
    """Every agent RPC and its request fields (`pykata agent-ctl --list`)."""
    return generic.catalog()


class AttachedSandbox:
    """Containers of a running sandbox owned elsewhere; `close()` leaves the sandbox running."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        self._exec_seq = 0

    @classmethod
    async def attach(cls, found: Found) -> AttachedSandbox:
        """Connect to the owner's agent proxy. Raises AgentError when it cannot be reached."""
        return cls(await Agent.attach(found.proxy_socket, found.record.id))

    async def exec(self, container_id: str, args: Sequence[str], *, env: Sequence[str] = (), cwd: str = "/",
                   uid: int = 0, gid: int = 0, terminal: bool = False, stdin: bytes = b"",
                   close_stdin: bool = False, groups: Sequence[int] = ()) -> Process:
        """Start another process in the container (`stdin` as Container.exec; `groups`: supplementary
        groups). Raises AgentError."""
        self._exec_seq += 1
        exec_id = new_exec_id(self._exec_seq)
        process = exec_spec(args, env=env, cwd=cwd, uid=uid, gid=gid, terminal=terminal, groups=groups)
        return await start_exec(self._agent, container_id, exec_id, process, stdin, close_stdin)

    async def debug_console(self, args: Sequence[str] = (), *, terminal: bool = False, term: str = "",
                            rows: int = 0, columns: int = 0) -> Process:
        """Start a process in the guest itself, outside the containers (`pykata sandbox exec`); no args:
        the guest's shell. Raises AgentError (PERMISSION_DENIED when the sandbox's console is off)."""
        self._exec_seq += 1
        exec_id = new_exec_id(self._exec_seq)
        pid = await self._agent.start_debug_console(exec_id, args, terminal=terminal, term=term, rows=rows,
                                                    columns=columns)
        return Process(self._agent, "", exec_id, pid, terminal)

    async def signal(self, container_id: str, signal: int) -> None:
        """Signal the container's init process. Raises AgentError."""
        await self._agent.signal_process(container_id, "", signal)

    async def guest_details(self) -> agent_pb2.GuestDetailsResponse:
        """The guest's kernel, agent, online CPUs and memory (checked by agentapi). Raises AgentError."""
        return await self._agent.get_guest_details()

    async def stats_container(self, container_id: str, *, timeout: float | None = 30.0
                              ) -> agent_pb2.StatsContainerResponse:
        """A container's cgroup and the guest's network counters (checked by agentapi). Raises AgentError."""
        return await self._agent.stats_container(container_id, timeout=timeout)

    async def guest_metrics(self, *, timeout: float | None = 30.0) -> agent_pb2.GuestMetrics:
        """The guest's and its agent's figures (agent GetGuestMetrics, checked by agentapi). Raises AgentError."""
        return await self._agent.get_guest_metrics(timeout=timeout)

    async def guest_clocks(self, *, timeout: float | None = 30.0) -> GuestClocks | None:
        """The guest's monotonic and coarse clocks (agentapi Agent.clocks). Raises AgentError."""
        return await self._agent.clocks(timeout=timeout)

    async def owner_metrics(self, *, timeout: float | None = 5.0) -> owner_pb2.OwnerMetrics:
        """What the sandbox's owner process (shim, CLI, SDK) counted: RPCs it served and made, events.
        Raises AgentError when the owner does not answer."""
        try:
            resp = await self._agent.ttrpc.call(OWNER_SERVICE, "Metrics", owner_pb2.OwnerMetricsRequest(),
                                                timeout=timeout)
        except RpcError as e:
            raise AgentError(f"sandbox {self._agent.sandbox_id}: owner metrics: {e}") from None
        if not isinstance(resp, owner_pb2.OwnerMetrics):
            raise AgentError(f"sandbox {self._agent.sandbox_id}: owner metrics: {type(resp).__name__}")
        return resp

    async def call_json(self, rpc: str, body: str = "{}", *, timeout: float | None = 30.0) -> str:
        """Any agent RPC with a JSON body, its reply as JSON (`pykata agent-ctl`, admins only).
        Raises agentapi.generic.RequestError (bad name or body), AgentError."""
        return await generic.call_json(self._agent, rpc, body, timeout=timeout)

    async def close(self) -> None:
        await self._agent.close()

    async def __aenter__(self) -> AttachedSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
