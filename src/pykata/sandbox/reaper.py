"""A sandbox's reaper: a small process that outlives the sandbox's owner and removes what the sandbox
left when the owner died without stopping it (SIGKILL, a crash, an event loop torn down mid-teardown).

The owner (the process that made the sandbox: `pykata run`, an SDK program, a shim) starts it (`start`)
with the read end of a pipe whose write end only the owner holds (close-on-exec: QEMU and the owner's
other children never get it). The reaper blocks reading that pipe:

- one byte, then end of file: the owner stopped the sandbox itself and released the reaper
  (`Reaper.release`, at the end of Sandbox.stop): it exits;
- end of file alone: every holder of the write end is gone, and the kernel closes a dead process's
  descriptors however it died: the owner died with the sandbox up. The reaper then does what `pykata
  cleanup` does for that one sandbox (`remove_sandbox_dir`): it ends the processes the sandbox recorded
  (QEMU, virtiofsd, the 9p helper; their PID-namespace lifelines have usually ended them already), undoes
  its mounts, removes its directory and its egress network's host filter rules; then the host cgroups
  a shim recorded for it.

It runs in a session of its own (a Ctrl-C at the owner's terminal does not reach it), outside the VM's
PID namespace and not as the owner's child (`setsid --fork`: nobody has to wait for it). Until the owner
dies it is one blocked read in a bare interpreter; the cleanup's imports load only then.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

RELEASED = b"R"


class Reaper:
    """The owner's end of a reaper: `release()` once the sandbox is stopped (idempotent)."""

    def __init__(self, write_fd: int, directory: Path) -> None:
        self._fd: int | None = write_fd
        self.directory = directory

    def release(self) -> None:
        """Tell the reaper the sandbox was stopped by its owner: it exits without touching anything."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.write(fd, RELEASED)
        except OSError:  # the reaper is gone (killed): nothing to tell
            pass
        finally:
            os.close(fd)


def start(directory: Path, *, cgroup_record: Path | None = None, cgroup_root: Path | None = None) -> Reaper:
    """Start the reaper of the sandbox in `directory` for this process. `cgroup_record`: the file where a
    shim records the host cgroups it made for the sandbox (pykata.resources.cgroups), under `cgroup_root`.

    Raises OSError when it cannot be started (util-linux's setsid missing, no memory for a process)."""
    read_fd, write_fd, argv = _prepare(directory, cgroup_record, cgroup_root)
    try:
        # setsid forks the reaper and exits at once: it is waited for here, the reaper by nobody
        subprocess.run(argv, pass_fds=(read_fd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, close_fds=True, cwd="/", check=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        os.close(write_fd)
        raise OSError(f"cannot start the sandbox's reaper: {e}") from None
    finally:
        os.close(read_fd)
    return Reaper(write_fd, directory)


async def start_async(directory: Path, *, cgroup_record: Path | None = None,
                      cgroup_root: Path | None = None) -> Reaper:
    """`start` on the running loop: setsid is waited for as the loop's other children are (pidfds), not
    in a thread, so sandboxes started at once from one process take no thread each (the default
    executor grew by one per concurrent start)."""
    # imported here, not at the top: the reaper process itself never needs it
    from pykata.hypervisor.process import watch_children_with_pidfds

    read_fd, write_fd, argv = _prepare(directory, cgroup_record, cgroup_root)
    watch_children_with_pidfds()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, pass_fds=(read_fd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, close_fds=True, cwd="/")
        try:
            code = await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise OSError("setsid did not exit within 30 s") from None
        if code != 0:
            raise OSError(f"setsid exited with code {code}")
    except OSError as e:
        os.close(write_fd)
        raise OSError(f"cannot start the sandbox's reaper: {e}") from None
    finally:
        os.close(read_fd)
    return Reaper(write_fd, directory)


def _prepare(directory: Path, cgroup_record: Path | None, cgroup_root: Path | None) -> tuple[int, int, list[str]]:
    """The pipe whose closing tells the reaper its owner died, and the reaper's command line."""
    setsid = shutil.which("setsid") or shutil.which("setsid", path="/usr/bin:/bin")
    nice = shutil.which("nice") or shutil.which("nice", path="/usr/bin:/bin")
    if setsid is None or nice is None:
        raise OSError("util-linux's setsid or coreutils' nice not found")
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    # idle priority while it starts and waits: its interpreter's start-up (~0.1 CPU s) must not take
    # CPU from the VM booting beside it; it takes the normal priority back once the owner died
    argv = [setsid, "--fork", nice, "-n", "19", sys.executable, "-m", "pykata.sandbox.reaper", str(read_fd),
            str(os.getpid()), str(directory)]
    if cgroup_record is not None and cgroup_root is not None:
        argv += [str(cgroup_record), str(cgroup_root)]
    return read_fd, write_fd, argv


def remove_sandbox_dir(directory: Path, record: object) -> None:
    """Kill what the sandbox in `directory` left running, undo its mounts and delete the directory (a
    sandbox taken from the warm pool: the link and the pool directory it names). `record`: its
    pykata.sandbox.state.SandboxRecord, or None. Raises MountError when a mount cannot be undone (the
    directory then stays: never delete below a mount, a volume's host data)."""
    from pykata.resources import mounts

    link = directory if directory.is_symlink() else None
    if link is not None:
        directory = link.resolve()
    end_processes(directory, record)
    mounts.unmount_all(directory)
    shutil.rmtree(directory, ignore_errors=True)
    if link is not None:
        with contextlib.suppress(OSError):
            link.unlink()


def end_processes(directory: Path, record: object) -> None:
    """SIGKILL what the sandbox in `directory` started (QEMU, virtiofsd, the 9p helper), by pid and start
    time, and what runs under those; never a process that merely names the directory
    (pykata.hypervisor.owned). Then its QEMU by the record's pid, if that is still its own. Never raises."""
    from pykata.hypervisor import owned
    from pykata.sandbox.state import VM_DIR

    owned.kill_recorded(directory / VM_DIR)
    vmm_pid = getattr(record, "vmm_pid", None)
    sandbox_id = getattr(record, "id", None)
    if vmm_pid and sandbox_id:
        _kill_vmm(vmm_pid, sandbox_id)


def _kill_vmm(pid: int, sandbox_id: str) -> None:
    import psutil

    from pykata.ids import names_vm

    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        # only a QEMU that is really this sandbox's (pids get reused): its exact -name, not a substring
        if names_vm(proc.cmdline(), sandbox_id):
            proc.kill()
            proc.wait(5)


def reap(directory: Path, owner_pid: int, cgroup_record: Path | None, cgroup_root: Path | None) -> bool:
    """Remove what the dead owner `owner_pid` left of the sandbox in `directory`. Returns whether the
    directory was removed. A directory that is another live owner's now (the same id made again), or
    whose sandbox was stopped (kept for `pykata ps -a`), or that has no record, is left."""
    from pykata.sandbox import state

    removed = False
    if directory.is_dir():
        record = state.load(directory)
        if record is not None and record.owner_pid != owner_pid and record.owner_alive():
            return False  # the same id made again by a live owner: its directory and cgroups
        if record is None:
            # our owner saved its record before it started us (atomically): a directory without one is
            # being made by someone else (the same id again) or removed (`delete`): not ours to touch
            return False
        if record.status != "stopped":
            try:
                remove_sandbox_dir(directory, record)
                removed = True
            finally:  # its processes were ended first: no VMM of the sandbox runs unfiltered now
                remove_filter_rules(record.id)
    if cgroup_record is not None and cgroup_root is not None:
        from pykata.resources import cgroups

        with contextlib.suppress(OSError):
            cgroups.remove_recorded(cgroup_record.read_text()[:65536], cgroup_root)
            cgroup_record.unlink()
    return removed


def remove_filter_rules(sandbox_id: str) -> None:
    """Remove the host filter rules of the sandbox `sandbox_id`'s egress network (pykata.network.egress)
    whose owner is gone and whose VMM no longer runs: rules of the same id a live owner made again stay.
    Nothing when the sandbox had none (two `iptables -S`). Never raises (`pykata cleanup` and the next
    egress sandbox sweep what is left)."""
    import asyncio

    from pykata.network import egress

    with contextlib.suppress(Exception):
        asyncio.run(egress.sweep(sandbox_id))


def leave_cgroups(cgroup_record: Path) -> None:
    """Move this process out of the cgroups a shim recorded for its sandbox (pykata.resources.cgroups),
    to the top of each hierarchy: a shim's reaper starts in the sandbox's cgroup, which it must neither
    be charged to nor keep busy when the shim removes it. Never raises."""
    import json

    try:
        paths = json.loads(cgroup_record.read_text()[:65536])
    except (OSError, ValueError):
        return
    me = str(os.getpid())
    for p in paths if isinstance(paths, list) else []:
        if not isinstance(p, str):
            continue
        with contextlib.suppress(OSError):
            if me not in (Path(p) / "cgroup.procs").read_text().split():
                continue
            for top in reversed(Path(p).parents):  # the shallowest cgroup: v1 /sys/fs/cgroup/<controller>
                if (top / "cgroup.procs").exists():
                    (top / "cgroup.procs").write_text(me)
                    break


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    read_fd, owner_pid, directory = int(args[0]), int(args[1]), Path(args[2])
    cgroup_record = Path(args[3]) if len(args) > 4 else None
    cgroup_root = Path(args[4]) if len(args) > 4 else None
    if cgroup_record is not None:
        leave_cgroups(cgroup_record)
    got = b""
    while True:
        try:
            chunk = os.read(read_fd, 16)
        except InterruptedError:
            continue
        if not chunk:
            break
        got += chunk
    os.close(read_fd)
    if RELEASED in got:
        return 0
    with contextlib.suppress(OSError):  # the cleanup runs at the owner's priority (root may raise it)
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    try:
        reap(directory, owner_pid, cgroup_record, cgroup_root)
    except Exception:  # what is left is `pykata cleanup`'s (or the shim's `delete`'s) to remove
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
