"""A private containerd 1.6 (Debian's) for the shim tests.

containerd gets its own root, state, sockets and config in a temp dir, the CRI plugin disabled, and a
PATH that starts with the venv's bin, so `--runtime io.containerd.pykata.v2` finds
containerd-shim-pykata-v2 there. PYKATA_CONFIG passes through (a dev run can pin a guest image).
Teardown removes every task and container, stops containerd, waits for the shims to end, and then
removes by force whatever is left (shims, VMs, mounts), so a failing test leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import psutil

from pykata.config import load_config
from pykata.images import ImageStore
from pykata.images.builtin import export_oci_archive
from pykata.shim import forkclient

VENV_BIN = Path(sys.executable).parent
SHIM = VENV_BIN / "containerd-shim-pykata-v2"
CONTAINERD = shutil.which("containerd")
CTR = shutil.which("ctr")
IMAGE = "pykata.local/busybox:latest"
PYKATA_RUNTIME = "io.containerd.pykata.v2"
RUNC_RUNTIME = "io.containerd.runc.v2"
RUNC_ROOT = Path("/run/containerd/runc")

def missing_prerequisites() -> str | None:
    """What scripts/install.sh should have provided and did not (None when all is there)."""
    if CONTAINERD is None or CTR is None or shutil.which("runc") is None or shutil.which("script") is None:
        return "containerd, ctr, runc and script (scripts/install.sh)"
    if os.geteuid() != 0:
        return "root"
    if not SHIM.exists():
        return f"{SHIM} (pip install -e .)"
    return None


CONFIG = """version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  level = "debug"
[plugins."io.containerd.runtime.v1.linux"]
  shim_debug = true
