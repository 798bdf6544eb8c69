"""A read-write host volume over 9p (a templated VM, `hypervisor.qemu.virtio_9p_cache = "mmap"`, the
default) stays coherent with the host and durable when the VM dies: the container maps a file
MAP_SHARED (which needs the client's page cache), a change the host makes reads anew on a descriptor the
container keeps open (read() stays uncached), and what the container msyncs or fsyncs is on the host
after QEMU is killed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from pykata.config import load_config
from pykata.images.store import ImageStore
from pykata.resources import mounts
from pykata.sandbox.ocispec import Volume, build_spec
from pykata.sandbox.sandbox import Sandbox

pytestmark = [pytest.mark.vm]

# Reads /vol/f on a descriptor it keeps, maps /vol/m MAP_SHARED, waits for the host's change of both,
# reads again, then writes through the mapping (msync), a file (fsync) and a file it does not sync,
# and waits to be killed with its VM.
PROBE_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
int main(void) {
    char buf[8] = {0};
    struct stat st;
    int fd = open("/vol/f", O_RDWR), mfd = open("/vol/m", O_RDWR);
    char *m = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    if (fd < 0 || m == MAP_FAILED) { perror("open/mmap"); return 1; }
    pread(fd, buf, 4, 0);
    printf("before: %s\n", buf);
    fflush(stdout);
    close(open("/vol/ready", O_CREAT | O_WRONLY, 0644));
    while (stat("/vol/go", &st)) usleep(50000);
    pread(fd, buf, 4, 0);
    printf("open fd after the host's write: %s\n", buf);
    memcpy(m + 100, "MAPPED", 6);
    if (msync(m, 4096, MS_SYNC)) { perror("msync"); return 1; }
    int w = open("/vol/w", O_CREAT | O_WRONLY | O_TRUNC, 0644);
    if (write(w, "WRITTEN", 7) != 7 || fsync(w)) { perror("write/fsync"); return 1; }
    printf("synced\n");
    fflush(stdout);
    pause();
    return 0;
}
"""


async def _wait_for(path: Path, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not path.exists():
        assert loop.time() < deadline, f"{path} did not appear"
        await asyncio.sleep(0.05)


async def test_9p_volume_coherent_with_host_and_durable_when_the_vm_dies() -> None:
    config = load_config()
    assert config.factory.enable_template and config.qemu.virtio_9p_cache == "mmap"
    image = ImageStore(Path(config.runtime.cache_path)).resolve("busybox")
    vol = Path(tempfile.mkdtemp(prefix="pykata-cohvol-"))
    (vol / "probe.c").write_text(PROBE_C)
    subprocess.run(["gcc", "-static", "-O1", "-o", str(vol / "probe"), str(vol / "probe.c")], check=True)
    (vol / "f").write_bytes(b"aaaa")
    (vol / "m").write_bytes(b"m" * 4096)
    sb = await Sandbox.create(config=config, serve_proxy=False)
    try:
        assert sb.vm is not None and sb.vm.shared_fs == "virtio-9p" and sb.vm.pid is not None
        qemu = sb.vm.pid
        c = await sb.create_container("coh", build_spec(["/vol/probe"], env=["PATH=/bin"]), image.rootfs,
                                      volumes=[Volume(vol, "/vol")])
        await c.start()
        await _wait_for(vol / "ready", 60)
        fd = os.open(vol / "f", os.O_WRONLY)  # in place: the same inode, the same size
        os.pwrite(fd, b"HOST", 0)
        os.close(fd)
        (vol / "go").touch()
        out = b""
        async for chunk in c.init.chunks():
            out += chunk
            if b"synced" in out:
                break
        assert b"before: aaaa\nopen fd after the host's write: HOST\nsynced" in out, out
        os.kill(qemu, signal.SIGKILL)
        # on the host, with the VM gone: what the container msynced and fsynced
        assert (vol / "m").read_bytes()[100:106] == b"MAPPED"
        assert (vol / "w").read_bytes() == b"WRITTEN"
    finally:
        await sb.stop()
        for f in vol.iterdir():
            f.unlink()
        vol.rmdir()
    assert mounts.mounts_under(sb.dir) == [] and not sb.dir.exists()
