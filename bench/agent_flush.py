"""What a host's flush (pykata.ttrpc.session.flush_bytes: 4 MiB of 0xFF) costs a guest, and how a slow guest
never became ready when Agent.connect reconnected with a flush after each silent RECONNECT_SILENCE (not a
test: a measurement, a few minutes of a VM under TCG).

    .venv/bin/python bench/agent_flush.py [CPU_PERCENT]

Boots tests/agent/test_agent_vm.py's guest, then:
1. one session with a flush: seconds from connect to the echo's answer, and the console's
   `frame length 4294967295` warnings it cost (0xFFFFFFFF is four flush bytes read as a header);
2. QEMU in a cpu cgroup limited to CPU_PERCENT (default 10) of one core, as a node at load ~30 gives a
   guest: Agent.connect with QEMU stopped (SIGSTOP) for its first RECONNECT_SILENCE, so its first
   connection is silent, as a slow boot's is; reports whether and when the agent answered.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pykata.agentapi import Agent
from pykata.agentapi import client as agentclient
from pykata.errors import AgentError
from pykata.protocols.agent import HEALTH_SERVICE, agent_pb2
from pykata.ttrpc import connect_unix
from pykata.ttrpc.session import FLUSH_SIZE
from tests.agent.test_agent_vm import _connect, _vm
from tests.guest_assets import guest_initrd_path, guest_kernel_path

WARNING = "frame length 4294967295"


def _warnings(log: Path) -> int:
    return log.read_text(errors="replace").count(WARNING)


def _qemu_pid(sock: Path) -> int:
    out = subprocess.run(["pgrep", "-f", f"path={sock},"], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


async def main(percent: int) -> None:
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="agentchan-repro-") as d:
        share = Path(d) / "share"
        share.mkdir()
        with _vm(guest_kernel_path(), guest_initrd_path(), Path(d), share) as (sock, log):
            await (await _connect(sock)).close()
            await asyncio.sleep(0.2)
            before = _warnings(log)
            started = time.monotonic()
            c = await connect_unix(str(sock), session=True, flush=FLUSH_SIZE)
            await c.stub(HEALTH_SERVICE).Check(agent_pb2.CheckRequest(), timeout=300)
            took = time.monotonic() - started
            await c.close()
            await asyncio.sleep(0.5)
            print(f"1. one flush + hello: answered after {took:.1f} s; {_warnings(log) - before} console "
                  f"warnings; load {os.getloadavg()[0]:.1f}", flush=True)

            pid = _qemu_pid(sock)
            cg = Path(f"/sys/fs/cgroup/cpu/agentchan-repro-{os.getpid()}")
            cg.mkdir()
            try:
                (cg / "cpu.cfs_period_us").write_text("100000")
                (cg / "cpu.cfs_quota_us").write_text(str(1000 * percent))
                for tid in os.listdir(f"/proc/{pid}/task"):
                    (cg / "tasks").write_text(tid)
                before = _warnings(log)
                os.kill(pid, signal.SIGSTOP)
                loop = asyncio.get_running_loop()
                loop.call_later(agentclient.RECONNECT_SILENCE + 1, os.kill, pid, signal.SIGCONT)
                started = time.monotonic()
                try:
                    agent = await Agent.connect(sock, "repro", timeout=240)
                except AgentError as e:
                    print(f"2. at {percent}% CPU: NOT READY after {time.monotonic() - started:.1f} s ({e}); "
                          f"{_warnings(log) - before} console warnings; load {os.getloadavg()[0]:.1f}")
                else:
                    print(f"2. at {percent}% CPU: ready after {time.monotonic() - started:.1f} s; "
                          f"{_warnings(log) - before} console warnings; load {os.getloadavg()[0]:.1f}")
                    await agent.close()
            finally:
                os.kill(pid, signal.SIGCONT)
                for tid in (cg / "tasks").read_text().split():
                    Path("/sys/fs/cgroup/cpu/tasks").write_text(tid)
                cg.rmdir()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 10))
