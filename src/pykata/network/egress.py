"""An SDK sandbox's outbound network policy, enforced on the host by the VMM's own uid.

A sandbox with `network="egress"` gets one NIC on a user-mode network: libslirp inside the jailed
QEMU (hypervisor.qemu.user_network = "slirp"), or passt beside a QEMU that has an empty network
namespace ("passt", pykata.hypervisor.qemu.passt). Every connection the guest makes becomes a
socket that QEMU, or passt, opens on the host, and each runs as a uid of its own per VM
(pykata.hypervisor.jail; Hypervisor.user_net_uid). So the policy is an iptables chain that the
host's OUTPUT chain jumps to for that uid only (`-m owner --uid-owner`): what the guest does
cannot change it, and it applies to TCP, UDP and ICMP alike. The chain, in order:

1. packets of connections already accepted (and the answers of `expose`d ports) pass;
2. the caller's `deny` entries, then the host's own addresses (any local address of the node,
   loopback, which the guest's gateway 10.0.2.2 stands for, link-local, multicast, the rest of the
   guest's own network 10.0.2.0/24, the ranges in ALWAYS_DENIED) are rejected: deny wins over allow,
   and the guest can reach neither the host's services nor another sandbox's exposed ports;
3. the resolvers of `dns` on port 53, then the caller's `allow` entries (none given: everything
   left) are accepted;
4. everything else is rejected.

IPv6 is off in the guest's network and every IPv6 packet of that uid is rejected. The chain is made
before QEMU starts (so the guest never runs unfiltered) and removed after it ended.

An owner killed with SIGKILL cannot remove its rules: its QEMU (and passt) die with it (lifelines),
the rules stay. So each jump's comment names its owner process (pid and start time: a reused pid is another
process) and `sweep()` removes the rules whose owner is gone and whose VMM (or passt) no longer runs; the
sandbox's reaper (pykata.sandbox.reaper) calls it for its sandbox once the owner died, and the next egress
sandbox and `pykata cleanup` for all (a reaper killed too). A rule whose owner still lives is never touched, whatever
runtime directory or configuration made it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import itertools
import logging
import os
import re
import shlex
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePath

import psutil

from pykata.errors import InvalidArgument, PykataError
from pykata.fsutil import start_ticks
from pykata.ids import names_vm
from pykata.protocols.agent import agent_pb2

# Never reachable from a sandbox, whatever `allow` says: this host and the networks pods and
# services live on (containerd's and the common CNI defaults, Kubernetes' service range).
# 10.0.2.0/24 is the guest's own network: its gateway stands for the host's loopback (libslirp and
# passt map it there) and nothing else of it is outside.
ALWAYS_DENIED = ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
                 "10.88.0.0/16", "10.244.0.0/16", "10.96.0.0/12", "10.85.0.0/16", "10.0.2.0/24")
CHAIN_PREFIX = "PYKATA-"  # what the leak check and operators look for
MAX_RULES = 256
_PORTS = re.compile(r"^(\d{1,5})(?:-(\d{1,5}))?$")
_IPTABLES_TIMEOUT = 30.0
_OWNER = re.compile(r"^pykata sandbox (\S+) owner (\d+):(\d+)$")

log = logging.getLogger(__name__)


class EgressError(PykataError):
    """The host's filter rules for a sandbox could not be made or removed."""


