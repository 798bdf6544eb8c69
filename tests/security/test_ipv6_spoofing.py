"""IPv6 attacks from inside a pod's VM on a dual-stack CNI network (the bridge plugin with host-local
IPv4 and IPv6 ranges, through containerd's CRI: tests/cri/harness.py).

The attacker owns its guest: the test runs Python as the guest's root through the debug console (which
only this test's admin configuration enables) and writes forged frames with a raw packet socket on the
guest's eth0. What leaves the VM is watched on the host end of the attacker's veth (in containerd's
network namespace, the test's own). The tap's check (pykata.network.antispoof) must drop every forged
frame while the pods' honest IPv6 works (DAD, neighbor discovery, link-local and global addresses:
a ping over IPv6 between the pods and to the gateway), and the victim pod's guest must be unchanged. A
control without the check shows the attack is real: the Router Advertisement then gives the victim a
route through the attacker.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cri_api.v1 import api_pb2

from tests.cri.harness import BUSYBOX_IMAGE, CNI_CONF_DUAL_STACK, Cri, CriContainerd, running_cri_containerd, wait_gone

PYKATA = str(Path(__file__).resolve().parents[2] / ".venv/bin/pykata")
GATEWAY6 = "fd00:254::1"  # the bridge's address (isGateway), the first of the IPv6 range
EVIL_PREFIX = "fd00:bad"
EVIL_HEX = "fd000bad00000000"  # as /proc/net/ipv6_route writes its /64
# the guest's Python is the one its init (PID 1, the agent's) runs
GUEST_PYTHON = ("sh", "-c", 'exec "$(readlink /proc/1/exe)" "$@"', "python")

# Runs as root in the attacker's guest: forged frames out of eth0, printed as hex (name, frame).
ATTACK = r'''
import json, socket, struct, sys
a = json.loads(sys.argv[1])
mac = bytes.fromhex(open("/sys/class/net/eth0/address").read().strip().replace(":", ""))
victim_mac = bytes.fromhex(a["victim_mac"].replace(":", ""))
p6 = lambda s: socket.inet_pton(socket.AF_INET6, s)
ll = bytes([0xfe, 0x80]) + bytes(6) + bytes([mac[0] ^ 2]) + mac[1:3] + b"\xff\xfe" + mac[3:]
own_ll = socket.inet_ntop(socket.AF_INET6, ll)
def csum(data):
    data += b"\0" * (len(data) % 2)
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
def l4(src, dst, nh, body, at):
    c = csum(p6(src) + p6(dst) + struct.pack("!I3xB", len(body), nh) + body)
    return body[:at] + struct.pack("!H", c) + body[at + 2:]
def ip6(src, dst, nh, payload):
    return struct.pack("!IHBB", 6 << 28, len(payload), nh, 255) + p6(src) + p6(dst) + payload
def frame(dst_mac, src, dst, nh, body, at):
    return dst_mac + mac + b"\x86\xdd" + ip6(src, dst, nh, l4(src, dst, nh, body, at))
allnodes_mac = bytes.fromhex("333300000001")
udp = lambda data: struct.pack("!HHHH", 40000, 7, 8 + len(data), 0) + data
na = lambda target, lladdr: bytes([136, 0, 0, 0, 0x20, 0, 0, 0]) + p6(target) + bytes([2, 1]) + lladdr
ns = lambda target: bytes([135, 0, 0, 0, 0, 0, 0, 0]) + p6(target) + bytes([14, 1]) + b"nonce!"
prefix = p6(a["evil_prefix"] + "::")
ra = (bytes([134, 0, 0, 0, 64, 0]) + struct.pack("!H", 1800) + bytes(8)
      + bytes([3, 4, 64, 0xC0]) + struct.pack("!II", 86400, 14400) + bytes(4) + prefix
      + bytes([1, 1]) + mac)
frames = {
    "victim-source": frame(victim_mac, a["victim"], a["gateway"], 17, udp(b"as the victim"), 6),
    "gateway-source": frame(victim_mac, a["gateway"], a["victim"], 17, udp(b"as the gateway"), 6),
    "advert-victims-address": frame(allnodes_mac, own_ll, "ff02::1", 58, na(a["victim"], mac), 2),
    "advert-gateways-address": frame(victim_mac, a["own"], a["victim"], 58, na(a["gateway"], mac), 2),
    "dad-probe-for-victims-address": frame(allnodes_mac, "::", "ff02::1", 58, ns(a["victim"]), 2),
    "dad-answer-for-victims-address": frame(allnodes_mac, "::", "ff02::1", 58, na(a["victim"], mac), 2),
    "router-advert": frame(allnodes_mac, own_ll, "ff02::1", 58, ra, 2),
}
only = a.get("only")
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
for name, f in frames.items():
    if only is None or name in only:
        for _ in range(3):
            s.send(f)
        print(name, f.hex())
'''

# Runs in containerd's network namespace (the test's own): frames out of one interface, as hex lines.
SNIFF = r'''
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((sys.argv[1], 0))
s.settimeout(0.2)
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    try:
        data, addr = s.recvfrom(65536)
    except TimeoutError:
        continue
    if addr[2] != socket.PACKET_OUTGOING:
        print(data.hex(), flush=True)
'''


@pytest.fixture(scope="module")
def ctd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CriContainerd]:
    with running_cri_containerd(tmp_path_factory.mktemp("cri6"), tmp_path_factory.mktemp("cache"),
                                cni_conf=CNI_CONF_DUAL_STACK,
                                extra_config="agent.pykata.debug_console_enabled = true") as ctd:
        yield ctd


def in_guest(ctd: CriContainerd, pod_id: str, *argv: str) -> str:
    """`argv` as the root of pod `pod_id`'s guest (the debug console)."""
    p = subprocess.run([PYKATA, "sandbox", "exec", pod_id, "--", *argv], capture_output=True, timeout=120,
                       stdin=subprocess.DEVNULL, env={**os.environ, "PYKATA_CONFIG": str(ctd.dir / "pykata.toml")})
    assert p.returncode == 0, (argv[:2], p.stdout[-2000:], p.stderr[-2000:])
    return p.stdout.decode()


