"""`pykata check`'s look at the jail in force: a QEMU started jailed, with no guest, read from /proc.

In qemu/ (not in hypervisor/jail.py, which the QEMU command line builder imports): it starts QEMU.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

from pykata.config.schema import QemuConfig
from pykata.errors import HypervisorError
from pykata.hypervisor import fileguard
from pykata.hypervisor.jail import (
    ProcessConfinement,
    UidLease,
    inspect_process,
    jail_spec,
    make_chroot,
    namespace_prefix,
)
from pykata.hypervisor.qemu.cmdline import CommandLine
from pykata.hypervisor.qemu.launch import jail_args


def probe(q: QemuConfig, runtime_dir: Path, timeout: float = 10.0) -> ProcessConfinement:
    """Start QEMU jailed as a VM would be (no guest: `-machine none -S`), read its confinement from
    /proc once it has dropped its privileges, and end it: the layers really in force on this host.

    Raises:
        HypervisorError: QEMU cannot start or exits, or does not finish its set-up within `timeout`.
    """
    lease = UidLease.acquire(q, runtime_dir) if q.jail_user else None
    with tempfile.TemporaryDirectory(prefix="pykata-jail-probe-") as tmp:
        chroot = make_chroot(Path(tmp) / "root") if q.jail_chroot else None
        spec = jail_spec(q, uid=lease.uid if lease else None, chroot=chroot)
        argv = namespace_prefix(spec.mount_namespace, ipc_namespace=True)  # as the driver starts it
        argv += CommandLine(q.path, tuple(jail_args(spec))).argv()
        argv += ["-machine", "none", "-nodefaults", "-no-user-config", "-display", "none", "-S"]
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, start_new_session=True,
                                    preexec_fn=fileguard.vmm_child if spec.seccomp else None)
        except OSError as exc:
            if lease:
                lease.release()
            raise HypervisorError(f"jail probe: cannot run {q.path}: {exc.strerror}") from None
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    err = proc.stderr.read().decode(errors="replace")[-500:] if proc.stderr else ""
                    raise HypervisorError(f"jail probe: QEMU exited with {proc.returncode}: {err.strip()}")
                try:
                    found = inspect_process(proc.pid)
                except HypervisorError:
                    found = None
                # set-up is done once the last step (the uid drop, else the chroot) shows
                if found is not None and (spec.chroot is None or found.root == str(spec.chroot)) \
                        and (not spec.unprivileged or found.uid != 0) and (not spec.seccomp or found.seccomp):
                    return found
                if time.monotonic() > deadline:
                    raise HypervisorError(f"jail probe: QEMU did not finish its set-up within {timeout:.0f}s")
                time.sleep(0.02)
        finally:
            proc.kill()
            proc.wait()
            if lease:
                lease.release()
