#!/usr/bin/env python3
"""What each crun call costs inside the guest (TCG), with and without the agent's levers.

    .venv/bin/python bench/crun_guest.py [-n 3] [--ld-cache FILE]

Boots the current guest image (the cached kernel and rootfs the sandboxes use) in a throwaway QEMU
microvm with one extra cpio appended to its initrd: the guest's /init, unchanged except that after
pykata.agent.pid1's set-up it runs a probe module (embedded below) instead of the agent, then powers
off. The probe times, over N interleaved rounds, the crun calls of a container's life (and
`crun --version` 20 times in a row, per call: finer than the guest's 4 ms clock) on a busybox bundle
made from `build_spec` (what the agent runs):

  disk      crun run from /usr/bin/crun: crun then copies itself on every call (bind mount,
            read-only remount, lazy unmount, re-exec) against CVE-2019-5736
  sealed    crun run from a sealed memfd copy made once (what the agent does): crun accepts it as
            already cloned
  +fdm      sealed, with the guest's cgroup2 remounted `favordynmods` (task migrations into a
            cgroup then skip an RCU grace period)
  rcu-exp   sealed, with /sys/kernel/rcu_expedited=1 (the sandboxes' kernel command line sets it)
  norand    rcu-exp, crun started without address-space randomization (what the agent does,
            agent.command.fixed_layout): QEMU 7.2's TCG finds translated code by virtual address,
            so at fixed addresses a crun call reuses what the previous one translated
  +ldcache  sealed, with the ld.so.cache of --ld-cache FILE in the guest's /etc, and without any (only
            with --ld-cache; images built before the builder wrote one had none, so every dynamic
            program, crun and its ten libraries, searched the library directories); norand+ldc is
            norand with it. `ldconfig -X -r TREE` on the unpacked guest tree makes one; to measure
            an image that has one, pass that image's own /etc/ld.so.cache: the columns without
            --ld-cache remove it

and a baseline: `busybox true` (a static binary), to show the floor of one process under TCG. With
--seccomp FILE, two more rows: `crun create` of the same bundle with that seccomp profile (crun compiles
it with libseccomp), and with the program that create left in crun's state directory handed back through
`run.oci.seccomp_bpf_data` (what the agent does for a later container with the same profile).
The guest clock ticks at 4 ms (HZ=250, jiffies clocksource), so figures are medians of coarse
samples. Run it beside other load and the figures move: compare the columns of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from pykata.guestimage.kernel import find_kernel  # noqa: E402
from pykata.guestimage.rootfs import find_rootfs  # noqa: E402
from pykata.hypervisor.qemu.assets import without_symbols  # noqa: E402
from pykata.sandbox import build_spec  # noqa: E402

CACHE = Path("/var/cache/pykata")
QEMU = "/usr/bin/qemu-system-x86_64"

PROBE = r'''
import base64, fcntl, json, os, subprocess, sys, time
def _median(x):  # (no statistics module in the guest image: guestimage STDLIB_DROP)
    s = sorted(x); n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
ROUNDS = int(open("/probe/rounds").read())
os.chdir("/probe")
fd = os.memfd_create("crun", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
with open("/usr/bin/crun", "rb") as f:
    os.write(fd, f.read())
fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
EXE = {"disk": "/usr/bin/crun", "sealed": f"/proc/self/fd/{fd}"}

import ctypes
_libc = ctypes.CDLL(None, use_errno=True)
NORAND = [False]

def _norand():
    _libc.personality(0x0040000)  # ADDR_NO_RANDOMIZE

def run(exe, args, n=1):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        with open("/tmp/err", "w+b") as err:
            p = subprocess.run([EXE[exe], "--root=/run/crun", *args], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=err, pass_fds=(fd,), timeout=60,
                               preexec_fn=_norand if NORAND[0] else None)
            out.append((time.perf_counter() - t) * 1e3)
            if p.returncode:
                err.seek(0)
                print("PROBE-ERROR", exe, args, err.read()[:300], flush=True)
    return out

def setting(fdm, exp, ldcache=0):
    if ldcache:
        subprocess.run(["cp", "/probe/ld.so.cache", "/etc/ld.so.cache"], check=True)
    elif os.path.exists("/etc/ld.so.cache"):
        os.unlink("/etc/ld.so.cache")
    with open("/sys/kernel/rcu_expedited", "w") as f:
        f.write("1" if exp else "0")
    opts = "remount,nsdelegate" + (",favordynmods" if fdm else "")
    subprocess.run(["mount", "-o", opts, "/sys/fs/cgroup"], check=False)

COLUMNS = [("disk", "disk", 0, 0, 0), ("sealed", "sealed", 0, 0, 0), ("+fdm", "sealed", 1, 0, 0),
           ("rcu-exp", "sealed", 0, 1, 0), ("norand", "sealed", 0, 1, 0)]
if os.path.exists("/probe/ld.so.cache"):
    COLUMNS.append(("+ldcache", "sealed", 0, 0, 1))
    COLUMNS.append(("norand+ldc", "sealed", 0, 1, 1))
if os.path.exists("/probe/columns"):
    ONLY = open("/probe/columns").read().split(",")
    COLUMNS = [c for c in COLUMNS if c[0] in ONLY]
rows = {}
def add(row, col, xs):
    rows.setdefault(row, {}).setdefault(col, []).extend(xs)
for r in range(ROUNDS):
    for col, exe, fdm, exp, ldcache in COLUMNS:
        setting(fdm, exp, ldcache)
        NORAND[0] = col.startswith("norand")
        t = time.perf_counter()
        subprocess.run(["/bin/busybox", "true"])
        add("busybox true", col, [(time.perf_counter() - t) * 1e3])
        add("crun --version", col, run(exe, ["--version"], 2))
        t = time.perf_counter()
        run(exe, ["--version"], 20)
        add("crun --version, x20/20", col, [(time.perf_counter() - t) * 1e3 / 20])
        add("crun create", col, run(exe, ["create", "--bundle=/probe/b", "c"]))
        add("crun start", col, run(exe, ["start", "c"]))
        add("crun exec --detach", col, run(exe, ["exec", "--detach", "--process=/probe/p.json", "c"], 3))
        add("crun state", col, run(exe, ["state", "c"]))
        add("crun delete --force", col, run(exe, ["delete", "--force", "c"]))
        if os.path.exists("/probe/bs/config.json"):
            add("create, +seccomp", col, run(exe, ["create", "--bundle=/probe/bs", "s"]))
            # what the agent does for the next container with that profile (agent/seccompcache.py):
            # the program crun left in its state directory, handed back through crun's annotation
            with open("/run/crun/s/seccomp.bpf", "rb") as f:
                kept = base64.b64encode(f.read()).decode()
            run(exe, ["delete", "--force", "s"])
            os.makedirs("/probe/bk", exist_ok=True)
            with open("/probe/bs/config.json") as f:
                cfg = json.load(f)
            cfg["annotations"] = {"run.oci.seccomp_bpf_data": kept}
            with open("/probe/bk/config.json", "w") as f:
                json.dump(cfg, f)
            add("create, +seccomp kept", col, run(exe, ["create", "--bundle=/probe/bk", "k"]))
            run(exe, ["delete", "--force", "k"])
cols = [c[0] for c in COLUMNS]
medians = {row: {c: _median(v[c]) for c in cols} for row, v in rows.items()}
print("PROBE-JSON", json.dumps(medians), flush=True)


def main():  # called by pykata.agent.pid1.main in place of the agent's
    from pykata.agent.pid1 import power_off
    power_off()
'''
INIT_SOURCE = ROOT / "src" / "pykata" / "guestimage" / "init"
AGENT_EXEC = "\nmain()\n"


def overlay(base_initrd: Path, work: Path, rounds: int, ld_cache: Path | None = None,
            seccomp: Path | None = None, columns: list[str] | None = None) -> Path:
    """The guest's initrd with a cpio appended that replaces /init's agent line by the probe."""
    init = subprocess.run(["cpio", "-i", "--quiet", "--to-stdout", "init"], input=base_initrd.read_bytes(),
                          capture_output=True, check=True).stdout.decode()
    if AGENT_EXEC not in init:
        raise SystemExit(f"the image's /init no longer runs the agent with {AGENT_EXEC!r}")
    tree = work / "tree"
    (tree / "probe/b/rootfs/bin").mkdir(parents=True)
    (tree / "init").write_text(init.replace(AGENT_EXEC, '\nmain("crun_guest_probe")\n'))
    os.chmod(tree / "init", 0o755)
    (tree / "usr/lib/pykata").mkdir(parents=True)
    (tree / "usr/lib/pykata/crun_guest_probe.py").write_text(PROBE)
    (tree / "probe/rounds").write_text(str(rounds))
    if columns:
        (tree / "probe/columns").write_text(",".join(columns))
    bb = tree / "probe/b/rootfs/bin"
    shutil.copy2("/bin/busybox", bb / "busybox")
    for applet in ("sh", "true", "sleep"):
        os.symlink("busybox", bb / applet)
    for d in ("proc", "sys", "dev", "tmp", "etc"):
        (tree / "probe/b/rootfs" / d).mkdir()
    spec = build_spec(["sleep", "1000000"], env=["PATH=/bin"])
    spec["root"]["path"] = "/probe/b/rootfs"
    spec["linux"]["cgroupsPath"] = "/probe/c"
    (tree / "probe/b/config.json").write_text(json.dumps(spec))
    if seccomp is not None:
        (tree / "probe/bs").mkdir()
        with_filter = {**spec, "linux": {**spec["linux"], "seccomp": json.loads(seccomp.read_text()),
                                         "cgroupsPath": "/probe/s"}}
        (tree / "probe/bs/config.json").write_text(json.dumps(with_filter))
    proc = {"args": ["true"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0},
            "capabilities": spec["process"]["capabilities"], "noNewPrivileges": True}
    (tree / "probe/p.json").write_text(json.dumps(proc))
    if ld_cache is not None:
        shutil.copy2(ld_cache, tree / "probe/ld.so.cache")
    names = subprocess.run(["find", "."], cwd=tree, capture_output=True, check=True).stdout
    extra = subprocess.run(["cpio", "-o", "--quiet", "-H", "newc", "-R", "0:0"], cwd=tree, input=names,
                           capture_output=True, check=True).stdout
    out = work / "initrd"
    data = base_initrd.read_bytes()
    out.write_bytes(data + b"\0" * (-len(data) % 4) + extra)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--ld-cache", type=Path, metavar="FILE",
                    help="an ld.so.cache for the guest's tree (`ldconfig -r TREE`): adds a column with it in /etc")
    ap.add_argument("--seccomp", type=Path, metavar="FILE",
                    help="a linux.seccomp profile (JSON; containerd's default: the spec of `ctr container "
                         "create --seccomp`): adds a row, crun create of the same bundle with that filter")
    ap.add_argument("--columns", help="only these columns, comma-separated (e.g. norand,norand+ldc)")
    args = ap.parse_args()
    kernel, rootfs = find_kernel(CACHE), find_rootfs(CACHE)
    if kernel is None or rootfs is None:
        print("no guest kernel/rootfs in the cache: run `pykata image build`", file=sys.stderr)
        return 1
    mhz = next((float(ln.split(":")[1]) for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("cpu MHz")), 0.0)
    with tempfile.TemporaryDirectory(prefix="crun-guest-") as d:
        work = Path(d)
        initrd = overlay(rootfs.initrd, work, args.n, ld_cache=args.ld_cache, seccomp=args.seccomp,
                         columns=args.columns.split(",") if args.columns else None)
        console = work / "console.log"
        argv = [QEMU, "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on", "-accel", "tcg,thread=multi",
                "-cpu", "max", "-m", "512", "-smp", "2", "-nodefaults", "-no-user-config", "-nographic",
                "-serial", f"file:{console}", "-kernel", str(without_symbols(kernel.vmlinux)), "-initrd", str(initrd),
                "-no-reboot", "-device", "virtio-serial-device", "-chardev", "null,id=agent",
                "-device", "virtserialport,chardev=agent,name=agent.channel.0",
                "-append", f"console=ttyS0 panic=-1 quiet tsc_early_khz={int(mhz * 1000)}"]
        subprocess.run(argv, check=True, timeout=900, stdin=subprocess.DEVNULL)
        text = console.read_text(errors="replace")
    for line in text.splitlines():
        if line.startswith("PROBE-ERROR"):
            print(line, file=sys.stderr)
    found = [ln for ln in text.splitlines() if ln.startswith("PROBE-JSON ")]
    if not found:
        print(text[-3000:], file=sys.stderr)
        return 1
    table = json.loads(found[-1].split(" ", 1)[1])
    cols = list(next(iter(table.values())))
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"crun in the guest (TCG), median ms over {args.n} rounds; host load average {load}")
    print(f"{'':<22}" + "".join(f"{c:>11}" for c in cols))
    for row, vals in table.items():
        print(f"{row:<22}" + "".join(f"{vals[c]:>11.0f}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