def settled(ctd: CriContainerd, pod_id: str) -> None:
    """Wait until none of the guest's IPv6 addresses is tentative: the pod's global address comes without
    duplicate address detection, its link-local one does it in the guest, and its local route appears
    when that ends (a route snapshot taken before would differ with no attack)."""
    deadline = time.monotonic() + 15
    while True:
        lines = in_guest(ctd, pod_id, "cat", "/proc/net/if_inet6").splitlines()
        if not [line for line in lines if int(line.split()[4], 16) & 0x40] or time.monotonic() > deadline:
            return
        time.sleep(0.2)


def routes_of(ctd: CriContainerd, pod_id: str) -> set[tuple[str, ...]]:
    """The guest's IPv6 routes: (destination, prefix length, next hop, device); not the use counts."""
    lines = in_guest(ctd, pod_id, "cat", "/proc/net/ipv6_route").splitlines()
    return {(f[0], f[1], f[4], f[9]) for f in (line.split() for line in lines) if len(f) == 10}


def ipv6_of(cri: Cri, pod_id: str) -> str:
    reply = cri.rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id), timeout=cri.timeout)
    found = [ip.ip for ip in reply.status.network.additional_ips if ":" in ip.ip]
    assert found, f"pod {pod_id} got no IPv6 address from CNI: {reply.status.network}"
    return str(found[0])


