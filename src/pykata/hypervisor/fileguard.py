"""What a process serving the guest's file system (virtiofsd; QEMU when it serves 9p itself) may not
do for the guest: make setuid/setgid files, device nodes or file capabilities on the host.

The guest's root is root to these servers (virtio-fs and 9p's passthrough/none models write the
guest's modes as they are; 9p's mapped models would not, but they cannot read the symlinks of an
image unpacked on the host). So the server is started with:
  * CAP_MKNOD, CAP_FSETID and CAP_SETFCAP out of its bounding set: no device nodes, a write clears
    setuid/setgid bits, no security.capability xattrs;
  * a seccomp filter that fails with EPERM every chmod/creat/open/mknod/mkdir whose mode carries
    S_ISUID or S_ISGID (S_ISUID only for mkdir: setgid directories are harmless and common) and every
    mknod of a character or block device, and openat2 with ENOSYS (its mode is behind a pointer the
    filter cannot read);
  * the same filter fails io_uring_setup/enter/register with ENOSYS: io_uring is a large kernel attack
    surface (Docker's default profile denies it), and its requests (openat, ...) are not seen by
    seccomp at all. QEMU 7.2 (Debian links liburing) makes two rings at start and drops them at once
    for its glib main loop: refused, it goes on the same way. So do the keyring calls,
    perf_event_open, bpf and userfaultfd, which none of these servers uses (Docker's default profile
    denies them too). Calls of another ABI fail with ENOSYS too, i386's (`int $0x80`, another audit
    arch) and x32's (the syscall number's bit 30): they would carry every refused call past the
    number checks (the servers are x86_64 programs).
QEMU itself starts under the filter when its jail's seccomp layer is on (`vmm_child`, before its own
-sandbox filter): a QEMU taken over by its guest holds descriptors of the guest's files (9p through
virtfs-proxy-helper hands them to it) and, as the jail uid, may chmod one the guest chowned to that
uid; the filter keeps it from setting S_ISUID/S_ISGID there (the helper does the guest's chmods).
virtfs-proxy-helper (9p for a jailed QEMU) sets its own capabilities and refuses to start without
CAP_MKNOD and CAP_FSETID: it gets the filter only, so a write by the guest does not clear the setuid
bit of a file that already had it.
A file owner may set S_ISUID on its own file without any capability, hence the filter. The filter
stacks with the server's own (virtiofsd's, QEMU's -sandbox) and is inherited across execve.

virtfs-proxy-helper also runs as uid 0 in the host's PID namespace (its file capabilities need it),
and a process may signal every process of its own uid without any capability: if a jailed QEMU's
requests took the helper over, it could kill containerd, kubelet or any root process, or ptrace a
sibling helper. So it also starts under a second filter (`no_reach_program`) that refuses, with
EPERM, every syscall that acts on another process: kill, tkill, tgkill, rt_(tg)sigqueueinfo, ptrace,
process_vm_readv/writev, kcmp, the pidfd calls, fcntl/ioctl that set a descriptor's owner (SIGIO
is sent to that owner with the same uid check), setpriority, ioprio_set, migrate_pages, move_pages,
process_madvise, and the sched_set* calls and prlimit64 on any process but itself. The helper uses
none of them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import subprocess
import sys
from collections.abc import Callable

CAP_FSETID = 4
CAP_MKNOD = 27
CAP_SETFCAP = 31
DROPPED_CAPS = (CAP_MKNOD, CAP_FSETID, CAP_SETFCAP)

PR_CAPBSET_DROP = 24
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
AUDIT_ARCH_X86_64 = 0xC000003E

S_ISUID = 0o4000
S_ISGID = 0o2000

# x86_64 syscall -> index of its mode argument, and the bits refused there.
_MODE_ARGS: dict[int, tuple[int, int]] = {
    2: (2, S_ISUID | S_ISGID),     # open(path, flags, mode)
    85: (1, S_ISUID | S_ISGID),    # creat(path, mode)
    90: (1, S_ISUID | S_ISGID),    # chmod(path, mode)
    91: (1, S_ISUID | S_ISGID),    # fchmod(fd, mode)
    83: (1, S_ISUID),              # mkdir(path, mode)
    133: (1, S_ISUID | S_ISGID),   # mknod(path, mode, dev)
    257: (3, S_ISUID | S_ISGID),   # openat(dirfd, path, flags, mode)
    258: (2, S_ISUID),             # mkdirat(dirfd, path, mode)
    259: (2, S_ISUID | S_ISGID),   # mknodat(dirfd, path, mode, dev)
    268: (2, S_ISUID | S_ISGID),   # fchmodat(dirfd, path, mode)
    452: (2, S_ISUID | S_ISGID),   # fchmodat2(dirfd, path, mode, flags)
}
_OPENAT2 = 437
# io_uring_setup, io_uring_enter, io_uring_register
IO_URING_SYSCALLS = (425, 426, 427)
# more kernel surface none of these servers uses, which Docker's default profile denies too:
# add_key, request_key, keyctl (the keyrings are not namespaced), perf_event_open, bpf, userfaultfd
# (a classic tool to widen kernel race windows)
UNUSED_SYSCALLS = (248, 249, 250, 298, 321, 323)
X32_SYSCALL_BIT = 0x40000000

# classic BPF
_LD_W_ABS = 0x20
_ALU_AND_K = 0x54
_JEQ_K = 0x15
_JSET_K = 0x45
_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
S_IFMT = 0o170000
S_IFCHR = 0o020000
S_IFBLK = 0o060000
_MKNOD = (133, 259)

# An instruction whose jumps name labels: ("ALLOW", "EPERM", "ENOSYS" or "next" for the next block).
_Insn = tuple[int, str | int, str | int, int]


NATIVE_ONLY_LEN = 4


def native_only_head(to_refusal: int) -> list[tuple[int, int, int, int]]:
    """The first NATIVE_ONLY_LEN instructions of a filter for an x86_64 program: a call of another
    architecture (i386's `int $0x80`, whose numbers differ: a check of x86_64 numbers alone lets it
    by) or of the x32 ABI jumps to the instruction `to_refusal` past the head (its refusal); a native
    call goes on with its syscall number loaded. Shared by every filter pykata installs on a VMM."""
    return [(_LD_W_ABS, 0, 0, 4), (_JEQ_K, 0, to_refusal + 2, AUDIT_ARCH_X86_64), (_LD_W_ABS, 0, 0, 0),
            (_JSET_K, to_refusal, 0, X32_SYSCALL_BIT)]


def _blocks() -> list[list[_Insn]]:
    blocks: list[list[_Insn]] = []
    for nr, (arg, bits) in _MODE_ARGS.items():
        block: list[_Insn] = [(_JEQ_K, 0, "next", nr), (_LD_W_ABS, 0, 0, 16 + 8 * arg)]
        if nr in _MKNOD:  # no device nodes, whatever the capabilities
            block += [(_JSET_K, "EPERM", 0, bits), (_ALU_AND_K, 0, 0, S_IFMT),
                      (_JEQ_K, "EPERM", 0, S_IFCHR), (_JEQ_K, "EPERM", "ALLOW", S_IFBLK)]
        else:
            block.append((_JSET_K, "EPERM", "ALLOW", bits))
        blocks.append(block)
    enosys = (_OPENAT2, *IO_URING_SYSCALLS, *UNUSED_SYSCALLS)
    blocks.append([(_JEQ_K, "ENOSYS", 0, nr) for nr in enosys[:-1]] + [(_JEQ_K, "ENOSYS", "ALLOW", enosys[-1])])
    return blocks


def filter_program() -> bytes:
    """The BPF program (struct sock_filter[]) described in the module docstring."""
    blocks = _blocks()
    # ENOSYS is the third return after the blocks
    head: list[_Insn] = list(native_only_head(sum(map(len, blocks)) + 2))
    insns = head + [i for b in blocks for i in b]
    labels = {"ALLOW": len(insns), "EPERM": len(insns) + 1, "ENOSYS": len(insns) + 2}
    starts, at = [], len(head)
    for b in blocks:
        starts.append(at)
        at += len(b)
    starts.append(labels["ALLOW"])
    out = []
    for pc, (code, jt, jf, k) in enumerate(insns):
        block = next((i for i in range(len(blocks)) if starts[i] <= pc < starts[i + 1]), -1)

        def off(target: str | int, pc: int = pc, block: int = block) -> int:
            if isinstance(target, int):
                return target
            dest = starts[block + 1] if target == "next" else labels[target]
            return dest - pc - 1
        out.append(struct.pack("=HBBI", code, off(jt), off(jf), k))
    out += [struct.pack("=HBBI", _RET_K, 0, 0, r)
            for r in (_RET_ALLOW, _RET_ERRNO | errno.EPERM, _RET_ERRNO | errno.ENOSYS)]
    return b"".join(out)


_PROGRAM = filter_program()

# syscalls that act on another process (x86_64 numbers)
_REACH_SYSCALLS = {62: "kill", 200: "tkill", 234: "tgkill", 129: "rt_sigqueueinfo", 297: "rt_tgsigqueueinfo",
                   101: "ptrace", 310: "process_vm_readv", 311: "process_vm_writev", 312: "kcmp",
                   424: "pidfd_send_signal", 434: "pidfd_open", 438: "pidfd_getfd"}
_FCNTL, _IOCTL = 72, 16
_OWNER_CMDS = {_FCNTL: (8, 15), _IOCTL: (0x8901, 0x8902)}  # F_SETOWN(_EX); FIOSETOWN, SIOCSPGRP
# a process may also renice, reschedule, repin or change the limits of any process of its uid: these
# only on itself (argument 0, the pid, is 0), setpriority and ioprio_set (whose PRIO_USER/IOPRIO_WHO_USER
# reach every process of the uid) not at all, nor moving another's memory
_REACH_SYSCALLS.update({141: "setpriority", 251: "ioprio_set", 256: "migrate_pages", 279: "move_pages",
                        440: "process_madvise"})
_SELF_ONLY = {142: "sched_setparam", 144: "sched_setscheduler", 203: "sched_setaffinity",
              314: "sched_setattr", 302: "prlimit64"}


def no_reach_program() -> bytes:
    """The BPF program that refuses (EPERM) the syscalls of _REACH_SYSCALLS, and fcntl/ioctl setting
    a descriptor's owner; a foreign architecture's calls (the helper is x86_64) are refused whole."""
    # (code, jump-if-true, jump-if-false, k); a jump is 0 (next), "EPERM", "ALLOW" or ("skip", n)
    prog: list[tuple[int, object, object, int]] = [(_LD_W_ABS, 0, 0, 4), (_JEQ_K, 0, "EPERM", AUDIT_ARCH_X86_64),
                                                   (_LD_W_ABS, 0, 0, 0)]
    prog += [(_JEQ_K, "EPERM", 0, nr) for nr in _REACH_SYSCALLS]
    for nr in _SELF_ONLY:
        # not this syscall: past the block; else the pid (argument 0, both words) must be 0
        prog += [(_JEQ_K, 0, ("skip", 5), nr), (_LD_W_ABS, 0, 0, 16), (_JEQ_K, 0, "EPERM", 0),
                 (_LD_W_ABS, 0, 0, 20), (_JEQ_K, "ALLOW", "EPERM", 0), (_LD_W_ABS, 0, 0, 0)]
    for nr, cmds in _OWNER_CMDS.items():
        # not this syscall: past the block (its argument load, its commands and its ALLOW)
        prog.append((_JEQ_K, 0, ("skip", 1 + len(cmds) + 1), nr))
        prog.append((_LD_W_ABS, 0, 0, 16 + 8 * 1))
        prog += [(_JEQ_K, "EPERM", 0, cmd) for cmd in cmds]
        prog.append((_RET_K, 0, 0, _RET_ALLOW))
    labels = {"ALLOW": len(prog), "EPERM": len(prog) + 1}
    prog += [(_RET_K, 0, 0, _RET_ALLOW), (_RET_K, 0, 0, _RET_ERRNO | errno.EPERM)]

    def off(pc: int, target: object) -> int:
        if target == 0:
            return 0
        if isinstance(target, tuple):
            return int(target[1])
        return labels[str(target)] - pc - 1

    return b"".join(struct.pack("=HBBI", code, off(pc, jt), off(pc, jf), k)
                    for pc, (code, jt, jf, k) in enumerate(prog))


_NO_REACH = no_reach_program()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def guard_child() -> None:
    """For subprocess's preexec_fn, between fork and exec: drop the capabilities and install the
    filter. Raises OSError (the child then fails to start, which spawn reports)."""
    libc = ctypes.CDLL(None, use_errno=True)
    _drop_caps(libc)
    _install_filter(libc)


def vmm_child() -> None:
    """For the VMM's preexec (QEMU, started as root, which then drops to its jail uid): the filter
    only. Raises OSError (the child then fails to start)."""
    _install_filter(ctypes.CDLL(None, use_errno=True))


_IO_URING_PROBE = ("import ctypes, sys\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                   "libc.syscall.restype = ctypes.c_long\nr = libc.syscall(425, 1, ctypes.create_string_buffer(120))\n"
                   "sys.exit(0 if r < 0 and ctypes.get_errno() == 38 else 1)\n")


def io_uring_refused(preexec: Callable[[], None] | None = vmm_child) -> bool:
    """Whether a process started under `preexec` (QEMU's step by default) gets ENOSYS from
    io_uring_setup on this kernel: a probe process tries it (`pykata check`)."""
    try:
        return subprocess.run([sys.executable, "-S", "-c", _IO_URING_PROBE], preexec_fn=preexec,
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def filter_child() -> None:
    """The filter only, for a server that sets its own capabilities and fails without the ones it
    asks for (virtfs-proxy-helper asks for CAP_MKNOD and CAP_FSETID), with the filter that keeps it
    from acting on other processes (no_reach_program)."""
    libc = ctypes.CDLL(None, use_errno=True)
    _install_filter(libc)
    _install_filter(libc, _NO_REACH)


def _drop_caps(libc: ctypes.CDLL) -> None:
    for cap in DROPPED_CAPS:
        if libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"PR_CAPBSET_DROP {cap}: {os.strerror(err)}")


def _install_filter(libc: ctypes.CDLL, program: bytes = _PROGRAM) -> None:
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(prog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp filter: {os.strerror(err)}")
