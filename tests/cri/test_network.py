"""Pod networking through CRI: CNI's bridge plugin makes the pod's veth; the pykata shim hands it to the
VM (tap + tc mirred, pykata.network) and the agent gives the guest NIC the veth's identity."""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

import pytest

from tests.cri.harness import Cri, CriContainerd, one_container_pod

BRIDGE_IP = "10.254.0.1"  # the bridge plugin's gateway address, in containerd's network namespace
ECHO_PORT = 7777
HTTP_PORT = 7778


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout


def pod(cri: Cri, ctd: CriContainerd, name: str, handler: str,
        command: list[str]) -> contextlib.AbstractContextManager[tuple[str, str]]:
    """A pod with one busybox container running `command`; nothing of it may be left afterwards."""
    return one_container_pod(cri, name, handler, command, ctd)


def exec_ok(cri: Cri, cid: str, cmd: list[str]) -> str:
    reply = cri.exec_sync(cid, cmd, timeout=30)
    assert reply.exit_code == 0, f"{cmd}: exit {reply.exit_code}: {reply.stdout!r} {reply.stderr!r}"
    return reply.stdout.decode()


def no_taps(ctd: CriContainerd) -> list[str]:
    """Taps named like pykata's anywhere in the host's or containerd's namespace (pods' are gone)."""
    out = sh("ip", "-o", "link") + sh("ip", "-n", ctd.netns, "-o", "link")
    return [line for line in out.splitlines() if "_kata" in line]


@pytest.mark.vm
@pytest.mark.parametrize("handler", ["runc", "pykata"])
def test_two_pods_on_the_bridge_reach_each_other(cri_containerd: CriContainerd, handler: str) -> None:
    with Cri(cri_containerd.socket) as cri:
        server_cmd = ["nc", "-ll", "-p", str(ECHO_PORT), "-e", "cat"]
        with pod(cri, cri_containerd, f"net-b-{handler}", handler, server_cmd) as (b_id, _), \
                pod(cri, cri_containerd, f"net-a-{handler}", handler, ["sleep", "3600"]) as (a_id, a_cid):
            b_ip = cri.pod_ip(b_id)
            assert b_ip.startswith("10.254.0.") and b_ip != cri.pod_ip(a_id)
            out = ""
            for _ in range(20):  # the server container may still be starting
                with contextlib.suppress(AssertionError):
                    out = exec_ok(cri, a_cid, ["sh", "-c", f"echo hello-{handler} | nc -w 5 {b_ip} {ECHO_PORT}"])
                    if out:
                        break
                time.sleep(0.5)
            assert out.strip() == f"hello-{handler}"
            assert "1 packets received" in exec_ok(cri, a_cid, ["ping", "-c", "1", "-W", "5", b_ip])
            if handler == "pykata":
                netns = cri.pod_netns(a_id)
                assert netns is not None
                ns = Path(netns).name
                # the guest NIC carries the veth's identity; the veth's traffic goes to the tap
                veth_mac = sh("ip", "-n", ns, "-o", "link", "show", "eth0").split("link/ether ")[1].split()[0]
                assert exec_ok(cri, a_cid, ["cat", "/sys/class/net/eth0/address"]).strip() == veth_mac
                assert "Redirect to device tap0_kata" in sh("ip", "netns", "exec", ns, "tc", "filter", "show",
                                                            "dev", "eth0", "ingress")
                assert "inet " + cri.pod_ip(a_id) in exec_ok(cri, a_cid, ["ip", "-o", "-4", "addr", "show", "eth0"])
        assert not Path(netns if handler == "pykata" else "/nonexistent").exists()
        assert no_taps(cri_containerd) == []


@pytest.mark.vm
def test_pod_reaches_a_server_on_the_bridge_address(cri_containerd: CriContainerd, tmp_path: Path) -> None:
    token = f"pykata-{time.time_ns()}"
    (tmp_path / "token").write_text(token)
    server = subprocess.Popen(
        ["ip", "netns", "exec", cri_containerd.netns, "python3", "-m", "http.server", str(HTTP_PORT),
         "--bind", BRIDGE_IP, "--directory", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with Cri(cri_containerd.socket) as cri, \
                pod(cri, cri_containerd, "net-host", "pykata", ["sleep", "3600"]) as (_, cid):
            url = f"http://{BRIDGE_IP}:{HTTP_PORT}/token"
            got = ""
            for _ in range(20):  # the server may still be binding
                reply = cri.exec_sync(cid, ["wget", "-q", "-O", "-", url], timeout=30)
                got = reply.stdout.decode()
                if reply.exit_code == 0:
                    break
                time.sleep(0.5)
            assert got == token
    finally:
        server.terminate()
        server.wait(10)
    assert no_taps(cri_containerd) == []
