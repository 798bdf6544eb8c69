"""Containers and processes through the agent's ttrpc API, run by real crun on this host."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from pykata.protocols.agent import agent_pb2
from pykata.ttrpc import Code, RpcError
from tests.agent.conftest import CRUN, AgentHelper, cgroup_dirs


async def test_echo_stdout_and_stderr(agent: AgentHelper) -> None:
    code, out, err = await agent.run("echo", ["sh", "-c", "echo hello; echo oops >&2"])
    assert (code, out, err) == (0, b"hello\n", b"oops\n")


@pytest.mark.parametrize("status", [0, 1, 7])
async def test_exit_status_of_init(agent: AgentHelper, status: int) -> None:
    code, _, _ = await agent.run(f"exit{status}", ["sh", "-c", f"exit {status}"])
    assert code == status


async def test_sigkill_of_init_gives_137(agent: AgentHelper) -> None:
    await agent.create("killed", args=["sleep", "1000"])
    await agent.start("killed")
    await agent.close_stdin("killed")
    await agent.stub.SignalProcess(agent_pb2.SignalProcessRequest(container_id="killed", signal=signal.SIGKILL))
    assert await agent.wait("killed") == 137
    # a second signal to a process that is gone is NOT_FOUND (containerd: "process already finished")
    with pytest.raises(RpcError) as ei:
        await agent.stub.SignalProcess(agent_pb2.SignalProcessRequest(container_id="killed", signal=signal.SIGKILL))
    assert ei.value.code == Code.NOT_FOUND


async def test_exec_killed_by_its_own_signal_gives_128_plus_signal(agent: AgentHelper) -> None:
    await agent.create("sigself", args=["sleep", "1000"])
    await agent.start("sigself")
    await agent.exec("sigself", "term", ["sh", "-c", "kill -TERM $$; sleep 5"])
    assert (await agent.collect("sigself", "term"))[0] == 128 + signal.SIGTERM


async def test_stdin_is_piped_to_the_process(agent: AgentHelper) -> None:
    data = os.urandom(300_000)
    code, out, _ = await agent.run("cat", ["cat"], stdin=data)
    assert code == 0 and out == data


async def test_env_cwd_and_user_from_the_spec(agent: AgentHelper) -> None:
    spec = agent.spec(["sh", "-c", "echo $FOO; pwd; id -u; id -g"], env=["FOO=bar baz"], cwd="/home/tester",
                      uid=1000, gid=1001)
    code, out, err = await agent.run("envcwd", spec=spec)
    assert (code, out.decode().split("\n"), err) == (0, ["bar baz", "/home/tester", "1000", "1001", ""], b"")


async def test_exec_into_a_running_container(agent: AgentHelper) -> None:
    await agent.create("execs", args=["sleep", "1000"])
    init_pid = await agent.start("execs")
    await agent.close_stdin("execs")
    pid = await agent.exec("execs", "one", ["sh", "-c", "echo $((1+2)); pwd; echo $X; id -u"],
                           cwd="/tmp", env=["PATH=/bin", "X=y"], user=agent_pb2.User(username="tester"))
    assert pid > 0 and pid != init_pid
    code, out, _ = await agent.collect("execs", "one")
    assert (code, out) == (0, b"3\n/tmp\ny\n1000\n")
    # exec ids are unique per container while the host may still ask about the process
    await agent.exec("execs", "long", ["sleep", "1000"])
    with pytest.raises(RpcError) as ei:
        await agent.exec("execs", "long", ["true"])
    assert ei.value.code == Code.ALREADY_EXISTS
    # an exec that exited, was waited for and whose output was read is forgotten at the next exec
    with pytest.raises(RpcError) as ei:
        await agent.wait("execs", "one")
    assert ei.value.code == Code.NOT_FOUND
    # the exec'd process sees the same pid namespace as init (sleep is pid 1 there)
    await agent.exec("execs", "ps", ["sh", "-c", "cat /proc/1/cmdline"])
    assert (await agent.collect("execs", "ps"))[1] == b"sleep\x001000\x00"


async def test_container_processes_keep_address_space_randomization(agent: AgentHelper) -> None:
    """crun runs at fixed addresses (agent.command.fixed_layout: QEMU's TCG reuses its translations),
    but neither a container's init nor an exec may inherit that: the persona crun sets from the
    spec's linux.personality (the agent always sets one) gives randomization back."""
    code, out, _ = await agent.run("aslr", ["cat", "/proc/self/personality"])
    assert (code, int(out, 16) & 0x0040000) == (0, 0), out
    await agent.create("aslrexec", args=["sleep", "1000"])
    await agent.start("aslrexec")
    await agent.close_stdin("aslrexec")
    await agent.exec("aslrexec", "p", ["cat", "/proc/self/personality"])
    code, out, _ = await agent.collect("aslrexec", "p")
    assert (code, int(out, 16) & 0x0040000) == (0, 0), out


async def test_a_seccomp_profile_is_compiled_once_and_enforced_from_the_kept_program(agent: AgentHelper) -> None:
    """crun compiles a container's seccomp profile; the agent keeps the program and hands it to the
    next container with the same profile (run.oci.seccomp_bpf_data in the config.json it writes),
    whose init and execs are filtered all the same. A profile from the host never carries it."""
    profile = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
               "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}
    denied = ["sh", "-c", "mkdir /tmp/d 2>/dev/null && echo made || echo refused"]
    first = agent.spec(denied)
    first["linux"]["seccomp"] = profile
    assert await agent.run("sc1", spec=first) == (0, b"refused\n", b"")
    config1 = json.loads((agent.env.state_dir / "bundles/sc1/config.json").read_text()) \
        if (agent.env.state_dir / "bundles/sc1").exists() else {}
    assert "run.oci.seccomp_bpf_data" not in (config1.get("annotations") or {})
    second = agent.spec(["sleep", "1000"])
    second["linux"]["seccomp"] = profile
    await agent.create("sc2", second)
    config2 = json.loads((agent.env.state_dir / "bundles/sc2/config.json").read_text())
    assert config2["annotations"]["run.oci.seccomp_bpf_data"], "the kept program was not handed to crun"
    assert config2["linux"]["seccomp"] == profile
    await agent.start("sc2")
    await agent.close_stdin("sc2")
    await agent.exec("sc2", "mk", denied)
    assert (await agent.collect("sc2", "mk"))[:2] == (0, b"refused\n")
    # the same program's init: /proc/1/status of the container says it is filtered
    await agent.exec("sc2", "st", ["sh", "-c", "grep Seccomp: /proc/1/status"])
    assert b"2" in (await agent.collect("sc2", "st"))[1]
    # another profile is compiled for itself
    other = agent.spec(denied)
    other["linux"]["seccomp"] = {**profile, "syscalls": [{"names": ["getpid"], "action": "SCMP_ACT_ERRNO"}]}
    assert await agent.run("sc3", spec=other) == (0, b"made\n", b"")


async def test_exec_into_a_stopped_container_fails(agent: AgentHelper) -> None:
    await agent.run("stopped", ["true"])
    with pytest.raises(RpcError) as ei:
        await agent.exec("stopped", "late", ["true"])
    assert ei.value.code == Code.FAILED_PRECONDITION


async def test_tty_init_process(agent: AgentHelper) -> None:
    spec = agent.spec(["sh", "-c", "tty; stty size"], terminal=True, console=(30, 100))
    code, out, err = await agent.run("tty", spec=spec)
    lines = out.decode().replace("\r", "").split("\n")
    assert code == 0 and err == b""
    assert lines[0].startswith("/dev/pts/") and lines[1] == "30 100"


async def test_tty_exec_resize_is_seen_by_stty(agent: AgentHelper) -> None:
    await agent.create("ttyexec", args=["sleep", "1000"])
    await agent.start("ttyexec")
    await agent.close_stdin("ttyexec")
    await agent.exec("ttyexec", "t", ["sh", "-c", "read line; stty size; echo got $line"], terminal=True,
                     console_height=24, console_width=80)
    await agent.stub.TtyWinResize(agent_pb2.TtyWinResizeRequest(container_id="ttyexec", exec_id="t",
                                                                rows=40, columns=132))
    await agent.write_stdin("ttyexec", b"go\n", "t", close=False)
    out = await agent.read_all("ttyexec", "t")
    assert await agent.wait("ttyexec", "t") == 0
    assert b"40 132\r\ngot go" in out
    # stderr of a tty process is the terminal: its own stream is empty and ended
    assert await agent.read_all("ttyexec", "t", "stderr") == b""
    with pytest.raises(RpcError) as ei:  # a pipe process has no terminal to resize
        await agent.stub.TtyWinResize(agent_pb2.TtyWinResizeRequest(container_id="ttyexec", rows=1, columns=1))
    assert ei.value.code == Code.FAILED_PRECONDITION


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _wchar(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar")


async def test_50_mib_of_stdout_is_back_pressured_and_read_completely(agent: AgentHelper) -> None:
    n = 6_700_000  # `seq 1 n` prints a little more than 50 MiB
    expected = "".join(f"{i}\n" for i in range(1, n + 1)).encode()
    assert len(expected) >= 50 << 20
    rss_before = _rss_kib(agent.env.pid)
    await agent.create("flood", args=["seq", "1", str(n)])
    pid = await agent.start("flood")
    await agent.close_stdin("flood")
    first = await agent.stub.ReadStdout(agent_pb2.ReadStreamRequest(container_id="flood", max_length=4096))
    await asyncio.sleep(1.5)  # a slow host: the writer must block, the agent must not buffer it all
    written = _wchar(pid)
    rss_during = _rss_kib(agent.env.pid)
    assert written < 4 << 20, f"the writer got {written} bytes out while the host read 4 KiB"
    assert rss_during - rss_before < 16 << 10, f"agent RSS grew {rss_during - rss_before} KiB"
    rest = await agent.read_all("flood")
    assert await agent.wait("flood") == 0
    out = first.data + rest
    assert len(out) == len(expected) and out == expected


async def test_remove_leaves_no_crun_state_process_or_cgroup(agent: AgentHelper) -> None:
    await agent.create("gone", args=["sleep", "1000"])
    init_pid = await agent.start("gone")
    exec_pid = await agent.exec("gone", "bg", ["sleep", "1000"])
    parent = agent.env.cgroup_parent
    assert all(d.is_dir() for d in cgroup_dirs(parent, "gone"))
    await agent.remove("gone")
    assert not (agent.env.state_dir / "crun" / "gone").exists()
    assert not (agent.env.state_dir / "bundles" / "gone").exists()
    for pid in (init_pid, exec_pid):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not any(d.exists() for d in cgroup_dirs(parent, "gone"))
    with pytest.raises(RpcError) as ei:
        await agent.stub.StartContainer(agent_pb2.StartContainerRequest(container_id="gone"))
    assert ei.value.code == Code.NOT_FOUND


async def test_create_without_start_then_remove(agent: AgentHelper) -> None:
    pid = await agent.create("never", args=["true"])
    assert Path(f"/proc/{pid}").exists()
    await agent.remove("never")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_kill_all_reaches_exec_processes(agent: AgentHelper) -> None:
    await agent.create("all", args=["sleep", "1000"])
    await agent.start("all")
    await agent.exec("all", "x", ["sleep", "1000"])
    await agent.stub.SignalProcess(agent_pb2.SignalProcessRequest(container_id="all", signal=9, all=True))
    assert await agent.wait("all", "x") == 137
    assert await agent.wait("all") == 137


async def test_wait_survives_a_client_that_went_away(agent: AgentHelper) -> None:
    from pykata.protocols.agent import AGENT_SERVICE
    from pykata.ttrpc import connect_unix

    await agent.create("waiter", args=["sh", "-c", "sleep 0.5; exit 3"])
    await agent.start("waiter")
    other = await connect_unix(agent.env.socket)
    pending = asyncio.ensure_future(other.call(AGENT_SERVICE, "WaitProcess",
                                               agent_pb2.WaitProcessRequest(container_id="waiter")))
    await asyncio.sleep(0.1)
    await other.close()
    with pytest.raises(RpcError):
        await pending
    assert await agent.wait("waiter") == 3


async def test_start_without_crun_leaves_crun_seeing_a_running_container(agent: AgentHelper) -> None:
    """StartContainer releases the init through crun's exec fifo itself; crun's own view must agree
    (state "running"), and a second start is refused as before."""
    assert CRUN is not None
    await agent.create("released", args=["sleep", "1000"])
    init_pid = await agent.start("released")
    await agent.close_stdin("released")
    state = subprocess.run(agent.env.wrap([CRUN, f"--root={agent.env.state_dir / 'crun'}", "state", "released"]),
                           capture_output=True, check=True)
    doc = json.loads(state.stdout)
    assert (doc["status"], doc["pid"]) == ("running", init_pid)
    assert not (agent.env.state_dir / "crun/released/exec.fifo").exists()
    with pytest.raises(RpcError) as ei:
        await agent.start("released")
    assert ei.value.code == Code.FAILED_PRECONDITION
