"""What a (possibly hostile) guest may send out of its NIC: a small eBPF classifier on the tap's ingress.

On a shared bridge a frame with another pod's MAC or IPv4 address, or an ARP claim for it, steals that
pod's traffic; under runc a pod without CAP_NET_RAW cannot send one, but the guest's kernel belongs to
the workload. The program, attached before the redirect (tcfilter.redirect) in direct-action mode,
drops (TC_ACT_SHOT): a source MAC that is not the interface's (the guest NIC takes it); an EtherType
other than IPv4, ARP and IPv6 (802.1Q tags included); IPv4 from an address CNI did not give the pod;
ARP whose sender address is not one of those. Everything else goes on to the redirect (TC_ACT_UNSPEC).
IPv6 is checked by its MAC only (the guest makes its own link-local addresses).

The host kernel may lack cls_basic, ematch and act_gact (this CI's has only u32, bpf and mirred), so it
is eBPF: a few dozen instructions assembled here, loaded with bpf(2).
"""

from __future__ import annotations

import ctypes
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
_LD_ABS_W, _LD_ABS_H = 0x20, 0x28
_JMP32_JEQ_K, _JMP32_JNE_K = 0x16, 0x56


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _imm32(value: int) -> int:
    """A 32-bit pattern as the signed immediate the instruction holds (JMP32 compares 32 bits)."""
    return value - (1 << 32) if value >= 1 << 31 else value


def program(mac: str, ipv4: Sequence[str]) -> bytes:
    """The instructions (see the module's docstring). LD_ABS reads the frame from its Ethernet header
    (tc pushes it back at ingress) in network byte order; a frame too short for a read ends the
    program with 0 (TC_ACT_OK: not redirected, the pod namespace's own stack drops it)."""
    raw = bytes.fromhex(mac.replace(":", ""))
    if len(raw) != 6:
        raise NetworkError(f"anti-spoofing: bad MAC {mac!r}")
    addresses = [_imm32(int(ipaddress.IPv4Address(a))) for a in ipv4]
    # labels resolved by position: build the body, then the jumps' offsets
    body: list[tuple[str, int, int, str | None]] = []  # (kind, code/offset, imm, target)

    def op(code: int, imm: int = 0, target: str | None = None) -> None:
        body.append(("op", code, imm, target))

    def label(name: str) -> None:
        body.append(("label", 0, 0, name))

    op(_LD_ABS_W, 6)
    op(_JMP32_JNE_K, _imm32(int.from_bytes(raw[:4], "big")), "drop")
    op(_LD_ABS_H, 10)
    op(_JMP32_JNE_K, int.from_bytes(raw[4:], "big"), "drop")
    op(_LD_ABS_H, 12)
    op(_JMP32_JEQ_K, ETH_P_IPV6, "pass")
    op(_JMP32_JEQ_K, ETH_P_IP, "ipv4")
    op(_JMP32_JEQ_K, ETH_P_ARP, "arp")
    op(_JA, 0, "drop")
    label("ipv4")
    op(_LD_ABS_W, 14 + 12)  # IPv4 source address
    op(_JA, 0, "address")
    label("arp")
    op(_LD_ABS_W, 14 + 14)  # ARP sender protocol address
    label("address")
    for a in addresses:
        op(_JMP32_JEQ_K, a, "pass")
    label("drop")
    op(_MOV64_K, TC_ACT_SHOT)
    op(_EXIT)
    label("pass")
    op(_MOV64_K, TC_ACT_UNSPEC)
    op(_EXIT)

    positions: dict[str, int] = {}
    n = 1  # r6 = r1 first (LD_ABS reads the packet through r6)
    for kind, _, _, target in body:
        if kind == "label":
            assert target is not None
            positions[target] = n
        else:
            n += 1
    out = [_insn(_MOV64_X, dst=6, src=1)]
    pc = 1
    for kind, code, imm, target in body:
        if kind == "label":
            continue
        if code in (_LD_ABS_W, _LD_ABS_H):
            out.append(_insn(code, imm=imm))
        elif code == _JA:
            out.append(_insn(code, off=positions[target or ""] - pc - 1))
        elif code in (_JMP32_JEQ_K, _JMP32_JNE_K):
            out.append(_insn(code, dst=0, off=positions[target or ""] - pc - 1, imm=imm))
        elif code == _MOV64_K:
            out.append(_insn(code, dst=0, imm=imm))
        else:
            out.append(_insn(code))
        pc += 1
    return b"".join(out)


def load(mac: str, ipv4: Sequence[str]) -> int:
    """Load program(mac, ipv4) as a tc classifier; returns its fd (the caller closes it once a filter
    holds it).

    Raises:
        NetworkError: the kernel refuses it (the verifier's log is in the message).
    """
    code = program(mac, ipv4)
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(4096)
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("<IIQQIIQ", attr, 0, _BPF_PROG_TYPE_SCHED_CLS, len(code) // 8, ctypes.addressof(insns),
                     ctypes.addressof(license_), 1, len(log), ctypes.addressof(log))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = int(libc.syscall(ctypes.c_long(_SYS_BPF), ctypes.c_long(_BPF_PROG_LOAD), attr, ctypes.c_long(len(attr))))
    if fd < 0:
        err = ctypes.get_errno()
        raise NetworkError(f"anti-spoofing: the kernel refused the tap's filter program: {os.strerror(err)}: "
                           f"{log.value.decode(errors='replace')[-400:]}")
    return fd