def host_end(ctd: CriContainerd, cri: Cri, pod_id: str) -> str:
    """The name of the pod's veth peer in containerd's namespace (on the bridge)."""
    netns = cri.pod_netns(pod_id)
    assert netns is not None
    out = subprocess.run(["nsenter", f"--net={netns}", "ip", "-o", "link", "show", "eth0"], check=True,
                         capture_output=True, text=True).stdout
    peer = out.split("@if", 1)[1].split(":", 1)[0]
    out = subprocess.run(["ip", "-n", ctd.netns, "-o", "link"], check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith(f"{peer}:"):
            return line.split(":")[1].strip().split("@")[0]
    raise AssertionError(f"no interface {peer} in {ctd.netns}")


def attack(ctd: CriContainerd, cri: Cri, attacker: str, args: dict[str, object]) -> tuple[dict[str, str], set[str]]:
    """Send the forged frames from the attacker's guest; (name -> frame hex, frames seen leaving the VM)."""
    sniffer = subprocess.Popen(["ip", "netns", "exec", ctd.netns, "python3", "-c", SNIFF,
                                host_end(ctd, cri, attacker), "40"], stdout=subprocess.PIPE, text=True)
    try:
        assert sniffer.stdout is not None and sniffer.stdout.readline().strip() == "ready"
        sent = dict(line.split() for line in in_guest(ctd, attacker, *GUEST_PYTHON, "-c", ATTACK,
                                                      json.dumps(args)).splitlines())
        time.sleep(2)
    finally:
        sniffer.terminate()
        seen_text, _ = sniffer.communicate(timeout=30)
    return sent, set(seen_text.split())


@pytest.mark.vm
def test_a_guest_cannot_spoof_ipv6_sources_neighbor_discovery_or_router_adverts(ctd: CriContainerd) -> None:
    with Cri(ctd.socket) as cri:
        pods: list[str] = []
        try:
            cids = []
            for name in ("v6-attacker", "v6-victim"):
                pod_id, config = cri.run_pod(f"{name}-{os.getpid()}", "pykata")
                pods.append(pod_id)
                cid = cri.create_container(pod_id, config, "c", BUSYBOX_IMAGE, ["sleep", "3600"])
                cri.start_container(cid)
                cids.append(cid)
            attacker, victim = pods
            own, victim_ip = ipv6_of(cri, attacker), ipv6_of(cri, victim)
            # honest IPv6 works through the check: DAD done, neighbor discovery, global addresses
            for cid, dst in ((cids[0], victim_ip), (cids[0], GATEWAY6), (cids[1], own)):
                reply = cri.exec_sync(cid, ["ping", "-6", "-c", "1", "-W", "10", dst], timeout=60)
                assert reply.exit_code == 0, (dst, reply.stdout, reply.stderr)
            victim_mac = in_guest(ctd, victim, "cat", "/sys/class/net/eth0/address").strip()
            settled(ctd, victim)
            routes_before = routes_of(ctd, victim)
            args = {"own": own, "victim": victim_ip, "victim_mac": victim_mac, "gateway": GATEWAY6,
                    "evil_prefix": EVIL_PREFIX}

            sent, seen = attack(ctd, cri, attacker, args)
            assert len(sent) == 7, sent
            assert not {name for name, f in sent.items() if f in seen}, "forged frames left the VM"
            # the victim kept its address (no DAD failure) and took no route from the attacker
            addrs = {line.split()[0]: int(line.split()[4], 16)
                     for line in in_guest(ctd, victim, "cat", "/proc/net/if_inet6").splitlines()}
            flags = addrs.get(ipaddress.IPv6Address(victim_ip).exploded.replace(":", ""))
            assert flags is not None and flags & 0x48 == 0, addrs  # IFA_F_TENTATIVE | IFA_F_DADFAILED
            routes = routes_of(ctd, victim)
            assert routes == routes_before and not [r for r in routes if r[0].startswith(EVIL_HEX)], routes
            reply = cri.exec_sync(cids[1], ["ping", "-6", "-c", "1", "-W", "10", GATEWAY6], timeout=60)
            assert reply.exit_code == 0, (reply.stdout, reply.stderr)

            # control: without the check the Router Advertisement leaves the VM and the victim takes it
            netns = cri.pod_netns(attacker)
            subprocess.run(["nsenter", f"--net={netns}", "tc", "filter", "del", "dev", "tap0_kata", "ingress",
                            "prio", "1"], check=True)
            sent, seen = attack(ctd, cri, attacker, {**args, "only": ["router-advert"]})
            assert sent["router-advert"] in seen
            deadline = time.monotonic() + 30
            while not [r for r in routes_of(ctd, victim) if r[0].startswith(EVIL_HEX)]:
                assert time.monotonic() < deadline, "the victim ignored the unfiltered Router Advertisement"
                time.sleep(1)
        finally:
            for pod_id in pods:
                cri.stop_pod(pod_id)
                cri.remove_pod(pod_id)
    for pod_id in pods:
        left = wait_gone(ctd, pod_id)
        assert not left, f"pod {pod_id} left {left}"
