"""Sandbox setup, storages and the guest-wide RPCs, through the agent."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pykata.protocols.agent import AGENT_SERVICE, HEALTH_SERVICE, agent_pb2
from pykata.ttrpc import Code, RpcError
from tests.agent.conftest import AgentHelper


async def test_health_and_agent_service_are_served_together(agent: AgentHelper) -> None:
    health = agent.client.stub(HEALTH_SERVICE)
    resp = await health.Check(agent_pb2.CheckRequest())
    assert resp.status == agent_pb2.HealthCheckResponse.SERVING
    details = await agent.stub.GetGuestDetails(agent_pb2.GuestDetailsRequest(mem_block_size=True))
    assert details.agent_details.version and details.kernel_release == os.uname().release
    assert details.online_cpus == os.cpu_count()
    assert details.mem_total_bytes > 0
    assert details.agent_details.cgroup_version in (1, 2)
    assert "virtio-fs" in details.agent_details.storage_drivers
    assert not details.agent_details.init_daemon  # on the host it is not PID 1


async def test_online_cpu_mem_with_everything_online_is_a_no_op(agent: AgentHelper) -> None:
    # This agent runs on the host: ask only for what is online (nb_cpus below that would take the
    # host's own CPUs offline; guest.online_cpu_mem's offlining is tested on a fake sysfs).
    online = Path("/sys/devices/system/cpu/online").read_text()
    await agent.stub.OnlineCPUMem(agent_pb2.OnlineCPUMemRequest(wait=True))
    await agent.stub.OnlineCPUMem(agent_pb2.OnlineCPUMemRequest(wait=True, nb_cpus=os.cpu_count() or 1,
                                                                cpu_only=True))
    assert Path("/sys/devices/system/cpu/online").read_text() == online


async def test_set_time_checks_its_arguments(agent: AgentHelper) -> None:
    # Setting the clock for real would change this host's time; guest.set_time is covered with
    # its argument checks here and by the VM tests in the guest.
    for req, field in ((agent_pb2.SetGuestDateTimeRequest(sec=1, usec=2_000_000), "usec"),
                       (agent_pb2.SetGuestDateTimeRequest(sec=-5, usec=0), "sec")):
        with pytest.raises(RpcError) as ei:
            await agent.stub.SetGuestDateTime(req)
        assert ei.value.code == Code.INVALID_ARGUMENT and field in ei.value.message


async def test_networking_rpcs_over_ttrpc(agent: AgentHelper) -> None:
    # the agent here runs on the host: list only (tests/agent/test_network.py changes links in a netns)
    links = await agent.stub.ListInterfaces(agent_pb2.ListInterfacesRequest())
    assert any(i.type == "loopback" for i in links.interfaces)
    routes = await agent.stub.ListRoutes(agent_pb2.ListRoutesRequest())
    assert all(r.dest for r in routes.routes)
    with pytest.raises(RpcError) as ei:
        await agent.stub.UpdateInterface(agent_pb2.UpdateInterfaceRequest(
            interface=agent_pb2.Interface(hw_addr="not-a-mac")))
    assert ei.value.code == Code.INVALID_ARGUMENT and "interface.hw_addr" in ei.value.message


async def test_container_storages_are_mounted_and_unmounted(agent: AgentHelper, tmp_path: Path) -> None:
    volume = agent.env.shared_dir / "vol-src"
    volume.mkdir()
    (volume / "hello.txt").write_text("from the volume\n")
    try:
        storage_dir = agent.env.state_dir / "storage"
        storages = [
            agent_pb2.Storage(driver="bind", source=str(volume), mount_point=f"{storage_dir}/st/vol",
                              options=["ro"]),
            agent_pb2.Storage(driver="tmpfs", source="tmpfs", mount_point=f"{storage_dir}/st/scratch",
                              options=["size=1m", "mode=0777"]),
        ]
        mounts = [
            {"destination": "/vol", "type": "bind", "source": f"{storage_dir}/st/vol", "options": ["rbind", "ro"]},
            {"destination": "/scratch", "type": "bind", "source": f"{storage_dir}/st/scratch",
             "options": ["rbind"]},
        ]
        spec = agent.spec(["sh", "-c", "cat /vol/hello.txt; echo x > /scratch/f && cat /scratch/f; "
                                       "echo y > /vol/new 2>/dev/null || echo read-only"], mounts=mounts)
        await agent.create("vols", spec, storages=storages)
        await agent.start("vols")
        code, out, _ = await agent.collect("vols")
        assert (code, out) == (0, b"from the volume\nx\nread-only\n")
        await agent.remove("vols")
        # unmounted: the mount points are gone (the agent mounts in its own mount namespace, so
        # look at its view of the mounts)
        mounts_of_agent = Path(f"/proc/{agent.env.pid}/mounts").read_text()
        assert f"{storage_dir}/st/" not in mounts_of_agent
        assert not (volume / "new").exists()
    finally:
        shutil.rmtree(volume)


async def test_pod_volume_lives_with_the_sandbox_not_a_container(agent: AgentHelper) -> None:
    """An emptyDir in the guest (<state>/emptydir/<name>): mounted by the first container naming it,
    found by the next (its options ignored), kept when the first is removed, unmounted by DestroySandbox."""
    volume = f"{agent.env.state_dir}/emptydir/cache"

    def storage(size: str) -> agent_pb2.Storage:
        return agent_pb2.Storage(driver="tmpfs", source="tmpfs", fstype="tmpfs", mount_point=volume,
                                 options=["mode=777", f"size={size}"])

    mounts = [{"destination": "/cache", "type": "bind", "source": volume, "options": ["rbind"]}]
    await agent.stub.CreateSandbox(agent_pb2.CreateSandboxRequest(sandbox_id="sbvol"), timeout=60)
    try:
        await agent.create("w", agent.spec(["sh", "-c", "echo kept > /cache/f"], mounts=mounts),
                           storages=[storage("1m")])
        await agent.start("w")
        assert (await agent.collect("w"))[0] == 0
        await agent.remove("w")
        assert f" {volume} tmpfs " in Path(f"/proc/{agent.env.pid}/mounts").read_text()
        await agent.create("r", agent.spec(["sh", "-c", "cat /cache/f; df -k /cache | tail -1"], mounts=mounts),
                           storages=[storage("2m")])
        await agent.start("r")
        code, out, err = await agent.collect("r")
        assert code == 0, err
        assert out.startswith(b"kept\n") and out.split()[2] == b"1024"  # the first request's size
        await agent.remove("r")
    finally:
        await agent.stub.DestroySandbox(agent_pb2.DestroySandboxRequest(timeout_seconds=20), timeout=60)
    assert f" {volume} " not in Path(f"/proc/{agent.env.pid}/mounts").read_text()


async def test_sandbox_hostname_dns_and_shared_pid_namespace(agent: AgentHelper) -> None:
    await agent.stub.CreateSandbox(agent_pb2.CreateSandboxRequest(
        sandbox_id="sb1", hostname="pykata-sb", dns=["nameserver 10.9.8.7", "search example.test"],
        sandbox_pidns=True), timeout=60)
    try:
        with pytest.raises(RpcError) as ei:
            await agent.stub.CreateSandbox(agent_pb2.CreateSandboxRequest(sandbox_id="sb1"))
        assert ei.value.code == Code.ALREADY_EXISTS
        await agent.create("first", args=["sleep", "1000"], sandbox_pidns=True)
        await agent.start("first")
        await agent.close_stdin("first")
        spec = agent.spec(["sh", "-c", "cat /etc/resolv.conf; ps -o comm | grep -c sleep"])
        await agent.create("second", spec, sandbox_pidns=True)
        await agent.start("second")
        code, out, err = await agent.collect("second")
        assert code == 0, err
        # the resolv.conf of the sandbox, and the sleep of the other container in the shared pid ns
        assert out == b"nameserver 10.9.8.7\nsearch example.test\n1\n"
    finally:
        await agent.stub.DestroySandbox(agent_pb2.DestroySandboxRequest(timeout_seconds=20), timeout=60)
    # DestroySandbox removed the containers; a new sandbox can be made afterwards
    assert not os.listdir(agent.env.state_dir / "crun")
    await agent.stub.CreateSandbox(agent_pb2.CreateSandboxRequest(sandbox_id="sb2"))
    await agent.stub.DestroySandbox(agent_pb2.DestroySandboxRequest())


@pytest.mark.parametrize(("req", "field"), [
    (agent_pb2.CreateSandboxRequest(sandbox_id="bad/id"), "sandbox_id"),
    (agent_pb2.CreateSandboxRequest(sandbox_id="s", hostname="-bad-"), "hostname"),
    (agent_pb2.CreateSandboxRequest(sandbox_id="s", dns=["nameserver 1.1.1.1\nnameserver 6.6.6.6"]), "dns[0]"),
    (agent_pb2.CreateSandboxRequest(sandbox_id="s", kernel_modules=[agent_pb2.KernelModule(name="../x")]),
     "kernel_modules[0].name"),
])
async def test_bad_sandbox_requests(agent: AgentHelper, req: agent_pb2.CreateSandboxRequest, field: str) -> None:
    with pytest.raises(RpcError) as ei:
        await agent.stub.CreateSandbox(req)
    assert ei.value.code == Code.INVALID_ARGUMENT and ei.value.message.startswith(field)


async def test_a_new_connection_sees_the_same_containers(agent: AgentHelper) -> None:
    from pykata.ttrpc import connect_unix

    await agent.create("shared-view", args=["sh", "-c", "echo still here"])
    await agent.start("shared-view")
    await agent.client.close()
    agent.client = await connect_unix(agent.env.socket)
    agent.stub = agent.client.stub(AGENT_SERVICE)
    code, out, _ = await agent.collect("shared-view")
    assert (code, out) == (0, b"still here\n")


async def test_container_joins_another_containers_pid_namespace(agent: AgentHelper) -> None:
    """CRI pid=POD: a container created with pid_ns_container sees that container's init (the pod's
    pause) as its pid 1, without the sandbox-wide namespace of CreateSandbox(sandbox_pidns)."""
    await agent.stub.CreateSandbox(agent_pb2.CreateSandboxRequest(sandbox_id="sbpid"), timeout=60)
    try:
        await agent.create("pause", args=["sleep", "1001"])
        await agent.start("pause")
        await agent.close_stdin("pause")
        spec = agent.spec(["sh", "-c", "tr '\\0' ' ' < /proc/1/cmdline; echo; ps -o comm | grep -c sleep"])
        await agent.create("joined", spec, pid_ns_container="pause")
        await agent.start("joined")
        code, out, err = await agent.collect("joined")
        assert code == 0, err
        assert out == b"sleep 1001 \n1\n"
        for kw, code_ in (({"pid_ns_container": "nosuch"}, Code.NOT_FOUND),
                          ({"pid_ns_container": "pause", "sandbox_pidns": True}, Code.INVALID_ARGUMENT)):
            with pytest.raises(RpcError) as ei:
                await agent.create("refused", agent.spec(["true"]), **kw)
            assert ei.value.code == code_ and "pid_ns_container" in ei.value.message
    finally:
        await agent.stub.DestroySandbox(agent_pb2.DestroySandboxRequest(timeout_seconds=20), timeout=60)
