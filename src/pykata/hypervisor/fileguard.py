"""What a process serving the guest's file system (virtiofsd; QEMU when it serves 9p itself) may not
do for the guest: make setuid/setgid files, device nodes or file capabilities on the host.

The guest's root is root to these servers (virtio-fs and 9p's passthrough/none models write the
guest's modes as they are; 9p's mapped models would not, but they cannot read the symlinks of an
image unpacked on the host). So the server is started with:
  * CAP_MKNOD, CAP_FSETID and CAP_SETFCAP out of its bounding set: no device nodes, a write clears
    setuid/setgid bits, no security.capability xattrs;
  * a seccomp filter that fails with EPERM every chmod/creat/open/mknod/mkdir whose mode carries
    S_ISUID or S_ISGID (S_ISUID only for mkdir: setgid directories are harmless and common), and
    openat2 with ENOSYS (its mode is behind a pointer the filter cannot read).
A file owner may set S_ISUID on its own file without any capability, hence the filter. The filter
stacks with the server's own (virtiofsd's, QEMU's -sandbox) and is inherited across execve.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

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

# classic BPF
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JSET_K = 0x45
_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def filter_program() -> bytes:
    """The BPF program (struct sock_filter[]) described in the module docstring."""
    allow, deny_perm, deny_nosys = _insn(_RET_K, 0, 0, _RET_ALLOW), _insn(_RET_K, 0, 0, _RET_ERRNO | errno.EPERM), \
        _insn(_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS)
    # layout: [arch check][nr load][per syscall: jeq, ld arg, jset][openat2 jeq][allow][eperm][enosys]
    total_blocks = 3 * len(_MODE_ARGS)
    prog: list[bytes] = []
    prog.append(_insn(_LD_W_ABS, 0, 0, 4))                      # A = arch
    # not x86_64: allow (this filter is about this host's own syscalls); jump to ALLOW
    allow_at = 2 + 1 + total_blocks + 1                          # index of ALLOW
    prog.append(_insn(_JEQ_K, 0, allow_at - 2, AUDIT_ARCH_X86_64))
    prog.append(_insn(_LD_W_ABS, 0, 0, 0))                      # A = nr
    for i, (nr, (arg, bits)) in enumerate(_MODE_ARGS.items()):
        here = 3 + 3 * i
        # jeq nr: fall into the arg check, else skip the 2 instructions of the check
        prog.append(_insn(_JEQ_K, 0, 2, nr))
        prog.append(_insn(_LD_W_ABS, 0, 0, 16 + 8 * arg))       # A = low 32 bits of the mode argument
        eperm_at = allow_at + 1
        prog.append(_insn(_JSET_K, eperm_at - (here + 2) - 1, allow_at - (here + 2) - 1, bits))
    prog.append(_insn(_JEQ_K, 2, 0, _OPENAT2))                   # openat2 -> ENOSYS (ALLOW+2)
    prog += [allow, deny_perm, deny_nosys]
    assert len(prog) == allow_at + 3
    return b"".join(prog)


_PROGRAM = filter_program()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def guard_child() -> None:
    """For subprocess's preexec_fn, between fork and exec: drop the capabilities and install the
    filter. Raises OSError (the child then fails to start, which spawn reports)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in DROPPED_CAPS:
        if libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"PR_CAPBSET_DROP {cap}: {os.strerror(err)}")
    buf = ctypes.create_string_buffer(_PROGRAM, len(_PROGRAM))
    prog = _SockFprog(len(_PROGRAM) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(prog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp filter: {os.strerror(err)}")