"""


@dataclass
class Containerd:
    """One private containerd daemon driven with `ctr`."""

    dir: Path
    namespace: str = field(default_factory=lambda: f"pykata-test-{uuid.uuid4().hex[:8]}")
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.dir / "containerd.sock"

    @property
    def log(self) -> Path:
        return self.dir / "containerd.log"

    @property
    def state(self) -> Path:
        return self.dir / "state"

    def bundle(self, container_id: str) -> Path:
        return self.state / "io.containerd.runtime.v2.task" / self.namespace / container_id

    def env(self) -> dict[str, str]:
        return {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"}

    def start(self) -> None:
        assert CONTAINERD is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "config.toml"
        config.write_text(CONFIG.format(root=self.dir / "root", state=self.state, sock=self.socket))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([CONTAINERD, "--config", str(config)], stdout=log, stderr=log,
                                         env=self.env(), start_new_session=True)
        self.wait_up()

    def wait_up(self) -> None:
        """Wait until the daemon just started answers `ctr version`. Raises RuntimeError when it exited
        or did not come up within 20 s."""
        assert self.proc is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.socket.exists() and self.ctr("version", check=False, timeout=5).returncode == 0:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError("containerd did not come up within 20 s")

    def restart(self) -> None:
        """Stop containerd alone (its shims and their tasks live on, as with systemctl restart) and
        start it again."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(15)
        self.start()

    def ctr(self, *args: str, input: bytes | None = None, check: bool = True, timeout: float = 120,
            namespace: str | None = None) -> subprocess.CompletedProcess[bytes]:
        assert CTR is not None
        argv = [CTR, "-a", str(self.socket), "-n", namespace or self.namespace, *args]
        p = subprocess.run(argv, input=input if input is not None else b"", capture_output=True, timeout=timeout,
                           env=self.env(), check=False)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(args)} -> {p.returncode}: {p.stderr.decode(errors='replace')}")
        return p

    def tasks(self) -> dict[str, str]:
        """task id -> STATUS as `ctr task ls` shows it."""
        out = self.ctr("task", "ls", check=False).stdout.decode().splitlines()[1:]
        return {line.split()[0]: line.split()[2] for line in out if len(line.split()) >= 3}

    def remove(self, container_id: str) -> None:
        """Kill, delete the task and the container; never raises."""
        with contextlib.suppress(Exception):
            self.ctr("task", "kill", "-a", "-s", "KILL", container_id, check=False, timeout=30)
        with contextlib.suppress(Exception):
            self.ctr("task", "rm", "-f", container_id, check=False, timeout=60)
        with contextlib.suppress(Exception):
            self.ctr("container", "rm", container_id, check=False, timeout=30)

    def shims(self, *, fork_server: bool = False) -> list[psutil.Process]:
        """Shim processes (runc's and ours) started by this containerd; with `fork_server`, pykata's fork
        server for it too (pykata.shim.forkserver: it outlives the pods' shims by design)."""
        found = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if cmd and "containerd-shim" in " ".join(cmd[:2]) and str(self.socket) in cmd and (
                    fork_server or forkclient.ACTION not in cmd):
                found.append(p)
        return found

    def fork_server_pid(self) -> int | None:
        """The pid of pykata's fork server for this containerd, if one runs."""
        for p in psutil.process_iter(["cmdline", "status"]):
            cmd = p.info["cmdline"] or []
            if forkclient.ACTION in cmd and str(self.socket) in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
                return p.pid
        return None

    def stop(self) -> None:
        """Remove everything, stop containerd, and make sure no shim, VM or mount of ours is left."""
        if self.proc is not None and self.proc.poll() is None:
            for cid in self.ctr("container", "ls", "-q", check=False, timeout=30).stdout.decode().split():
                self.remove(cid)
            # shims exit after their last task is deleted
            deadline = time.monotonic() + 15
            while self.shims() and time.monotonic() < deadline:
                time.sleep(0.1)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.force_cleanup()

    def force_cleanup(self) -> None:
        forkclient.stop(load_config().runtime.runtime_dir, str(self.socket))
        ours: set[str] = set()  # sandbox ids of pykata shims, to run their dead-shim cleanup
        for p in self.shims(fork_server=True):
            with contextlib.suppress(psutil.Error):
                cmd = p.cmdline()
                if SHIM.name in " ".join(cmd[:2]) and "-id" in cmd[:-1]:
                    ours.add(cmd[cmd.index("-id") + 1])
                p.kill()
                p.wait(5)
        tasks_dir = self.state / "io.containerd.runtime.v2.task" / self.namespace
        if tasks_dir.is_dir():
            ours |= {b.name for b in tasks_dir.iterdir() if (b / "shim.pid").exists()}
        for cid in sorted(ours):  # as containerd would run it (the bundle may be gone already)
            subprocess.run([str(SHIM), "-namespace", self.namespace, "-address", str(self.socket),
                            "-id", cid, "-bundle", str(tasks_dir / cid), "delete"], cwd=self.dir,
                           capture_output=True, timeout=30, check=False, env=self.env())
        runc_root = RUNC_ROOT / self.namespace
        if runc_root.is_dir():
            for c in os.listdir(runc_root):
                # The runc root is per namespace, not per containerd: every CRI test containerd on this
                # host (other engineers', a CI run's) keeps its runc containers in k8s.io's. Only ours,
                # whose bundle is in this containerd's state directory, are ours to kill (`delete -f`
                # SIGKILLs: a node installer run by another containerd exited 137 with no stderr) and
                # their state ours to remove (without it, their containerd cannot delete them).
                st = subprocess.run(["runc", "--root", str(runc_root), "state", c], capture_output=True,
                                    check=False)
                with contextlib.suppress(ValueError):
                    bundle = Path(json.loads(st.stdout or b"{}").get("bundle") or "/nonexistent")
                    if bundle.is_relative_to(self.state):
                        subprocess.run(["runc", "--root", str(runc_root), "delete", "-f", c], capture_output=True,
                                       check=False)
            with contextlib.suppress(OSError):  # the namespace's, not ours: only once nobody's is left
                runc_root.rmdir()
        with open("/proc/self/mountinfo") as f:
            mine = [line.split()[4] for line in f if line.split()[4].startswith(str(self.dir))]
        for mp in sorted(mine, key=len, reverse=True):
            subprocess.run(["umount", "-l", mp], capture_output=True, check=False)
        # ctr's containers get the cgroup /<namespace>/<id>; runc removes the container's, not the
        # namespace's, so every test namespace left one empty cgroup per controller (hundreds a day).
        # rmdir removes only an empty one, deepest first (a container's that runc left, then the
        # namespace's): another containerd's with processes in a shared namespace stays.
        for top in [*Path("/sys/fs/cgroup").glob(f"*/{self.namespace}"), Path("/sys/fs/cgroup", self.namespace)]:
            for cg in sorted((d for d in [top, *top.rglob("*")] if d.is_dir()), key=lambda d: len(d.parts),
                             reverse=True):
                with contextlib.suppress(OSError):
                    cg.rmdir()


C = TypeVar("C", bound=Containerd)


@contextlib.contextmanager
def running_with_busybox(ctd: C, cache_dir: Path) -> Iterator[C]:
    """Start `ctd`, import the embedded busybox as IMAGE, and stop it on the way out.

    Fails the test if a shim outlived containerd's teardown.
    """
    try:
        ctd.start()
        archive = export_oci_archive(ImageStore(cache_dir).resolve("busybox"), ctd.dir / "busybox.tar", IMAGE)
        ctd.ctr("images", "import", "--base-name", IMAGE.rsplit(":", 1)[0], str(archive))
        yield ctd
    finally:
        ctd.stop()
        assert not ctd.shims(), "a shim outlived containerd's teardown"
