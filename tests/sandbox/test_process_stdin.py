"""Process.write_stdin against fake agents (no VM: only the host's side of WriteStdin is tested; the
same attack by a real guest is in tests/security/test_hostile_agent.py, the `trickle` cell).

An agent that takes part of a chunk honestly does so only when stdin closed or the process ended: the
resend of the rest then fails with its error. A hostile one that takes one byte per answer made the host
send the whole rest again per byte (a 64 KiB chunk: 2 GiB copied and sent); it is cut off at the resend.
"""

from __future__ import annotations

import asyncio

import pytest

from pykata.agentapi import AgentReplyError
from pykata.errors import FailedPrecondition
from pykata.sandbox.process import READ_CHUNK, Process


class FakeTrickleAgent:
    """A fake agent that takes `per_answer` bytes of each WriteStdin, and counts what it was sent."""

    sandbox_id = "sb-fake"

    def __init__(self, per_answer: int = 1) -> None:
        self.per_answer = per_answer
        self.sent = 0
        self.calls = 0

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        self.calls += 1
        self.sent += len(data)
        return min(len(data), self.per_answer)


class FakeClosingAgent(FakeTrickleAgent):
    """A fake honest agent whose process closes its stdin after `keep` bytes: the first write is taken
    in part, the next fails as the real agent's does."""

    def __init__(self, keep: int) -> None:
        super().__init__()
        self.keep = keep
        self.taken = 0

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        self.calls += 1
        self.sent += len(data)
        if self.taken >= self.keep:
            raise FailedPrecondition("the process closed its stdin")
        n = min(len(data), self.keep - self.taken)
        self.taken += n
        return n


@pytest.mark.parametrize("size", [64 << 10, 3 * READ_CHUNK + 5])
def test_a_piecemeal_acker_is_cut_off(size: int) -> None:
    agent = FakeTrickleAgent()
    proc = Process(agent, "c1", "e1", 7, False)  # type: ignore[arg-type]
    with pytest.raises(AgentReplyError, match=r"WriteStdin.*bad reply: length: .*piecemeal") as err:
        asyncio.run(proc.write_stdin(b"x" * size))
    assert err.value.rpc == "WriteStdin"
    # at most each byte twice (a chunk and its one resend), never a chunk per byte
    assert agent.sent <= 2 * size and agent.calls <= 8, (agent.sent, agent.calls)


def test_an_honest_partial_take_ends_with_the_agents_error() -> None:
    agent = FakeClosingAgent(keep=1000)
    proc = Process(agent, "c1", "e1", 7, False)  # type: ignore[arg-type]
    with pytest.raises(FailedPrecondition, match="closed its stdin"):
        asyncio.run(proc.write_stdin(b"x" * 5000))
    assert agent.calls == 2 and agent.sent == 5000 + 4000


def test_whole_takes_send_each_byte_once() -> None:
    agent = FakeTrickleAgent(per_answer=READ_CHUNK)
    proc = Process(agent, "c1", "e1", 7, False)  # type: ignore[arg-type]
    asyncio.run(proc.write_stdin(b"y" * (2 * READ_CHUNK + 3)))
    assert agent.sent == 2 * READ_CHUNK + 3 and agent.calls == 3


class FakeFloodAgent:
    """A fake agent whose every stream has output at once: each read is answered, after a yield, with
    as much as it asked for; records what each read asked."""

    sandbox_id = "sb-fake"

    def __init__(self) -> None:
        self.asked: list[int] = []

    async def read_stdout(self, container_id: str, exec_id: str, max_length: int) -> bytes:
        self.asked.append(max_length)
        await asyncio.sleep(0)
        return b"z" * max_length

    read_stderr = read_stdout


def test_a_pods_output_reads_share_one_budget() -> None:
    """Fairness between one pod's streams: each output read to one agent asks for an equal share of
    POD_READ_BUDGET among the reads in flight (at least MIN_READ), so whatever the number of flooding
    streams, the answers queued on the agent's channel ahead of a new stream's (or of an exec's start)
    stay about that budget, where each read asked READ_CHUNK (12 streams: 12 MiB); one or two streams
    still read READ_CHUNK at a time."""
    from pykata.sandbox.process import MIN_READ, POD_READ_BUDGET

    async def flood(streams: int) -> FakeFloodAgent:
        agent = FakeFloodAgent()
        procs = [Process(agent, "c1", f"e{i}", 7, False) for i in range(streams)]  # type: ignore[arg-type]

        async def pump(p: Process) -> None:  # as the shim's: the next read once the last one answered
            for _ in range(4):
                await p.read("stdout")

        await asyncio.gather(*(pump(p) for p in procs))
        return agent

    for streams in (1, 2):
        assert set(asyncio.run(flood(streams)).asked) == {READ_CHUNK}
    for streams in (6, 12, 40):
        asked = asyncio.run(flood(streams)).asked
        steady = asked[streams:-streams]  # after every stream's first read, before the last ones end
        assert steady and set(steady) == {max(MIN_READ, POD_READ_BUDGET // streams)}, (streams, steady[:3])
        assert sum(steady[:streams]) <= max(POD_READ_BUDGET, streams * MIN_READ)
