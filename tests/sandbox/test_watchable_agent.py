"""Copied volumes (pykata.resources.watchable) against an agent that will not copy them: a FAKE agent
(this is a unit test of the error paths; tests/cri/test_watchable.py runs the real one) refuses
SyncVolume, answers out of contract, or says yes and does nothing. What the host believes of it never
reaches the host: the volume is shared from the host as before the feature, the pod goes on, the
host directory is untouched, and the watch keeps going."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest

from pykata.agentapi.errors import AgentCallError, AgentReplyError
from pykata.config import Config, parse_toml
from pykata.resources import emptydir, watchable
from pykata.sandbox.sandbox import Sandbox
from pykata.ttrpc import Code
from tests.kubeletvolume import write_volume

UID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"


class FakeAgent:
    """FAKE: stands in for a hostile guest's agent; records what SyncVolume was sent."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.calls = 0

    async def sync_volume(self, name: str, size: int, entries: Any, *, timeout: float | None = None) -> None:
        self.calls += 1
        if self.mode == "refuse":
            raise AgentCallError("sb", "SyncVolume", Code.INTERNAL, "no")
        if self.mode == "outofcontract":
            raise AgentReplyError("sb", "SyncVolume", "(message)", "Interfaces, not Empty")
        # "lie": success, nothing done


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        h.update(f"{p.relative_to(root)} {st.st_mode} {st.st_size} {st.st_mtime_ns} {st.st_ino}\n".encode())
    return h.hexdigest()


def _spec(source: Path) -> dict[str, Any]:
    return {"annotations": {"io.kubernetes.cri.sandbox-uid": UID},
            "mounts": [{"destination": "/etc/cfg", "type": "bind", "source": str(source), "options": ["rbind", "ro"]}]}


@pytest.mark.parametrize("mode", ["refuse", "outofcontract", "lie"])
async def test_a_guest_that_will_not_copy_a_volume_changes_nothing_on_the_host(tmp_path: Path, mode: str) -> None:
    kubelet = tmp_path / "kubelet"
    config: Config = parse_toml(f'[runtime]\nkubelet_root_dir = "{kubelet}"\nruntime_dir = "{tmp_path / "run"}"\n')
    source = kubelet / "pods" / UID / "volumes" / "kubernetes.io~secret" / "token"
    write_volume(source, {"token": b"secret\n"})
    before = _tree_digest(kubelet)
    sb = Sandbox("sb", config, tmp_path / "sb")
    sb.pod_uid = UID
    agent = FakeAgent(mode)
    sb._agent = agent  # type: ignore[assignment]
    try:
        found = await sb._watched_volumes("c1", _spec(source))
        assert agent.calls == 1
        if mode == "lie":
            # believed: the containers bind the guest's copy (in the guest: nothing of the host's)
            assert found == {0: f"{emptydir.GUEST_POD_VOLUME_DIR}/token"} and sb.watched["token"] is not None
            assert _tree_digest(kubelet) == before
            # the watch goes on: kubelet's next update is sent again, whatever the guest did with it
            write_volume(source, {"token": b"rotated\n"})
            for _ in range(100):
                if agent.calls >= 2:
                    break
                await asyncio.sleep(0.05)
            assert agent.calls >= 2
        else:
            # refused: shared from the host for the whole pod, as before the feature, and not asked again
            assert found == {} and sb.watched == {"token": None}
            assert await sb._watched_volumes("c2", _spec(source)) == {} and agent.calls == 1
            assert _tree_digest(kubelet) == before
    finally:
        if sb._watch_task is not None:
            sb._watch_task.cancel()
            await asyncio.gather(sb._watch_task, return_exceptions=True)
        if sb._root_watch is not None:
            asyncio.get_running_loop().remove_reader(sb._root_watch.fd)
            sb._root_watch.close()
    assert watchable.scan(str(source), 64, 1 << 20)  # the host's volume is whole and readable
