"""Keep a template clone's memory discards out of the template's memory file.

A clone maps the template's memory file privately (copy-on-write), but QEMU 7.2 opens that file
read-write and its `ram_block_discard_range` punches a hole into the file (fallocate PUNCH_HOLE)
before it drops the private copy (madvise DONTNEED). Every page the guest hands back (balloon
inflation, free page reporting) would so be zeroed in the template itself, and under every other clone
still reading that page from the file: one guest could corrupt the kernel of every pod started from the
same template (measured here: a clone's 96 MiB inflation took 11 MiB out of the template file). QEMU 8.2
stopped punching holes into private file mappings; for 7.2 the clone's QEMU runs under a seccomp
filter that makes fallocate(PUNCH_HOLE) return success without touching the file, so QEMU then drops
only the clone's private copy (what 8.2 does): the guest's freed memory still leaves the host, and the
page reads the template's content again (a guest never relies on the content of a page it gave away).

The filter fakes success for every fallocate(PUNCH_HOLE) of that QEMU, so a clone's block device must
never rely on punching holes for correctness: pykata's block devices keep QEMU's default discard=ignore
(guest discards and unmapping write-zeroes are never turned into PUNCH_HOLE). Other fallocate modes
are untouched.

A call of another architecture (i386's `int $0x80`, where fallocate is number 324) or of the x32 ABI
fails with ENOSYS (the head the filters of fileguard use): checking x86_64's numbers alone would let an
i386 fallocate(PUNCH_HOLE) through to the template's file when QEMU runs without fileguard's filter
(hypervisor.qemu.jail_seccomp off).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from pykata.hypervisor.fileguard import NATIVE_ONLY_LEN, native_only_head

PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
NR_FALLOCATE = 285
FALLOC_FL_PUNCH_HOLE = 0x02

_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JSET_K = 0x45
_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
# SECCOMP_RET_ERRNO with errno 0: the call is skipped and returns 0.
_RET_SKIPPED = _RET_ERRNO


def filter_program() -> bytes:
    """The BPF program: fallocate whose mode (argument 1) has FALLOC_FL_PUNCH_HOLE returns 0 unrun; a
    call of another architecture fails with ENOSYS."""
    insns = [
        *native_only_head(5),                          # 0-3: another arch or x32 -> ENOSYS (9)
        (_JEQ_K, 0, 2, NR_FALLOCATE),                  # 4: else ALLOW (7)
        (_LD_W_ABS, 0, 0, 16 + 8 * 1),                 # 5: low word of argument 1 (mode)
        (_JSET_K, 1, 0, FALLOC_FL_PUNCH_HOLE),         # 6: PUNCH_HOLE -> SKIPPED (8)
        (_RET_K, 0, 0, _RET_ALLOW),                    # 7
        (_RET_K, 0, 0, _RET_SKIPPED),                  # 8
        (_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS),     # 9
    ]
    assert len(insns) == NATIVE_ONLY_LEN + 6
    return b"".join(struct.pack("=HBBI", *insn) for insn in insns)


_PROGRAM = filter_program()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def keep_template_intact() -> None:
    """For subprocess's preexec_fn (between fork and exec of a clone's QEMU): install the filter.
    Raises OSError (the child then fails to start, which ChildProcess.spawn reports)."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(_PROGRAM, len(_PROGRAM))
    prog = _SockFprog(len(_PROGRAM) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(prog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp filter: {os.strerror(err)}")