@dataclass(frozen=True)
class Destination:
    """One `allow` or `deny` entry: a network, and optionally a port range (TCP and UDP)."""

    network: ipaddress.IPv4Network
    ports: tuple[int, int] | None = None

    @classmethod
    def parse(cls, text: str, field: str) -> Destination:
        """"203.0.113.0/24", "192.0.2.7", "192.0.2.7:443", "0.0.0.0/0:8000-8100".

        Raises InvalidArgument naming `field`.
        """
        if not isinstance(text, str) or not text or len(text) > 64:
            raise InvalidArgument(field, f"{text!r} is not an address (CIDR[:port[-port]])")
        addr, sep, ports = text.partition(":")
        try:
            network = ipaddress.IPv4Network(addr, strict=False)
        except ValueError:
            raise InvalidArgument(field, f"{text!r} is not an IPv4 address or CIDR "
                                  "(IPv6 is off in a sandbox's network)") from None
        if not sep:
            return cls(network)
        m = _PORTS.match(ports)
        low, high = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (0, 0)
        if not m or not 0 < low <= high <= 65535:
            raise InvalidArgument(field, f"{text!r}: bad port or port range (1-65535)")
        return cls(network, (low, high))

    def __str__(self) -> str:
        """The text parse() reads back."""
        if self.ports is None:
            return str(self.network)
        low, high = self.ports
        return f"{self.network}:{low}" if low == high else f"{self.network}:{low}-{high}"

    def matches(self) -> list[str]:
        """iptables match arguments: one line per protocol when ports are given."""
        if self.ports is None:
            return [f"-d {self.network}"]
        low, high = self.ports
        span = str(low) if low == high else f"{low}:{high}"
        return [f"-d {self.network} -p {proto} -m {proto} --dport {span}" for proto in ("tcp", "udp")]


@dataclass(frozen=True)
class EgressPolicy:
    """What a sandbox may reach. `allow=None`: everything that is not denied."""

    allow: tuple[Destination, ...] | None = None
    deny: tuple[Destination, ...] = ()
    dns: tuple[ipaddress.IPv4Address, ...] = ()

    @classmethod
    def build(cls, *, allow: Iterable[str] | None = None, deny: Iterable[str] = (),
              dns: Iterable[str] = ()) -> EgressPolicy:
        """Check and parse the caller's lists. Raises InvalidArgument naming the bad field."""
        allowed = None if allow is None else tuple(Destination.parse(a, "allow") for a in _items(allow, "allow"))
        denied = tuple(Destination.parse(d, "deny") for d in _items(deny, "deny"))
        resolvers = []
        for r in _items(dns, "dns"):
            try:
                resolvers.append(ipaddress.IPv4Address(r))
            except ValueError:
                raise InvalidArgument("dns", f"{r!r} is not an IPv4 address") from None
        if len(denied) + len(allowed or ()) + len(resolvers) > MAX_RULES:
            raise InvalidArgument("allow/deny/dns", f"more than {MAX_RULES} entries")
        return cls(allowed, denied, tuple(resolvers))


    def to_json(self) -> dict[str, list[str] | None]:
        """The policy as build() takes it (a snapshot's manifest keeps it so)."""
        return {"allow": None if self.allow is None else [str(d) for d in self.allow],
                "deny": [str(d) for d in self.deny], "dns": [str(r) for r in self.dns]}


def _items(values: Iterable[str] | str, field: str) -> list[str]:
    if isinstance(values, str):
        raise InvalidArgument(field, "give a list of addresses, not one string")
    return list(values)


def chain_name(sandbox_id: str) -> str:
    """The sandbox's chain: a digest, since chain names are at most 28 characters."""
    return CHAIN_PREFIX + hashlib.sha256(sandbox_id.encode()).hexdigest()[:16]


def owner_tag(pid: int | None = None) -> str:
    """`<pid>:<start ticks>` of process `pid` (this one by default): names one process for good."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{start_ticks(pid) or 0}"


def _jump(uid: int, sandbox_id: str, target: str, owner: str | None = None) -> str:
    comment = f"pykata sandbox {sandbox_id} owner {owner or owner_tag()}"
    return f'OUTPUT -m owner --uid-owner {uid} -m comment --comment "{comment}" -j {target}'


def _reject(match: str) -> list[str]:
    """A TCP connection is refused with a reset (QEMU's connect fails at once and the guest gets a
    reset too), anything else with ICMP port unreachable."""
    m = f"{match} " if match else ""
    if "-p tcp" in match:
        return [f"{m}-j REJECT --reject-with tcp-reset"]
    if "-p udp" in match:
        return [f"{m}-j REJECT"]
    return [f"{m}-p tcp -j REJECT --reject-with tcp-reset", f"{m}-j REJECT"]


def render(policy: EgressPolicy, uid: int, sandbox_id: str) -> str:
    """The iptables-restore text (IPv4 filter table) that installs the sandbox's chain and its jump."""
    chain = chain_name(sandbox_id)
    rules = ["-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"]
    rules += [r for d in policy.deny for m in d.matches() for r in _reject(m)]
    rules += _reject("-m addrtype --dst-type LOCAL")
    rules += [r for net in ALWAYS_DENIED for r in _reject(f"-d {net}")]
    rules += [f"-d {r}/32 -p {p} -m {p} --dport 53 -j ACCEPT" for r in policy.dns for p in ("udp", "tcp")]
    if policy.allow is None:
        rules.append("-j ACCEPT")
    else:
        rules += [f"{m} -j ACCEPT" for d in policy.allow for m in d.matches()]
    rules += _reject("")
    lines = ["*filter", f":{chain} - [0:0]", *(f"-A {chain} {r}" for r in rules), f"-I {_jump(uid, sandbox_id, chain)}",
             "COMMIT", ""]
    return "\n".join(lines)


