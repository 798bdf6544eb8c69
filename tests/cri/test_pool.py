"""The warm pool serving CRI pods (factory.pool_nics = 1): a pooled VM waits with its tap in a holding
network namespace of its own; at hand-out the tap moves into the pod's CNI namespace and is wired to its
veth. Real containerd + CRI + CNI bridge, real pooled VMs."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from cri_api.v1 import api_pb2

from pykata.config import load_config
from pykata.factory import pool
from tests.cri.harness import BUSYBOX_IMAGE, Cri, CriContainerd, missing_cri_prerequisites, one_container_pod, wait_gone
from tests.cri.test_network import BRIDGE_IP, exec_ok, sh
from tests.shim.harness import VENV_BIN

HTTP_PORT = 7779
POOL_SIZE = 2


@pytest.fixture(scope="module")
def pooled_cri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CriContainerd]:
    """A private CRI containerd whose pykata handler's configuration has a warm pool of CRI VMs
    (pool_size 2, pool_nics 1) in a runtime directory of its own; PYKATA_CONFIG names that configuration
    while the module runs (the tests fill and inspect the pool as `pykata factory pool` would)."""
    missing = missing_cri_prerequisites()
    if missing:
        pytest.fail(f"the CRI pool tests need {missing}")
    directory = tmp_path_factory.mktemp("cripool")
    # short: a pod that boots its own VM puts sockets under <runtime_dir>/sandboxes/<64-char id>/vm/
    run = Path(tempfile.mkdtemp(prefix="k", dir="/run"))  # as short as /run/pykata, nearly
    ctd = CriContainerd(directory / "ctd", runtime_config={
        "pool_size": str(POOL_SIZE), "pool_nics": "1", "runtime_dir": f'"{run}"'})
    before = os.environ.get("PYKATA_CONFIG")
    try:
        # before containerd starts: the shim's `delete` (containerd passes it no runtime options) finds
        # this configuration, and so the pool's runtime directory, through containerd's environment
        ctd.dir.mkdir(parents=True)
        ctd.config_text()  # writes pykata.toml from the tests' configuration
        os.environ["PYKATA_CONFIG"] = str(ctd.dir / "pykata.toml")
        ctd.start()
        config = load_config()
        assert config.factory.pool_nics == 1 and config.runtime.runtime_path == run
        ctd.import_images(tmp_path_factory.mktemp("cache"))
        yield ctd
    finally:
        ctd.stop()
        if "PYKATA_CONFIG" in os.environ and os.environ["PYKATA_CONFIG"] == str(ctd.dir / "pykata.toml"):
            pool.destroy(load_config())
        if before is None:
            os.environ.pop("PYKATA_CONFIG", None)
        else:
            os.environ["PYKATA_CONFIG"] = before
    assert not _processes_under(run), "a pooled VM outlived the pool"
    shutil.rmtree(run)


def _ready_entries(n: int, timeout: float = 120.0) -> list[pool.PoolEntry]:
    config = load_config()
    started = pool.fill(config, pool.entry_argv())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = [e for e in pool.list_entries(config) if e.ready and e.alive]
        if len(ready) >= n:
            return ready
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} pooled VMs ready after {timeout}s: {_pool_report(config, started)}")


def _pool_report(config: Any, started: int) -> str:
    """What the pool holds and why it may hold nothing: a waiting VM reports nowhere before a claim (its
    stdio is /dev/null), so a setup failure used to print only `[]`."""
    entries = pool.list_entries(config)
    lines = [f"fill() started {started} of pool_size {config.factory.pool_size} "
             f"(enable_template {config.factory.enable_template}; MemAvailable {pool.mem_available_mib()} MiB, "
             f"pool_min_free_mib {config.factory.pool_min_free_mib}: below it fill starts none)"]
    if not entries:
        lines.append(f"no entry registered in {pool.pool_root(config)}")
    for e in entries:
        files = sorted(p.name for p in e.sandbox_dir.rglob("*"))[:20] if e.sandbox_dir.is_dir() else []
        lines.append(f"{e.id}: pid {e.pid} alive {e.alive} ready {e.ready} "
                     f"fingerprint {'ours' if e.fingerprint == pool.fingerprint(config) else 'another'}; "
                     f"age {time.time() - e.created_at:.0f}s; files {files}")
        console = next(iter(e.sandbox_dir.rglob("console.log")), None) if e.sandbox_dir.is_dir() else None
        if console is not None:
            lines.append(f"  console tail: {console.read_text(errors='replace')[-600:]!r}")
    return "\n".join(lines)


def _processes_under(directory: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if str(directory) in " ".join(p.info["cmdline"] or []):
                found.append(p)
    return found


def _qemu_of(entry: pool.PoolEntry) -> list[psutil.Process]:
    """The QEMU process itself (not its lifeline wrappers, whose command lines name it too)."""
    found = []
    for p in _processes_under(entry.sandbox_dir):
        with contextlib.suppress(psutil.Error):
            if p.name().startswith("qemu-system"):
                found.append(p)
    return found


def _netns_links(pid: int) -> set[str]:
    """The network namespaces (net:[inode]) process `pid` holds by an fd: a waiting shim's holding one."""
    found = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("net:["):
                    found.add(link)
    return found


