"""`pykata monitor` and `pykata sandbox ls/inspect` against real sandboxes in a private runtime dir.

One module-wide monitor process; the test owns the sandboxes (pykata.AsyncSandbox), so the monitor
reaches their agents through the owner's agent proxy, as it does a shim's."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

import pykata
from pykata.config import load_config_file
from pykata.monitor.scrape import GUEST_VALUE_MAX, BadGuestValue, _guest

PYKATA = str(Path(__file__).resolve().parents[2] / ".venv/bin/pykata")


def test_a_guest_value_out_of_bounds_is_refused() -> None:
    assert _guest("x", 5) == 5.0
    for bad in (-1, GUEST_VALUE_MAX + 1, 1 << 64):
        with pytest.raises(BadGuestValue, match="out of bounds"):
            _guest("x", bad)


def test_bad_listen_address_is_one_clear_line() -> None:
    p = subprocess.run([PYKATA, "monitor", "--listen", "nonsense"], capture_output=True, timeout=60)
    assert p.returncode == 1 and b"--listen" in p.stderr and b"Traceback" not in p.stderr
    # a port in use names the option and the address too (was "[Errno 98] Address already in use")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        p = subprocess.run([PYKATA, "monitor", "--listen", address], capture_output=True, timeout=60)
    assert p.returncode == 1 and p.stderr == f"pykata: monitor: --listen {address}: Address already in use\n".encode()


@pytest.fixture(scope="module")
def private() -> Iterator[tuple[Path, dict[str, str]]]:
    d = Path(tempfile.mkdtemp(prefix="pkmon", dir="/tmp"))  # short: unix socket paths
    conf = d / "configuration.toml"
    conf.write_text(f'[runtime]\nruntime_dir = "{d}/run"\n')
    yield conf, {**os.environ, "PYKATA_CONFIG": str(conf)}
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def monitor(private: tuple[Path, dict[str, str]]) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([PYKATA, "monitor", "--listen", f"127.0.0.1:{port}", "--timeout", "1",
                             "--interval", "1"],
                            env=private[1], stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=5).read()
            break
        except OSError:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.2)
    yield url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(m: dict[str, list[tuple[dict[str, str], float]]], name: str, sid: str, **labels: str) -> float:
    [v] = [v for lab, v in m.get(name, []) if lab.get("sandbox_id") == sid
           and all(lab.get(k) == x for k, x in labels.items())]
    return v


def sandbox_ids(m: dict[str, list[tuple[dict[str, str], float]]]) -> set[str]:
    return {lab["sandbox_id"] for samples in m.values() for lab, _ in samples
            if "sandbox_id" in lab and "stage" not in lab}


def test_agent_ctl_lists_every_rpc_with_its_fields() -> None:
    p = subprocess.run([PYKATA, "agent-ctl", "--list", "--json"], capture_output=True, timeout=60)
    rpcs = {r["rpc"]: r for r in json.loads(p.stdout)}
    assert rpcs["ExecProcess"]["fields"]["containerId"] == "string" and "Check" in rpcs
    p = subprocess.run([PYKATA, "agent-ctl", "no-such-sandbox", "Check"], capture_output=True, timeout=60)
    assert p.returncode == 1 and b"no such" in p.stderr and b"Traceback" not in p.stderr


def pykata_json(env: dict[str, str], *args: str) -> object:
    p = subprocess.run([PYKATA, *args], capture_output=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.mark.vm
async def test_monitor_and_sandbox_ls_with_0_1_3_sandboxes(private: tuple[Path, dict[str, str]],
                                                          monitor: str) -> None:
    conf, env = private
    config = load_config_file(conf)
    m = await asyncio.to_thread(scrape, monitor)
    assert m["pykata_monitor_sandboxes"] == [({}, 0.0)] and not sandbox_ids(m)
    assert await asyncio.to_thread(pykata_json, env, "sandbox", "ls", "--json") == []

    boxes: list[pykata.AsyncSandbox] = []
    try:
        boxes.append(await pykata.AsyncSandbox(image="busybox", config=config).__aenter__())
        first = boxes[0].id
        m = await asyncio.to_thread(scrape, monitor)
        assert m["pykata_monitor_sandboxes"] == [({}, 1.0)] and sandbox_ids(m) == {first}
        # cross-checked against /proc: we are the owner; the VMM is the pid the record names
        [info] = await asyncio.to_thread(pykata_json, env, "sandbox", "ls", "--json")
        assert info["id"] == first and info["owner_pid"] == os.getpid() and info["vcpus"] >= 1
        vmm = psutil.Process(info["vmm_pid"])
        assert "qemu" in vmm.name() and first in " ".join(vmm.cmdline())
        assert value(m, "pykata_hypervisor_vcpus", first) == info["vcpus"]
        assert value(m, "pykata_hypervisor_memory_bytes", first) == info["memory_mib"] << 20
        assert 0 < value(m, "pykata_hypervisor_cpu_seconds_total", first) <= sum(vmm.cpu_times()[:2]) + 0.01
        assert abs(value(m, "pykata_hypervisor_threads", first) - vmm.num_threads()) <= 4
        assert 0 < value(m, "pykata_hypervisor_proportional_memory_bytes", first) <= \
            value(m, "pykata_hypervisor_resident_memory_bytes", first) * 1.05
        assert abs(value(m, "pykata_shim_open_fds", first) - psutil.Process().num_fds()) <= 16
        # the guest, through the agent: one running container (the SDK's idle process)
        assert value(m, "pykata_agent_up", first) == 1
        assert value(m, "pykata_guest_online_cpus", first) == info["vcpus"]
        assert 0 < value(m, "pykata_guest_memory_total_bytes", first) <= info["memory_mib"] << 20
        cid = info["containers"][0]["id"]
        assert value(m, "pykata_guest_container_pids", first, container_id=cid) >= 1
        assert value(m, "pykata_guest_container_memory_usage_bytes", first, container_id=cid) > 0
        # GetGuestMetrics: the guest's memory, load, CPU, network and disks, and the agent's process
        assert 0 < value(m, "pykata_guest_memory_available_bytes", first) <= \
            value(m, "pykata_guest_memory_total_bytes", first)
        assert value(m, "pykata_guest_load1", first) >= 0 and value(m, "pykata_guest_threads", first) >= 1
        # a clone's guest may not have idled yet (its template was saved while it booted, and it has run
        # since its restore): at rest it must, within a few samples
        deadline = time.monotonic() + 20
        idle = value(m, "pykata_guest_cpu_seconds_total", first, mode="idle")
        while idle == 0 and time.monotonic() < deadline:
            await asyncio.sleep(1)
            idle = value(await asyncio.to_thread(scrape, monitor), "pykata_guest_cpu_seconds_total", first,
                         mode="idle")
        assert idle > 0
        assert value(m, "pykata_guest_network_receive_bytes_total", first, interface="lo") >= 0
        assert value(m, "pykata_agent_threads", first) >= 1 and value(m, "pykata_agent_open_fds", first) >= 3
        assert 0 < value(m, "pykata_agent_resident_memory_bytes", first) < info["memory_mib"] << 20
        assert value(m, "pykata_agent_processes", first) >= 1
        # the owner's (this process's) RPCs to its agent, counted by method
        assert value(m, "pykata_shim_agent_rpc_total", first, method="CreateSandbox") == 1
        assert value(m, "pykata_shim_agent_rpc_total", first, method="CreateContainer") >= 1
        assert 0 <= value(m, "pykata_monitor_sample_age_seconds", first) < 30
        inspected = await asyncio.to_thread(pykata_json, env, "sandbox", "inspect", first[:10], "--json")
        assert isinstance(inspected, dict) and inspected["id"] == first and inspected["running"] is True
        assert inspected["runtime_dir"].startswith(str(conf.parent))

        # agent-ctl: any RPC with a JSON body, the reply as JSON; bad names and fields are one clear line
        details = await asyncio.to_thread(pykata_json, env, "agent-ctl", first[:10], "GetGuestDetails",
                                          '{"memBlockSize": true}')
        assert isinstance(details, dict) and details["onlineCpus"] == info["vcpus"]
        assert details["kernelRelease"] and details["agentDetails"]["version"]
        check = await asyncio.to_thread(pykata_json, env, "agent-ctl", first, "Health.Check")
        # with the guest's two clocks (the coarse one is its last timer tick: within ~1 tick of the other)
        assert check["status"] == "SERVING" and set(check) == {"status", "clockNs", "tickClockNs"}, check
        assert 0 <= int(check["clockNs"]) - int(check["tickClockNs"]) < 200_000_000, check
        for args, needle in ((("NoSuchRpc",), b"no agent RPC"), (("GetGuestDetails", '{"bogus": 1}'), b"bogus"),
                             (("GetGuestDetails", "not json"), b"GetGuestDetails request")):
            p = await asyncio.to_thread(subprocess.run, [PYKATA, "agent-ctl", first, *args], capture_output=True,
                                        env=env, timeout=60)
            assert p.returncode == 1 and needle in p.stderr and b"Traceback" not in p.stderr, p.stderr

        boxes.append(await pykata.AsyncSandbox(image="busybox", config=config).__aenter__())
        # the third is owned by a detached `pykata run`, another process
        name = f"mon{os.getpid()}"
        p = await asyncio.to_thread(subprocess.run, [PYKATA, "run", "-d", "--rm", "--name", name, "busybox",
                                                     "sleep", "1000"], capture_output=True, env=env, timeout=120)
        assert p.returncode == 0, p.stderr
        try:
            cli_id = p.stdout.decode().strip()
            ids = {b.id for b in boxes} | {cli_id}
            m = await asyncio.to_thread(scrape, monitor)
            assert m["pykata_monitor_sandboxes"] == [({}, 3.0)] and sandbox_ids(m) == ids
            assert all(value(m, "pykata_agent_up", sid) == 1 for sid in ids)
            listed = await asyncio.to_thread(pykata_json, env, "sandbox", "ls", "--json")
            assert isinstance(listed, list)
            owners = {i["id"]: i["owner"] for i in listed}
            assert owners[cli_id] == "pykata" and owners[first] == "sdk"
            assert next(i for i in listed if i["id"] == cli_id)["name"] == name
        finally:
            await asyncio.to_thread(subprocess.run, [PYKATA, "rm", "-f", name], env=env, timeout=120)
        ids -= {cli_id}

        # a hung guest cannot stall the scrape: its host figures stay, its agent is reported down
        listed = await asyncio.to_thread(pykata_json, env, "sandbox", "ls", "--json")
        assert isinstance(listed, list) and {i["id"] for i in listed} == ids
        hung = psutil.Process(next(i["vmm_pid"] for i in listed if i["id"] == boxes[1].id))
        hung.suspend()
        try:
            # the next background collections (every second, 1 s per sandbox at most) see it down;
            # every scrape meanwhile answers at once, from the last collection
            deadline = time.monotonic() + 20
            while True:
                start = time.monotonic()
                m = await asyncio.to_thread(scrape, monitor)
                assert time.monotonic() - start < 5
                if value(m, "pykata_agent_up", boxes[1].id) == 0 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            assert value(m, "pykata_agent_up", boxes[1].id) == 0
            assert value(m, "pykata_agent_up", boxes[0].id) == 1
            assert value(m, "pykata_monitor_scrape_errors_total", boxes[1].id, stage="agent") >= 1
        finally:
            hung.resume()
        # a sandbox whose VM dies drops out of the next scrape; the others stay
        hung.kill()
        await asyncio.to_thread(psutil.wait_procs, [hung], 10)  # SIGKILL takes effect asynchronously
        m = await asyncio.to_thread(scrape, monitor)
        assert sandbox_ids(m) == ids - {boxes[1].id}
        assert m["pykata_monitor_sandboxes"] == [({}, 1.0)]
    finally:
        for b in boxes:
            await b.close()
    m = await asyncio.to_thread(scrape, monitor)
    assert m["pykata_monitor_sandboxes"] == [({}, 0.0)] and not sandbox_ids(m)