async def _restore(tool: str, text: str) -> None:
    binary = shutil.which(tool)
    if binary is None:
        raise EgressError(f"{tool} is not installed (needed for a sandbox's egress policy)")
    proc = await asyncio.create_subprocess_exec(binary, "--noflush", "--wait", stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(text.encode()), _IPTABLES_TIMEOUT)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if proc.returncode != 0:
        raise EgressError(f"{tool}: {err.decode(errors='replace').strip()[:500]}")


async def install(policy: EgressPolicy, uid: int, sandbox_id: str) -> None:
    """Make the sandbox's chains (IPv4 policy; every IPv6 packet rejected) for the VMM's `uid`.

    Raises EgressError; nothing is left behind on failure.
    """
    if uid <= 0:
        raise EgressError("the VMM runs as root (hypervisor.qemu.jail_user off): its traffic cannot be told "
                          "apart from the host's, so a sandbox cannot have network='egress'")
    await _restore("iptables-restore", render(policy, uid, sandbox_id))
    try:
        await _restore("ip6tables-restore", "\n".join(["*filter", f"-I {_jump(uid, sandbox_id, 'REJECT')}",
                                                       "COMMIT", ""]))
    except BaseException:
        await asyncio.shield(remove(uid, sandbox_id))
        raise


async def remove(uid: int, sandbox_id: str, owner: str | None = None) -> None:
    """Remove what `install` made (in the process `owner` names: this one by default). Idempotent;
    raises EgressError if a rule that exists stays."""
    chain = chain_name(sandbox_id)
    errors = []
    for tool, lines in (("iptables-restore", [f"-D {_jump(uid, sandbox_id, chain, owner)}", f"-F {chain}",
                                              f"-X {chain}"]),
                        ("ip6tables-restore", [f"-D {_jump(uid, sandbox_id, 'REJECT', owner)}"])):
        for line in lines:  # one at a time: a rule already gone must not keep the others
            try:
                await _restore(tool, "\n".join(["*filter", line, "COMMIT", ""]))
            except EgressError as e:
                if "does not exist" not in str(e) and "No chain" not in str(e) and "Bad rule" not in str(e):
                    errors.append(str(e))
    if errors:
        raise EgressError(f"sandbox {sandbox_id}: removing its filter rules: {'; '.join(errors)}")


@dataclass(frozen=True)
class InstalledRule:
    """A sandbox's jump found in the host's OUTPUT chain."""

    sandbox_id: str
    uid: int
    owner: str  # pid:start ticks (owner_tag)

    def owner_gone(self) -> bool:
        pid, _, ticks = self.owner.partition(":")
        return start_ticks(int(pid)) != int(ticks)


def installed_rules(listing: str) -> list[InstalledRule]:
    """The sandbox jumps (with an owner in their comment) in `iptables -S` / `ip6tables -S` output."""
    found = []
    for line in listing.splitlines():
        if not line.startswith("-A OUTPUT ") or "pykata sandbox" not in line:
            continue
        try:
            args = shlex.split(line)
            comment = _OWNER.match(args[args.index("--comment") + 1])
            uid = int(args[args.index("--uid-owner") + 1])
        except (ValueError, IndexError):
            continue
        if comment:
            found.append(InstalledRule(comment.group(1), uid, f"{comment.group(2)}:{comment.group(3)}"))
    return found


