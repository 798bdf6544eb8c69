"""Opting a process into the host's kernel same-page merging (KSM) as a whole.

`prctl(PR_SET_MEMORY_MERGE)` (Linux 6.4; kept across fork and exec since 6.7) makes every anonymous
page of the process a candidate for ksmd, which merges pages of equal content, across processes,
into one copy-on-write page while /sys/kernel/mm/ksm/run is 1 (the host admin's choice: nothing is
scanned or merged otherwise, and a marked process costs nothing).

Used for the pods' shims (`runtime.shim_mem_merge`: forked from one fork server, their private copies
of its pages, written by reference counts, are mostly alike) and for QEMU with
`hypervisor.qemu.mem_merge` (its heap, thread arenas, relocated libraries, pages it only zeroed, and
guest RAM: QEMU's `-machine mem-merge` marks only the latter). Merged pages are a side channel: a
process that times the copy-on-write fault of writing its own page learns whether another process
held a page of the same content. configuration.toml says who may turn which on.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable
from pathlib import Path

PR_SET_MEMORY_MERGE = 67
KSM_RUN = Path("/sys/kernel/mm/ksm/run")


def merge_this_process() -> None:
    """Mark every anonymous page of this process (and of what it forks or executes) mergeable.

    Raises:
        OSError: the kernel has no PR_SET_MEMORY_MERGE (before 6.4: EINVAL), or refused.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MEMORY_MERGE, ctypes.c_ulong(1), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_MEMORY_MERGE): {os.strerror(err)}")


def child_step(merge: bool) -> Callable[[], None] | None:
    """What a child runs before exec (preexec_fn) so that it offers its memory to KSM exactly when
    `merge`: the mark is inherited across fork and exec, so a child of a marked process (a shim with
    runtime.shim_mem_merge) unmarks itself unless asked to merge. None: nothing to change."""
    if merge:
        return _merge_child
    return _unmerge_child if merges(os.getpid()) else None


def _merge_child() -> None:
    # A kernel without it leaves the child unmarked (its parent can check with `merges(pid)`) rather
    # than failing the start.
    with contextlib.suppress(OSError):
        merge_this_process()


def _unmerge_child() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MEMORY_MERGE, ctypes.c_ulong(0), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_MEMORY_MERGE, 0): {os.strerror(err)}")


def merges(pid: int) -> bool:
    """Whether process `pid` is marked as a whole (/proc/<pid>/ksm_stat, Linux 6.4+)."""
    try:
        return "ksm_merge_any: yes" in Path(f"/proc/{pid}/ksm_stat").read_text()
    except OSError:
        return False


def merges_supported() -> bool:
    """Whether this kernel can mark a whole process and keep the mark across exec: a marked child
    tells (Linux 6.7; 6.4-6.6 lose it at exec)."""
    import subprocess

    try:
        out = subprocess.run(["cat", "/proc/self/ksm_stat"], preexec_fn=_merge_child, capture_output=True,
                             timeout=5, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return b"ksm_merge_any: yes" in out


def running() -> bool:
    """Whether the host's ksmd merges pages now (/sys/kernel/mm/ksm/run is 1)."""
    try:
        return KSM_RUN.read_text().strip() == "1"
    except OSError:
        return False
