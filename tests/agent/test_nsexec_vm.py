"""The agent's own exec path (agent/nsexec.py) against `crun exec`, in two real guests side by side.

One guest runs the agent as shipped (exec without crun where nsexec covers the spec), one with
`pykata.exec=crun` (every exec through crun), one with `pykata.exec=spawner` (nsexec's children forked by
the exec spawner, agent/spawner.py, instead of the agent). The same container and the same execs go to both; what
each exec'd process sees of itself must be identical: capabilities (all five sets), no_new_privs,
seccomp, uids/gids/groups, cgroup, rlimits, cwd, umask, environment, and the namespaces of the
container's init. Then the attacks: capabilities beyond the container's bounding set, a look for
the agent's descriptors from inside, a missing program, a stopped container; and semantics: exit
codes, signals, stdin, many execs at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from pykata.protocols.agent import AGENT_SERVICE, agent_pb2
from pykata.ttrpc import Client, Code, RpcError
from tests.agent.test_agent_vm import _connect, _copy_busybox, _spec, _vm, guest_assets, host_share  # noqa: F401

pytestmark = pytest.mark.vm

CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT"]
SECCOMP = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
           "syscalls": [{"names": ["mknod", "mknodat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}
# What a process reports of itself. The guest's copy of the rootfs has only /bin/busybox (no applet
# links), so applets run as `$b applet`; mkfifo is refused by the container's seccomp filter.
SELF = ("b=/bin/busybox; $b grep -E '^(Cap|NoNewPrivs|Seccomp|Uid|Gid|Groups)' /proc/self/status; "
        "$b cat /proc/self/cgroup /proc/self/limits; pwd; umask; $b env | $b sort; "
        "echo fds; $b ls /proc/self/fd; echo endfds; $b mkfifo /tmp/fifo-$$ 2>&1; echo end")
NAMESPACES = ("for n in ipc mnt net pid uts cgroup; do [ \"$(/bin/busybox readlink /proc/self/ns/$n)\" = "
              "\"$(/bin/busybox readlink /proc/1/ns/$n)\" ] && echo same-$n; done")


@pytest.fixture(scope="module")
def vms(guest_assets: tuple[Path, Path], host_share: Path,  # noqa: F811
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Path, Path]]]:
    with _vm(*guest_assets, tmp_path_factory.mktemp("native"), host_share) as native, \
            _vm(*guest_assets, tmp_path_factory.mktemp("crun"), host_share, "pykata.exec=crun") as crun, \
            _vm(*guest_assets, tmp_path_factory.mktemp("spawner"), host_share, "pykata.exec=spawner") as spawner:
        # spawner: the agent's own path with its children forked by the exec spawner (agent/spawner.py)
        yield {"native": native, "crun": crun, "spawner": spawner}


@pytest.fixture
async def guests(vms: dict[str, tuple[Path, Path]]) -> AsyncIterator[dict[str, Any]]:
    clients: list[Client] = []
    stubs = {}
    try:
        for name, (sock, log) in vms.items():
            try:
                client = await _connect(sock)
            except (AssertionError, RpcError, OSError) as exc:
                raise AssertionError(f"{name}: {exc}\n{log.read_text(errors='replace')[-3000:]}") from None
            clients.append(client)
            stubs[name] = client.stub(AGENT_SERVICE)
            await _copy_busybox(stubs[name])
        yield stubs
    finally:
        for client in clients:
            await client.close()
        await asyncio.sleep(0.05)


def _container_spec() -> dict[str, Any]:
    spec = _spec(["/bin/busybox", "sleep", "1000"], noNewPrivileges=False,
                 capabilities={k: CAPS for k in ("bounding", "effective", "permitted", "inheritable")},
                 rlimits=[{"type": "RLIMIT_NOFILE", "soft": 512, "hard": 1024},
                          {"type": "RLIMIT_NPROC", "soft": 300, "hard": 400},
                          {"type": "RLIMIT_CORE", "soft": 0, "hard": (1 << 64) - 1}])  # hard: unlimited
    spec["linux"]["seccomp"] = SECCOMP
    # busybox applets by name: links the test makes in the container's (read-only) root would need
    # a writable one, so /bin holds only busybox and the scripts call it by path
    return spec


async def _exec(agent: Any, cid: str, eid: str, script: str, *, stdin: bytes = b"",
                **process: Any) -> tuple[int, bytes]:
    user = process.pop("user", agent_pb2.User(uid=0, gid=0))
    proc = agent_pb2.Process(args=["/bin/busybox", "sh", "-c", script], env=["PATH=/bin", "X=1"],
                             cwd=process.pop("cwd", "/"), user=user, **process)
    await agent.ExecProcess(agent_pb2.ExecProcessRequest(container_id=cid, exec_id=eid, process=proc), timeout=60)
    if stdin:
        await agent.WriteStdin(agent_pb2.WriteStreamRequest(container_id=cid, exec_id=eid, data=stdin))
    await agent.CloseStdin(agent_pb2.CloseStdinRequest(container_id=cid, exec_id=eid))
    out = bytearray()
    while not (r := await agent.ReadStdout(agent_pb2.ReadStreamRequest(container_id=cid, exec_id=eid),
                                           timeout=60)).eof:
        out += r.data
    waited = await agent.WaitProcess(agent_pb2.WaitProcessRequest(container_id=cid, exec_id=eid), timeout=60)
    return waited.exit_status, bytes(out)


async def _both(guests: dict[str, Any], fn: Any) -> dict[str, Any]:
    names = list(guests)
    results = await asyncio.gather(*(fn(guests[n]) for n in names))
    return dict(zip(names, results, strict=True))


async def test_native_exec_matches_crun_exec_and_refuses_what_crun_would_refuse(guests: dict[str, Any]) -> None:
    spec = json.dumps(_container_spec())
    for agent in guests.values():
        await agent.CreateContainer(agent_pb2.CreateContainerRequest(container_id="d", oci_spec_json=spec),
                                    timeout=120)
    try:
        for agent in guests.values():
            await agent.StartContainer(agent_pb2.StartContainerRequest(container_id="d"), timeout=60)
            await agent.CloseStdin(agent_pb2.CloseStdinRequest(container_id="d"))

        # the same process, as root and as another user with groups and fewer capabilities
        root = await _both(guests, lambda a: _exec(a, "d", "root", SELF))
        assert root["native"] == root["crun"] == root["spawner"], root
        status, out = root["native"]
        text = out.decode()
        assert status == 0 and text.endswith("end\n"), text
        assert "NoNewPrivs:\t0" in text and "Seccomp:\t2" in text, text
        assert "CapBnd:\t00000000000405eb" in text and "CapEff:\t00000000000405eb" in text, text
        # no descriptor of the agent reached the process: only stdio and ls's own directory
        assert "fds\n0\n1\n2\n3\nendfds\n" in text, text
        assert "Operation not permitted" in text, text  # the container's seccomp filter

        user = agent_pb2.User(uid=1000, gid=1000, additional_gids=[5, 6], umask=0o027)
        caps = agent_pb2.Capabilities(bounding=["CAP_KILL", "CAP_CHOWN"], effective=["CAP_KILL"],
                                           permitted=["CAP_KILL"], inheritable=["CAP_KILL"], ambient=["CAP_KILL"])
        other = await _both(guests, lambda a: _exec(
            a, "d", "user", SELF, user=user, cwd="/tmp", capabilities=caps, no_new_privileges=True))
        assert other["native"] == other["crun"] == other["spawner"], other
        text = other["native"][1].decode()
        assert "Uid:\t1000\t1000\t1000\t1000" in text and "Groups:\t5 6" in text, text
        assert "NoNewPrivs:\t1" in text and "CapAmb:\t0000000000000020" in text, text
        assert "\n/tmp\n0027\n" in text, text

        # the namespaces are the init's
        ns = await _both(guests, lambda a: _exec(a, "d", "ns", NAMESPACES))
        assert ns["native"] == ns["crun"] == ns["spawner"] == (0, b"".join(f"same-{n}\n".encode()
                                                        for n in ("ipc", "mnt", "net", "pid", "uts", "cgroup"))), ns

        # exit codes, signals, stdin
        codes = await _both(guests, lambda a: _exec(a, "d", "exit", "exit 7"))
        assert codes["native"] == codes["crun"] == codes["spawner"] == (7, b"")
        killed = await _both(guests, lambda a: _exec(a, "d", "sig", "kill -TERM $$; sleep 5"))
        assert killed["native"] == killed["crun"] == killed["spawner"] == (143, b"")
        echoed = await _both(guests, lambda a: _exec(a, "d", "cat", "/bin/busybox cat", stdin=b"x" * 100000))
        assert echoed["native"] == echoed["crun"] == echoed["spawner"] == (0, b"x" * 100000)

        # a signal from the host reaches the exec'd process (its pid is the agent's to signal)
        async def signalled(agent: Any) -> int:
            proc = agent_pb2.Process(args=["/bin/busybox", "sleep", "1000"], env=["PATH=/bin"], cwd="/")
            await agent.ExecProcess(agent_pb2.ExecProcessRequest(container_id="d", exec_id="sleeper", process=proc),
                                    timeout=60)
            await agent.SignalProcess(agent_pb2.SignalProcessRequest(container_id="d", exec_id="sleeper", signal=15))
            waited = await agent.WaitProcess(agent_pb2.WaitProcessRequest(container_id="d", exec_id="sleeper"),
                                             timeout=60)
            return int(waited.exit_status)

        assert await _both(guests, signalled) == {"native": 143, "crun": 143, "spawner": 143}

        # many at once
        many = await _both(guests, lambda a: asyncio.gather(*(_exec(a, "d", f"m{i}", f"echo {i}") for i in range(8))))
        assert many["native"] == many["crun"] == many["spawner"] == [(0, f"{i}\n".encode()) for i in range(8)]

        # attacks and errors: each refused the same way by both
        for name, agent in guests.items():
            # a capability the container's bounding set does not have
            with pytest.raises(RpcError) as ei:
                await _exec(agent, "d", "admin", "true", capabilities=agent_pb2.Capabilities(
                    bounding=["CAP_SYS_ADMIN"], effective=["CAP_SYS_ADMIN"], permitted=["CAP_SYS_ADMIN"]))
            assert ei.value.code == Code.INVALID_ARGUMENT and "CAP_SYS_ADMIN" in ei.value.message, (name, ei.value)
            # a missing program
            proc = agent_pb2.Process(args=["no-such-program"], env=["PATH=/bin"], cwd="/")
            with pytest.raises(RpcError) as ei:
                await agent.ExecProcess(agent_pb2.ExecProcessRequest(container_id="d", exec_id="missing",
                                                                     process=proc), timeout=60)
            assert ei.value.code == Code.NOT_FOUND, (name, ei.value)
            assert "executable file `no-such-program` not found in $PATH" in ei.value.message, (name, ei.value)
            # a cwd that does not exist
            with pytest.raises(RpcError) as ei:
                await _exec(agent, "d", "nocwd", "true", cwd="/no/such/dir")
            assert "/no/such/dir" in ei.value.message, (name, ei.value)

        # a stopped container
        for name, agent in guests.items():
            await agent.SignalProcess(agent_pb2.SignalProcessRequest(container_id="d", signal=9))
            assert (await agent.WaitProcess(agent_pb2.WaitProcessRequest(container_id="d"))).exit_status == 137
            with pytest.raises(RpcError) as ei:
                await _exec(agent, "d", "late", "true")
            assert ei.value.code == Code.FAILED_PRECONDITION, (name, ei.value)
    finally:
        for agent in guests.values():
            with contextlib.suppress(RpcError):
                await agent.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id="d", timeout_seconds=30),
                                            timeout=60)