def _vmm_running(uid: int, sandbox_id: str) -> bool:
    """Whether a process of `uid` still runs for the sandbox (its QEMU, or its passt, in the moment
    between its owner's death and its own)."""
    for proc in psutil.process_iter(["uids", "cmdline"]):
        with contextlib.suppress(psutil.Error, TypeError):
            argv = proc.info["cmdline"] or ()
            if proc.info["uids"].real == uid and (names_vm(argv, sandbox_id) or _names_passt(argv, sandbox_id)):
                return True
    return False


def _names_passt(argv: Sequence[str], sandbox_id: str) -> bool:
    """A passt of the sandbox: its one file argument, the log in the sandbox's VM directory, has the
    sandbox's id as a directory name (an exact path component: "sb1" never matches "sb12")."""
    return any(a == "--log-file" and sandbox_id in PurePath(v).parts[:-1] for a, v in itertools.pairwise(argv))


async def _listing(tool: str, *args: str) -> str:
    binary = shutil.which(tool)
    if binary is None:
        return ""
    proc = await asyncio.create_subprocess_exec(binary, "-w", "-S", *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.DEVNULL)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), _IPTABLES_TIMEOUT)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    return out.decode(errors="replace") if proc.returncode == 0 else ""


async def sweep(sandbox_id: str | None = None) -> list[str]:
    """Remove the filter rules of sandboxes whose owner process is gone (killed before it could) and
    whose VMM no longer runs; also chains no jump leads to (a removal cut short). `sandbox_id`: only
    that sandbox's (its reaper's sweep, pykata.sandbox.reaper). Returns the sandbox ids whose rules were
    removed. Raises EgressError when a rule that should go stays."""
    v4, v6 = await asyncio.gather(_listing("iptables"), _listing("ip6tables", "OUTPUT"))
    stale = {r for r in installed_rules(v4) + installed_rules(v6)
             if (sandbox_id is None or r.sandbox_id == sandbox_id) and r.owner_gone()}
    stale = {r for r in stale if not await asyncio.to_thread(_vmm_running, r.uid, r.sandbox_id)}
    for rule in sorted(stale, key=lambda r: r.sandbox_id):
        log.info("removing the filter rules of sandbox %s (its owner %s is gone)", rule.sandbox_id, rule.owner)
        await remove(rule.uid, rule.sandbox_id, rule.owner)
    jumped = {line.rsplit(" -j ", 1)[-1] for line in v4.splitlines() if line.startswith("-A OUTPUT ")}
    for chain in leftover_chains(v4):
        if sandbox_id is not None and chain != chain_name(sandbox_id):
            continue
        if chain not in jumped and chain not in {chain_name(r.sandbox_id) for r in stale}:
            with contextlib.suppress(EgressError):  # a concurrent removal may take it first
                await _restore("iptables-restore", "\n".join(["*filter", f"-F {chain}", f"-X {chain}", "COMMIT", ""]))
    return sorted({r.sandbox_id for r in stale})


def leftover_chains(listing: str) -> list[str]:
    """The pykata chains in `iptables -S` output (for leak checks)."""
    return sorted({line.split()[1] for line in listing.splitlines()
                   if line.startswith("-N ") and line.split()[1].startswith(CHAIN_PREFIX)})


GUEST_ADDRESS = "10.0.2.15"  # the user network (as QEMU's was): 10.0.2.0/24, the gateway at .2
GUEST_GATEWAY = "10.0.2.2"
GUEST_NIC = "eth0"


def guest_interface(mac: str) -> agent_pb2.Interface:
    """The guest NIC on the user network, as the agent configures it."""
    return agent_pb2.Interface(name=GUEST_NIC, current_hw_addr=mac, hw_addr=mac, mtu=1500, addresses=[
        agent_pb2.IPAddress(family=agent_pb2.IP_FAMILY_V4, address=GUEST_ADDRESS, prefix_length=24)])


def guest_routes() -> list[agent_pb2.Route]:
    return [agent_pb2.Route(dest="default", gateway=GUEST_GATEWAY, device=GUEST_NIC, family=agent_pb2.IP_FAMILY_V4)]
