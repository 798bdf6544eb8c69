"""A coherence probe for a read-write host volume (shared by tests/sandbox/test_volume_coherence.py and
bench/vfs_cache_bench.py): what a container sees of the host's changes, how soon, and what is on the
host after QEMU is killed.

The probe (C, static) looks at /vol first (reads f on a descriptor it keeps, maps m MAP_SHARED, stats
grow, gone and the missing name new, lists the directory), then waits for the host's changes (the
host rewrites f and m in place, appends to grow, creates new and listed, removes gone, then creates
go), and for each one reports how long until it saw it (polling for up to STALE_MS): "coherent after N
ms" or "STALE". Then it writes through the mapping (msync), writes w and fsyncs it, writes u without
syncing, prints "synced" and waits to be killed with its VM.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pykata.config import Config
from pykata.images.store import ImageStore
from pykata.sandbox.ocispec import Volume, build_spec
from pykata.sandbox.sandbox import Sandbox

STALE_MS = 3000

PROBE_C = r"""
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
static int fd;
static char *m;
static long now_ms(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000 + t.tv_nsec / 1000000;
}
static int fd_sees(void) { char b[4]; return pread(fd, b, 4, 0) == 4 && !memcmp(b, "HOST", 4); }
static int open_sees(void) {
    char b[4]; int f = open("/vol/f", O_RDONLY); int ok = f >= 0 && read(f, b, 4) == 4 && !memcmp(b, "HOST", 4);
    if (f >= 0) close(f); return ok;
}
static int size_sees(void) { struct stat st; return !stat("/vol/grow", &st) && st.st_size == 8; }
static int new_seen(void) { struct stat st; return !stat("/vol/new", &st); }
static int gone_seen(void) { struct stat st; return stat("/vol/gone", &st) && errno == ENOENT; }
static int map_sees(void) { return m != MAP_FAILED && !memcmp(m, "HMAP", 4); }
static int listed(void) {
    DIR *d = opendir("/vol"); struct dirent *e; int ok = 0;
    while (d && (e = readdir(d))) if (!strcmp(e->d_name, "listed")) ok = 1;
    if (d) closedir(d); return ok;
}
static void check(const char *name, int (*seen)(void)) {
    long t0 = now_ms(); int ok;
    while (!(ok = seen()) && now_ms() - t0 < STALE_MS) usleep(20000);
    if (ok) printf("%s: coherent after %ld ms\n", name, now_ms() - t0); else printf("%s: STALE\n", name);
    fflush(stdout);
}
int main(void) {
    struct stat st;
    fd = open("/vol/f", O_RDWR);
    int mfd = open("/vol/m", O_RDWR);
    m = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    if (m == MAP_FAILED) { printf("mmap: %s\n", strerror(errno)); fflush(stdout); }
    fd_sees(); size_sees(); new_seen(); gone_seen(); map_sees(); listed(); open_sees();
    close(open("/vol/ready", O_CREAT | O_WRONLY, 0644));
    long t0 = now_ms();
    while (stat("/vol/go", &st) && now_ms() - t0 < 30000) usleep(20000);
    check("open descriptor reads the host's write", fd_sees);
    check("a new open reads the host's write", open_sees);
    check("stat sees the host's append", size_sees);
    check("a name the host made", new_seen);
    check("a name the host removed", gone_seen);
    check("readdir lists the host's new file", listed);
    if (m != MAP_FAILED) check("a MAP_SHARED mapping sees the host's write", map_sees);
    if (m != MAP_FAILED) { memcpy(m + 100, "MAPPED", 6); if (msync(m, 4096, MS_SYNC)) perror("msync"); }
    int w = open("/vol/w", O_CREAT | O_WRONLY | O_TRUNC, 0644);
    if (write(w, "WRITTEN", 7) != 7 || fsync(w)) perror("write/fsync");
    int u = open("/vol/u", O_CREAT | O_WRONLY | O_TRUNC, 0644);
    if (write(u, "UNSYNCED", 8) != 8) perror("write");
    printf("synced\n");
    fflush(stdout);
    pause();
    return 0;
}
""".replace("STALE_MS", str(STALE_MS))


@dataclass
class Coherence:
    """What the probe saw (check -> ms until coherent, None: stale) and found on the host after the kill."""

    seen: dict[str, int | None] = field(default_factory=dict)
    mmap_error: str = ""
    durable: dict[str, bool] = field(default_factory=dict)
    output: str = ""


async def _wait_for(path: Path, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not path.exists():
        assert loop.time() < deadline, f"{path} did not appear"
        await asyncio.sleep(0.05)


def build_probe(directory: Path) -> Path:
    (directory / "probe.c").write_text(PROBE_C)
    subprocess.run(["gcc", "-static", "-O1", "-o", str(directory / "probe"), str(directory / "probe.c")], check=True)
    return directory / "probe"


async def probe_volume(config: Config, probe: Path) -> tuple[Coherence, str]:
    """Run the probe in a sandbox of `config` with a fresh host directory as its /vol; the VM's QEMU
    is killed once the probe synced. Returns what it saw and the VM's shared file system."""
    image = ImageStore(Path(config.runtime.cache_path)).resolve("busybox")
    vol = Path(tempfile.mkdtemp(prefix="pykata-cohvol-"))
    bin_dir = Path(tempfile.mkdtemp(prefix="pykata-cohbin-"))
    (bin_dir / "probe").write_bytes(probe.read_bytes())
    (bin_dir / "probe").chmod(0o755)
    (vol / "f").write_bytes(b"aaaa")
    (vol / "m").write_bytes(b"m" * 4096)
    (vol / "grow").write_bytes(b"1234")
    (vol / "gone").write_bytes(b"x")
    result = Coherence()
    sb = await Sandbox.create(config=config, serve_proxy=False)
    try:
        assert sb.vm is not None and sb.vm.pid is not None
        shared_fs = sb.vm.shared_fs
        c = await sb.create_container("coh", build_spec(["/p/probe"], env=["PATH=/bin"]), image.rootfs,
                                      volumes=[Volume(vol, "/vol"), Volume(bin_dir, "/p", True)])
        await c.start()
        await _wait_for(vol / "ready", 120)
        for name, data in (("f", b"HOST"), ("m", b"HMAP")):  # in place: the same inode, the same size
            fd = os.open(vol / name, os.O_WRONLY)
            os.pwrite(fd, data, 0)
            os.close(fd)
        with open(vol / "grow", "ab") as f:
            f.write(b"5678")
        (vol / "new").touch()
        (vol / "listed").touch()
        (vol / "gone").unlink()
        (vol / "go").touch()
        out = b""
        async for chunk in c.init.chunks():
            out += chunk
            if b"synced" in out:
                break
        result.output = out.decode(errors="replace")
        os.kill(sb.vm.pid, signal.SIGKILL)
        for line in result.output.splitlines():
            if m := re.match(r"^(.*): coherent after (\d+) ms$", line):
                result.seen[m.group(1)] = int(m.group(2))
            elif m := re.match(r"^(.*): STALE$", line):
                result.seen[m.group(1)] = None
            elif line.startswith("mmap: "):
                result.mmap_error = line[6:]
        result.durable = {
            "msync'd mapping": (vol / "m").read_bytes()[100:106] == b"MAPPED",
            "fsync'd write": (vol / "w").exists() and (vol / "w").read_bytes() == b"WRITTEN",
            "unsynced write": (vol / "u").exists() and (vol / "u").read_bytes() == b"UNSYNCED",
        }
    finally:
        await sb.stop()
        for d in (vol, bin_dir):
            for f in d.iterdir():
                f.unlink()
            d.rmdir()
    return result, shared_fs
