"""What a (possibly hostile) guest may send out of its NIC: a small eBPF classifier on the tap's ingress.

On a shared bridge a frame with another pod's MAC or IPv4 address, or an ARP claim for it, steals that
pod's traffic; under runc a pod without CAP_NET_RAW cannot send one, but the guest's kernel belongs to
the workload. The program, attached before the redirect (tcfilter.redirect) in direct-action mode,
drops (TC_ACT_SHOT): a source MAC that is not the interface's (the guest NIC takes it); an EtherType
other than IPv4, ARP and IPv6 (802.1Q tags included); IPv4 from an address CNI did not give the pod;
ARP whose sender address is not one of those, or whose sender hardware address is not the pod's MAC.
Everything else goes on to the redirect (TC_ACT_UNSPEC).

IPv6 (Neighbor Discovery is IPv6's ARP, and Router Advertisements make a pod another pod's router): the
source must be one of the pod's IPv6 addresses or the link-local address the guest makes from the MAC
(EUI-64, what the agent's MAC change and link up give it), or unspecified (::) in Duplicate Address
Detection only: a Neighbor Solicitation whose target is the pod's own, or an MLD report behind the
hop-by-hop header. Router Advertisements and Redirects are dropped. A Neighbor Advertisement's target
must be the pod's own address (else it claims another pod's, or answers another pod's DAD probe and
takes its address away); so must a DAD probe's. A Neighbor Solicitation or Advertisement carries at most
one option, and a link-layer address in it is the pod's MAC. ICMPv6 hidden behind extension headers is
dropped but for MLD behind hop-by-hop and fragmented echo; routing, destination-options, AH, mobility,
HIP and shim6 headers are dropped; other payloads (TCP, UDP, ...) pass.

The host kernel may lack cls_basic, ematch and act_gact (this CI's has only u32, bpf and mirred), so it
is eBPF: a few dozen instructions assembled here, loaded with bpf(2).
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import struct
from collections.abc import Sequence

from pykata.network.tap import NetworkError

ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0800, 0x0806, 0x86DD
TC_ACT_UNSPEC, TC_ACT_SHOT = -1, 2
_SYS_BPF = 321  # x86_64
_BPF_PROG_LOAD = 5
_BPF_PROG_TYPE_SCHED_CLS = 3
# eBPF opcodes
_MOV64_X, _MOV64_K, _EXIT, _JA = 0xBF, 0xB7, 0x95, 0x05
_LD_ABS_W, _LD_ABS_H, _LD_ABS_B = 0x20, 0x28, 0x30
_AND32_K = 0x54
_JMP32_JEQ_K, _JMP32_JNE_K = 0x16, 0x56
_LOADS = (_LD_ABS_W, _LD_ABS_H, _LD_ABS_B)
_JUMPS = (_JMP32_JEQ_K, _JMP32_JNE_K)
# IPv6: offsets in the frame (14-byte Ethernet header first)
_IP6 = 14
_IP6_PAYLOAD_LEN, _IP6_NEXT, _IP6_SRC = _IP6 + 4, _IP6 + 6, _IP6 + 8
_L4 = _IP6 + 40  # the header after the fixed one
_HOPOPTS, _ROUTING, _FRAGMENT, _ESP, _AH, _ICMPV6, _DSTOPTS = 0, 43, 44, 50, 51, 58, 60
_MOBILITY, _HIP, _SHIM6 = 135, 139, 140
_TCP, _UDP = 6, 17
_ECHO_REQUEST, _ECHO_REPLY = 128, 129
_MLD_TYPES = (130, 131, 132, 143)  # query, report, done, MLDv2 report
_ROUTER_ADVERT, _NEIGH_SOLICIT, _NEIGH_ADVERT, _REDIRECT = 134, 135, 136, 137
_ND_FIXED = 24  # an NS/NA before its options: type, code, checksum, flags, target
_SRC_LLADDR, _TGT_LLADDR, _NONCE = 1, 2, 14
_R_UNSPECIFIED = 7  # callee-saved: LD_ABS clobbers r0-r5


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _imm32(value: int) -> int:
    """A 32-bit pattern as the signed immediate the instruction holds (JMP32 compares 32 bits)."""
    return value - (1 << 32) if value >= 1 << 31 else value


def link_local(mac: str) -> str:
    """The link-local address a Linux guest makes for `mac` (addr_gen_mode eui64, the default)."""
    raw = bytearray(bytes.fromhex(mac.replace(":", "")))
    raw[0] ^= 0x02
    return str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + bytes(raw[:3]) + b"\xff\xfe" + bytes(raw[3:])))


class _Asm:
    """Straight-line eBPF with forward jumps to named labels (no loops: the verifier wants none)."""

    def __init__(self) -> None:
        self.body: list[tuple[str, int, int, int, str | None]] = []  # (kind, code, dst, imm, target)
        self.labels = 0

    def op(self, code: int, imm: int = 0, target: str | None = None, dst: int = 0) -> None:
        self.body.append(("op", code, dst, imm, target))

    def label(self, name: str) -> None:
        self.body.append(("label", 0, 0, 0, name))

    def fresh(self) -> str:
        self.labels += 1
        return f"_l{self.labels}"

    def match16(self, offset: int, address: bytes, target: str) -> None:
        """Jump to `target` when the 16 bytes at `offset` are `address`; else fall through."""
        miss = self.fresh()
        for i in range(4):
            self.op(_LD_ABS_W, offset + 4 * i)
            word = _imm32(int.from_bytes(address[4 * i:4 * i + 4], "big"))
            self.op(_JMP32_JNE_K, word, miss)
        self.op(_JA, 0, target)
        self.label(miss)

    def assemble(self) -> bytes:
        positions: dict[str, int] = {}
        n = 1  # r6 = r1 first (LD_ABS reads the packet through r6)
        for kind, _, _, _, target in self.body:
            if kind == "label":
                assert target is not None
                positions[target] = n
            else:
                n += 1
        out = [_insn(_MOV64_X, dst=6, src=1)]
        pc = 1
        for kind, code, dst, imm, target in self.body:
            if kind == "label":
                continue
            if code in _LOADS:
                out.append(_insn(code, imm=imm))
            elif code == _JA:
                out.append(_insn(code, off=positions[target or ""] - pc - 1))
            elif code in _JUMPS:
                out.append(_insn(code, dst=dst, off=positions[target or ""] - pc - 1, imm=imm))
            elif code in (_MOV64_K, _AND32_K):
                out.append(_insn(code, dst=dst, imm=imm))
            else:
                out.append(_insn(code))
            pc += 1
        return b"".join(out)


def program(mac: str, ipv4: Sequence[str], ipv6: Sequence[str] = ()) -> bytes:
    """The instructions (see the module's docstring). LD_ABS reads the frame from its Ethernet header
    (tc pushes it back at ingress) in network byte order; a frame too short for a read ends the
    program with 0 (TC_ACT_OK: not redirected, the pod namespace's own stack drops it).

    Raises:
        NetworkError: a bad MAC or address.
    """
    try:
        raw = bytes.fromhex(mac.replace(":", ""))
        if len(raw) != 6:
            raise ValueError(mac)
        addresses = [_imm32(int(ipaddress.IPv4Address(a))) for a in ipv4]
        own6 = [ipaddress.IPv6Address(a).packed for a in (*ipv6, link_local(mac))]
    except ValueError as exc:
        raise NetworkError(f"anti-spoofing: bad MAC or address: {exc}") from None
    a = _Asm()
    op, label = a.op, a.label
    op(_LD_ABS_W, 6)
    op(_JMP32_JNE_K, _imm32(int.from_bytes(raw[:4], "big")), "drop")
    op(_LD_ABS_H, 10)
    op(_JMP32_JNE_K, int.from_bytes(raw[4:], "big"), "drop")
    op(_LD_ABS_H, 12)
    op(_JMP32_JEQ_K, ETH_P_IPV6, "ipv6")
    op(_JMP32_JEQ_K, ETH_P_IP, "ipv4")
    op(_JMP32_JEQ_K, ETH_P_ARP, "arp")
    op(_JA, 0, "drop")
    label("ipv4")
    op(_LD_ABS_W, 14 + 12)  # IPv4 source address
    op(_JA, 0, "address")
    label("arp")
    op(_LD_ABS_W, 14 + 8)  # ARP sender hardware address: the pod's MAC (else peers send its traffic elsewhere)
    op(_JMP32_JNE_K, _imm32(int.from_bytes(raw[:4], "big")), "drop")
    op(_LD_ABS_H, 14 + 12)
    op(_JMP32_JNE_K, int.from_bytes(raw[4:], "big"), "drop")
    op(_LD_ABS_W, 14 + 14)  # ARP sender protocol address
    label("address")
    for addr in addresses:
        op(_JMP32_JEQ_K, addr, "pass")
    op(_JA, 0, "drop")

    label("ipv6")
    op(_MOV64_K, 0, dst=_R_UNSPECIFIED)
    for own in own6:
        a.match16(_IP6_SRC, own, "source_ok")
    a.match16(_IP6_SRC, bytes(16), "unspecified")
    op(_JA, 0, "drop")
    label("unspecified")
    op(_MOV64_K, 1, dst=_R_UNSPECIFIED)
    label("source_ok")
    op(_LD_ABS_B, _IP6_NEXT)
    op(_JMP32_JEQ_K, _ICMPV6, "icmpv6")
    op(_JMP32_JEQ_K, _HOPOPTS, "hopopts")
    op(_JMP32_JNE_K, 0, "drop", dst=_R_UNSPECIFIED)  # :: is for DAD and MLD only
    op(_JMP32_JEQ_K, _FRAGMENT, "fragment")
    for header in (_ROUTING, _DSTOPTS, _AH, _MOBILITY, _HIP, _SHIM6):
        op(_JMP32_JEQ_K, header, "drop")
    op(_JA, 0, "pass")  # TCP, UDP, ESP, ...

    label("icmpv6")
    op(_LD_ABS_B, _L4)
    op(_JMP32_JEQ_K, _ROUTER_ADVERT, "drop")
    op(_JMP32_JEQ_K, _REDIRECT, "drop")
    op(_JMP32_JEQ_K, _NEIGH_ADVERT, "advert")
    op(_JMP32_JEQ_K, _NEIGH_SOLICIT, "solicit")
    op(_JMP32_JNE_K, 0, "drop", dst=_R_UNSPECIFIED)
    op(_JA, 0, "pass")
    label("advert")
    op(_JMP32_JNE_K, 0, "drop", dst=_R_UNSPECIFIED)
    op(_JA, 0, "own_target")
    label("solicit")
    op(_JMP32_JEQ_K, 0, "nd_options", dst=_R_UNSPECIFIED)  # address resolution: any target
    label("own_target")  # the target field of an NA, or of a DAD probe
    for own in own6:
        a.match16(_L4 + 8, own, "nd_options")
    op(_JA, 0, "drop")
    label("nd_options")
    op(_LD_ABS_H, _IP6_PAYLOAD_LEN)
    op(_JMP32_JEQ_K, _ND_FIXED, "pass")
    op(_JMP32_JNE_K, _ND_FIXED + 8, "drop")
    op(_LD_ABS_B, _L4 + _ND_FIXED + 1)  # the option's length, in 8 bytes
    op(_JMP32_JNE_K, 1, "drop")
    op(_LD_ABS_B, _L4 + _ND_FIXED)
    op(_JMP32_JEQ_K, _NONCE, "pass")
    op(_JMP32_JEQ_K, _SRC_LLADDR, "lladdr")
    op(_JMP32_JEQ_K, _TGT_LLADDR, "lladdr")
    op(_JA, 0, "drop")
    label("lladdr")
    op(_LD_ABS_W, _L4 + _ND_FIXED + 2)
    op(_JMP32_JNE_K, _imm32(int.from_bytes(raw[:4], "big")), "drop")
    op(_LD_ABS_H, _L4 + _ND_FIXED + 6)
    op(_JMP32_JNE_K, int.from_bytes(raw[4:], "big"), "drop")
    op(_JA, 0, "pass")

    label("hopopts")  # MLD only: an 8-byte hop-by-hop header (router alert), then MLD
    op(_LD_ABS_B, _L4)
    op(_JMP32_JNE_K, _ICMPV6, "drop")
    op(_LD_ABS_B, _L4 + 1)
    op(_JMP32_JNE_K, 0, "drop")
    op(_LD_ABS_B, _L4 + 8)
    for t in _MLD_TYPES:
        op(_JMP32_JEQ_K, t, "pass")
    op(_JA, 0, "drop")

    label("fragment")  # TCP, UDP, and ICMPv6 echo (a big ping); never Neighbor Discovery
    op(_LD_ABS_B, _L4)
    op(_JMP32_JEQ_K, _TCP, "pass")
    op(_JMP32_JEQ_K, _UDP, "pass")
    op(_JMP32_JNE_K, _ICMPV6, "drop")
    op(_LD_ABS_H, _L4 + 2)
    op(_AND32_K, 0xFFF8)  # fragment offset: not the first fragment, no ICMPv6 header in it
    op(_JMP32_JNE_K, 0, "pass")
    op(_LD_ABS_B, _L4 + 8)
    op(_JMP32_JEQ_K, _ECHO_REQUEST, "pass")
    op(_JMP32_JEQ_K, _ECHO_REPLY, "pass")

    label("drop")
    op(_MOV64_K, TC_ACT_SHOT)
    op(_EXIT)
    label("pass")
    op(_MOV64_K, TC_ACT_UNSPEC)
    op(_EXIT)
    return a.assemble()


def load(mac: str, ipv4: Sequence[str], ipv6: Sequence[str] = ()) -> int:
    """Load program(mac, ipv4, ipv6) as a tc classifier; returns its fd (the caller closes it once a filter
    holds it).

    Raises:
        NetworkError: the kernel refuses it (the verifier's log is in the message).
    """
    code = program(mac, ipv4, ipv6)
    fd, err, _ = _prog_load(code, 0)
    if fd < 0:
        # again with the verifier's log (at level 0 a small buffer cannot fail with ENOSPC)
        _, err2, log = _prog_load(code, 1)
        raise NetworkError(f"anti-spoofing: the kernel refused the tap's filter program: {os.strerror(err)}: "
                           f"{log[-400:] if err2 != errno.ENOSPC else log[:400]}")
    return fd


def _prog_load(code: bytes, log_level: int) -> tuple[int, int, str]:
    """bpf(BPF_PROG_LOAD): (fd or -1, errno, the verifier's log)."""
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(1 << 20 if log_level else 1)
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("<IIQQIIQ", attr, 0, _BPF_PROG_TYPE_SCHED_CLS, len(code) // 8, ctypes.addressof(insns),
                     ctypes.addressof(license_), log_level, len(log) if log_level else 0,
                     ctypes.addressof(log) if log_level else 0)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = int(libc.syscall(ctypes.c_long(_SYS_BPF), ctypes.c_long(_BPF_PROG_LOAD), attr, ctypes.c_long(len(attr))))
    return fd, ctypes.get_errno() if fd < 0 else 0, log.value.decode(errors="replace")