def _holders(link: str) -> list[str]:
    """Every process namespace or fd on the host still referring to the namespace `link`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for entry in [proc / "ns" / "net", *(proc / "fd").iterdir()]:
                with contextlib.suppress(OSError):
                    if os.readlink(entry) == link:
                        found.append(f"{entry}")
    return found


def _cni_netns() -> set[str]:
    return {p.name for p in Path("/var/run/netns").glob("cni-*")}


def _pod(cri: Cri, name: str, command: list[str]) -> contextlib.AbstractContextManager[tuple[str, str]]:
    return one_container_pod(cri, name, "pykata", command)  # its leftovers: _gone, by pool entry


def _gone(entries: list[pool.PoolEntry], within: float = 20.0) -> list[str]:
    """What is left of claimed pooled VMs: processes, sandbox directories, host mounts."""
    deadline = time.monotonic() + within
    while True:
        left = [f"process {p.pid}" for e in entries for p in _processes_under(e.sandbox_dir)]
        left += [f"dir {e.sandbox_dir}" for e in entries if e.sandbox_dir.exists()]
        mounts = Path("/proc/self/mountinfo").read_text()
        left += [f"mount of {e.id}" for e in entries if e.id in mounts]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


@pytest.mark.vm
def test_pooled_cri_pods_have_working_networking_and_never_share_a_vm(pooled_cri: CriContainerd,
                                                                      tmp_path: Path) -> None:
    entries = _ready_entries(POOL_SIZE)
    holding = {e.id: _netns_links(e.pid) for e in entries}
    assert all(len(links) == 1 for links in holding.values()), holding
    token = f"pykata-pool-{time.time_ns()}"
    (tmp_path / "token").write_text(token)
    # a server in a test-made namespace (containerd's, where CNI's bridge is), reached from the pods
    server = subprocess.Popen(["ip", "netns", "exec", pooled_cri.netns, "python3", "-m", "http.server",
                               str(HTTP_PORT), "--bind", BRIDGE_IP, "--directory", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with Cri(pooled_cri.socket) as cri, _pod(cri, "pool-a", ["sleep", "3600"]) as (a_id, a_cid), \
                _pod(cri, "pool-b", ["nc", "-ll", "-p", "7780", "-e", "cat"]) as (b_id, b_cid):
            log = pooled_cri.log.read_text()
            # (the second pod may take a VM the first one's shim refilled the pool with)
            ids = re.findall(r"claimed from the warm pool \((pool-[0-9a-f]+)\) for network namespace", log)
            assert len(ids) == 2 and ids[0] != ids[1], f"both pods should have taken a pooled VM: {ids}"
            assert log.count("taking the VM from the warm pool") == 2
            claimed = [pool.PoolEntry(i, entries[0].root, 0, "", 0.0) for i in ids]
            for e in claimed:
                holding.setdefault(e.id, set())
            # never shared: two pods, two VMs, each with one QEMU of its own
            qemus = [{p.pid for p in _qemu_of(e)} for e in claimed]
            assert [len(q) for q in qemus] == [1, 1] and qemus[0] != qemus[1]
            boot_ids = {exec_ok(cri, c, ["cat", "/proc/sys/kernel/random/boot_id"]).strip() for c in (a_cid, b_cid)}
            assert len(boot_ids) == 2, "two pooled pods share a boot id"
            for pod_id, cid in ((a_id, a_cid), (b_id, b_cid)):
                netns = cri.pod_netns(pod_id)
                assert netns is not None
                ns = Path(netns).name
                veth_mac = sh("ip", "-n", ns, "-o", "link", "show", "eth0").split("link/ether ")[1].split()[0]
                assert exec_ok(cri, cid, ["cat", "/sys/class/net/eth0/address"]).strip() == veth_mac
                assert "inet " + cri.pod_ip(pod_id) in exec_ok(cri, cid, ["ip", "-o", "-4", "addr", "show", "eth0"])
                assert "Redirect to device tap0_kata" in sh("ip", "netns", "exec", ns, "tc", "filter", "show",
                                                            "dev", "eth0", "ingress")
                got = ""
                for _ in range(20):  # the server may still be binding
                    reply = cri.exec_sync(cid, ["wget", "-q", "-O", "-", f"http://{BRIDGE_IP}:{HTTP_PORT}/token"])
                    got = reply.stdout.decode()
                    if reply.exit_code == 0:
                        break
                    time.sleep(0.5)
                assert got == token
            b_ip = cri.pod_ip(b_id)
            out = ""
            for _ in range(20):
                with contextlib.suppress(AssertionError):
                    out = exec_ok(cri, a_cid, ["sh", "-c", f"echo pod-to-pod | nc -w 5 {b_ip} 7780"])
                    if out:
                        break
                time.sleep(0.5)
            assert out.strip() == "pod-to-pod"
            # The holding namespaces went to their VMs' taps at hand-over: no process holds one by an
            # fd or lives in it. Checked now, while the namespace still exists (QEMU's tap file, opened
            # in it, holds it, invisibly to /proc): once it ends, its inode number is the next new
            # namespace's on this host (any namespace: lowest free number first), and a check then
            # finds whatever other process lives in that one.
            for e in claimed:
                for link in holding[e.id]:
                    assert _holders(link) == [], f"{e.id}'s holding namespace is still held: {_holders(link)}"
    finally:
        server.terminate()
        server.wait(10)
    assert _gone(claimed) == []  # the holding namespaces went with their VMs' taps
    assert "_kata" not in sh("ip", "-o", "link") + sh("ip", "-n", pooled_cri.netns, "-o", "link")


@pytest.mark.vm
def test_a_pod_that_does_not_fit_the_pool_boots_its_own_vm_on_its_network(pooled_cri: CriContainerd) -> None:
    """A claimed shim whose pod does not fit the pooled VM (here: the pod names another configuration
    file, which differs in a key the VM template does not depend on, so its own VM is a clone too, not a
    slow cold boot) stops that VM, says why, and starts one the normal way, on the pod's namespace handed
    over as an fd."""
    entry = _ready_entries(1)[0]
    other = pooled_cri.pod_configs / "other.toml"
    text = (pooled_cri.dir / "pykata.toml").read_text()
    other.write_text(re.sub(r"(?m)^pool_min_free_mib\s*=.*$", "pool_min_free_mib = 2047", text))
    config = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name="pool-misfit", uid="uid-pool-misfit", namespace="pykata-test"),
        hostname="pool-misfit", annotations={"io.katacontainers.config_path": str(other)},
        linux=api_pb2.LinuxPodSandboxConfig())
    with Cri(pooled_cri.socket) as cri:
        pod_id = str(cri.rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config, runtime_handler="pykata"),
                                          timeout=cri.timeout).pod_sandbox_id)
        try:
            cid = cri.create_container(pod_id, config, "c", BUSYBOX_IMAGE, ["sleep", "3600"])
            cri.start_container(cid)
            log = pooled_cri.log.read_text()
            claimed = re.findall(rf"claimed from the warm pool \((pool-[0-9a-f]+)\)[^\n]*sandbox={pod_id}", log)
            assert claimed, "the pod's shim was not claimed from the pool"
            assert "the pooled VM does not fit this pod (its configuration differs" in log
            assert "inet " + cri.pod_ip(pod_id) in exec_ok(cri, cid, ["ip", "-o", "-4", "addr", "show", "eth0"])
            assert "1 packets received" in exec_ok(cri, cid, ["ping", "-c", "1", "-W", "5", BRIDGE_IP])
        finally:
            cri.stop_pod(pod_id)
            cri.remove_pod(pod_id)
    assert wait_gone(pooled_cri, pod_id) == []
    gone = [pool.PoolEntry(i, entry.root, 0, "", 0.0) for i in claimed]
    assert _gone(gone) == []


@pytest.mark.vm
def test_a_pod_killed_during_hand_out_leaves_nothing(pooled_cri: CriContainerd) -> None:
    entries = _ready_entries(POOL_SIZE)
    holding = {e.id: _netns_links(e.pid) for e in entries}
    # every waiting VM frozen: the pod's shim moves the tap into the pod, then waits on its VM to resume
    stopped = [p for e in entries for p in _qemu_of(e)]
    for p in stopped:
        p.send_signal(signal.SIGSTOP)
    before = _cni_netns()
    result: dict[str, Any] = {}

    def run_pod() -> None:
        with Cri(pooled_cri.socket) as cri:
            try:
                result["pod"] = cri.run_pod("pool-killed", "pykata")
            except grpc.RpcError as e:
                result["error"] = e

    thread = threading.Thread(target=run_pod)
    thread.start()
    try:
        pod_ns = None
        deadline = time.monotonic() + 60
        while pod_ns is None and time.monotonic() < deadline:
            for ns in _cni_netns() - before:
                with contextlib.suppress(subprocess.CalledProcessError):
                    if "tap0_kata" in sh("ip", "-n", ns, "-o", "link"):
                        pod_ns = ns
            time.sleep(0.02)
        assert pod_ns is not None, "the pooled VM's tap never reached the pod's namespace"
        claimed = [e for e in entries if not e.meta.exists()]
        assert len(claimed) == 1
        os.kill(claimed[0].pid, signal.SIGKILL)  # the pod's shim, in the middle of the hand-out
    finally:
        for p in stopped:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGCONT)
        thread.join(90)
    assert not thread.is_alive()
    assert "error" in result, "the pod started although its shim was killed"
    assert _gone(claimed) == []
    [link] = holding[claimed[0].id]
    assert _holders(link) == [], "the killed VM's holding namespace is still held"
    # containerd removed the failed pod's namespace; whatever happens, no tap of the pod is left
    if Path(f"/var/run/netns/{pod_ns}").exists():
        assert "tap0_kata" not in sh("ip", "-n", pod_ns, "-o", "link")
    with Cri(pooled_cri.socket) as cri:
        assert [p.id for p in cri.list_pods() if p.metadata.name == "pool-killed"] == []
    assert "_kata" not in sh("ip", "-o", "link") + sh("ip", "-n", pooled_cri.netns, "-o", "link")


@pytest.mark.vm
def test_pool_destroy_ends_the_holding_namespaces(pooled_cri: CriContainerd) -> None:
    entries = _ready_entries(1)
    holding = {link for e in entries for link in _netns_links(e.pid)}
    assert len(holding) == len(entries)
    subprocess.run([str(VENV_BIN / "pykata"), "factory", "pool", "destroy"], check=True, timeout=60,
                   capture_output=True)
    assert [e for e in pool.list_entries(load_config()) if e.alive] == []
    for link in holding:
        assert _holders(link) == [], f"holding namespace {link} outlived `pykata factory pool destroy`"
    assert _gone(entries) == []
