"""Plain (session-less) ttrpc clients reconnecting quickly to the agent's virtio-serial port: how many
calls get no answer (not a test: a measurement, ~1 minute of a VM under TCG).

    .venv/bin/python tests/agent/repro_port_reconnects.py [N] [plain|session]

Boots tests/agent/test_agent_vm.py's guest, then N times: connect, one Health.Check (3 s), close, wait
0-30 ms. `session` sends a session hello first but, unlike Agent.connect, never a second one. Measured
(2026-11-30, load 13-22, N=150): with the agent closing and reopening its port after each host, 17 lost
(plain), 10 (session); the port kept open, 2; with the end of file's grace also counted in looks, 0 and 1
in two runs. Every pykata client (Agent.connect) re-sends its hello when a probe times out, so a loss
costs it ~1 s; a plain client waits for its own timeout.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from pykata.protocols.agent import HEALTH_SERVICE, agent_pb2
from pykata.ttrpc import RpcError, connect_unix
from tests.agent.test_agent_vm import _connect, _vm
from tests.guest_assets import guest_initrd_path, guest_kernel_path


async def main(n: int, session: bool) -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        share = Path(d) / "share"
        share.mkdir()
        with _vm(guest_kernel_path(), guest_initrd_path(), Path(d), share) as (sock, _log):
            await (await _connect(sock)).close()
            lost, took = 0, []
            for i in range(n):
                await asyncio.sleep(random.uniform(0, 0.03))
                client = await connect_unix(str(sock), session=session)
                started = time.monotonic()
                try:
                    await client.stub(HEALTH_SERVICE).Check(agent_pb2.CheckRequest(), timeout=3)
                    took.append(time.monotonic() - started)
                except RpcError as e:
                    lost += 1
                    print(f"#{i}: {e}", flush=True)
                finally:
                    await client.close()
            took.sort()
            print(f"session={session}: {lost} of {n} calls unanswered in 3 s; answered: median "
                  f"{1000 * took[len(took) // 2]:.0f} ms, max {1000 * took[-1]:.0f} ms; load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 150, len(sys.argv) > 2 and sys.argv[2] == "session"))
