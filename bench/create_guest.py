#!/usr/bin/env python3
"""Where the guest's time and CPU go in one container's life, step by step, inside one VM (TCG):

    .venv/bin/python bench/create_guest.py [-n 8] [--src NAME=DIR ...] [--keep] [--sleeper SECONDS]
        [--warm none|create|full] [--profile] [--strace] [--initrd FILE]

Boots the guest image (the cached kernel and initrd, or --initrd) cold in a throwaway QEMU microvm
(one vCPU) with the busybox image as a read-only disk in the slot the sandboxes use, and an /init that
runs a probe (its own module, appended as a second cpio) instead of the agent. The probe runs the
agent's own `AgentService` in a worker process per variant, much as a pooled VM has it: WarmUp,
ReseedRandomDev, CreateSandbox, a throwaway container of the image created and removed (--warm create,
what the pool's maker does, there before CreateSandbox; `full` also starts it and waits for its exit;
`none`); then per round
the RPCs of `ctr run --rm busybox true` with the storages and the spec the host sends (containerd's
default spec; the image disk, a tmpfs, an overlay): CreateContainer, StartContainer, WaitProcess (the
init's exit), RemoveContainer (with --keep, of the previous round's container, so that each create
finds another container of the image alive; --sleeper keeps one container running `sleep` through the
rounds, made SECONDS before them: a pod's second container).

Rounds alternate between the variants (`--src NAME=DIR`: the pykata package of source tree DIR; none:
the image's own agent) in one VM, one kernel, one crun, the workers at the same addresses (QEMU's
translations are shared): only the agent's Python differs, so an A/B of agent changes needs no image
build (`--src base=/tmp/base/src --src new=src`). Round 0 is a VM's first container of that path;
the first variant's round 0 also translates for the others, so compare round 0 across separate runs.

Per step it prints the median wall ms and the guest's CPU ms (non-idle jiffies of /proc/stat: the
clock ticks at 4 ms, so medians of coarse samples), round 0 apart from the median of the later rounds,
and the agent's own split of each CreateContainer (storages, bundle, crun create). --profile runs the
last round's CreateContainer under cProfile (the host's _lsprof: the guest image has none); --strace
adds a `crun run` of the same config under the host's strace -f -c (copied in with its libraries). Run
beside other load the absolute figures move (30% between runs at load 15): compare the variants of
one run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from pykata.config import load_config  # noqa: E402
from pykata.guestimage.cpio import CpioEntry, write_archive  # noqa: E402
from pykata.guestimage.kernel import find_kernel  # noqa: E402
from pykata.guestimage.rootfs import find_rootfs  # noqa: E402
from pykata.hypervisor.devices import root_slot_serial  # noqa: E402
from pykata.hypervisor.qemu.assets import without_symbols  # noqa: E402
from pykata.images import ImageStore  # noqa: E402
from pykata.resources.rootimage import RootImageCache, source_for  # noqa: E402

CACHE = Path("/var/cache/pykata")
AGENT_LINE = re.compile(r"created container (\S+) .* in (\d+) ms: \d+ storages (\d+), bundle (\d+), crun create (\d+)")
QEMU = "/usr/bin/qemu-system-x86_64"
INIT_SOURCE = ROOT / "src" / "pykata" / "guestimage" / "init"
AGENT_EXEC = "\nmain()\n"

PROBE = r'''
"""create_guest probe: PID 1 of the VM (after pykata.agent.pid1's set-up)."""
import json, os, subprocess, sys, time

def main():
    conf = json.load(open("/probe/conf.json"))
    workers = {}
    mark_fd = -1
    if conf.get("host_cpu"):
        for d in os.listdir("/sys/class/virtio-ports"):
            if open(f"/sys/class/virtio-ports/{d}/name").read().strip() == "agent.channel.0":
                mark_fd = os.open(f"/dev/{d}", os.O_RDWR)
                os.set_inheritable(mark_fd, True)
    for name in conf["variants"]:
        env = dict(os.environ, PYTHONPATH=(f"/probe/src-{name}:" if name != "image" else "") + "/usr/lib/pykata",
                   PROBE_MARK_FD=str(mark_fd))
        workers[name] = subprocess.Popen(
            [sys.executable, "-S", "-B", "/usr/lib/pykata/create_guest_probe.py", "worker", name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1, preexec_fn=fixed,
            close_fds=False)
        line = workers[name].stdout.readline()
        print("PROBE-READY", name, line.strip(), flush=True)
    rounds = conf["rounds"] + (1 if conf["strace"] else 0)
    for r in range(rounds):
        order = list(workers) if r % 2 == 0 else list(workers)[::-1]
        for name in order:
            w = workers[name]
            w.stdin.write(json.dumps({"round": r, "strace": conf["strace"] and r == rounds - 1}) + "\n")
            line = w.stdout.readline()
            print("PROBE-ROUND", name, line.strip(), flush=True)
    for w in workers.values():
        w.stdin.close()
        w.wait()
    print("PROBE-DONE", flush=True)
    from pykata.agent.pid1 import power_off
    power_off()


def fixed():
    # every worker at the same addresses: QEMU finds translated code by virtual address, so the
    # workers share the translations of the interpreter and crun instead of each paying its own
    import ctypes
    ctypes.CDLL(None).personality(0x0040000)  # ADDR_NO_RANDOMIZE


def cpu_ticks():
    with open("/proc/stat") as f:
        parts = f.readline().split()
    vals = [int(x) for x in parts[1:]]
    return sum(vals) - vals[3] - vals[4]  # all but idle and iowait


def request(conf, state, cid):
    """The spec and storages of `ctr run --rm busybox true` as the host sends them to the guest."""
    from pathlib import Path
    from pykata.agent import warmup
    from pykata.protocols.agent import agent_pb2
    base = f"{state}/storage/{cid}"
    spec = warmup.default_spec(Path(f"{base}/rootfs"), "", cid)
    spec["process"]["args"] = ["true"]
    spec["process"]["env"] = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    for m in spec["mounts"]:
        if m["destination"] == "/dev/shm":
            m["source"] = "pykata-pod-shm"
    del spec["linux"]["cgroupsPath"]
    storages = [
        agent_pb2.Storage(driver="virtio-blk", source="serial:" + conf["serial"], fstype="ext4",
                          mount_point=f"{base}/lower", options=["ro"],
                          driver_options=[f"prefetch={conf['prefetch']}"]),
        agent_pb2.Storage(driver="tmpfs", source="tmpfs", fstype="tmpfs", mount_point=f"{base}/scratch",
                          options=["mode=0700"]),
        agent_pb2.Storage(driver="local", mount_point=f"{base}/scratch/upper", driver_options=["mode=755"]),
        agent_pb2.Storage(driver="local", mount_point=f"{base}/scratch/work", driver_options=["mode=700"]),
        agent_pb2.Storage(driver="overlay", source="overlay", fstype="overlay", mount_point=f"{base}/rootfs",
                          options=[f"lowerdir={base}/lower", f"upperdir={base}/scratch/upper",
                                   f"workdir={base}/scratch/work", "xino=on"]),
    ]
    return spec, storages


async def round_trip(svc, conf, state, cid, full):
    from pykata.protocols.agent import agent_pb2
    spec, storages = request(conf, state, cid)
    await svc.CreateContainer(agent_pb2.CreateContainerRequest(
        container_id=cid, oci_spec_json=json.dumps(spec), storages=storages), None)
    if full:
        await svc.StartContainer(agent_pb2.StartContainerRequest(container_id=cid), None)
        await svc.WaitProcess(agent_pb2.WaitProcessRequest(container_id=cid), None)
    await svc.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id=cid), None)


def worker(name):
    if name != "image":  # ahead of this script's own directory (/usr/lib/pykata), which Python put first
        sys.path.insert(0, f"/probe/src-{name}")
    import asyncio, logging
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="pykata-agent: %(levelname)s %(name)s: %(message)s")
    asyncio.run(work(name))


async def work(name):
    import asyncio
    from pykata.agent import warmup  # noqa: F401  (imported before the rounds, as the agent has it)
    from pykata.agent.service import AgentService
    from pykata.agent.settings import AgentSettings
    from pykata.protocols.agent import agent_pb2
    conf = json.load(open("/probe/conf.json"))
    state = f"/run/pa-{name}"
    svc = AgentService(AgentSettings(state_dir=__import__("pathlib").Path(state), cgroup_parent=f"pykata-{name}"))
    await svc.start()
    hz = os.sysconf("SC_CLK_TCK")
    await svc.WarmUp(agent_pb2.WarmUpRequest(), None)
    reseeded = svc.ReseedRandomDev(agent_pb2.ReseedRandomDevRequest(data=os.urandom(64),
                                   boot_id="12345678-1234-1234-1234-1234567890ab"), None)
    if asyncio.iscoroutine(reseeded):  # a plain function since the agent answers it in the loop's turn
        await reseeded
    await svc.CreateSandbox(agent_pb2.CreateSandboxRequest(sandbox_id=f"sb{name}", hostname="probe"), None)
    if conf["warm"] != "none":
        # the throwaway container a pooled VM's maker creates (and with "full" also starts, waits for
        # and) removes through CreateContainer's own path before the pod comes
        await round_trip(svc, conf, state, "warm", full=conf["warm"] == "full")
    if conf["sleeper"]:
        # a container that keeps running through the rounds (a pod's first container, as its pause)
        spec, storages = request(conf, state, "sleeper")
        spec["process"]["args"] = ["sleep", "100000"]
        await svc.CreateContainer(agent_pb2.CreateContainerRequest(
            container_id="sleeper", oci_spec_json=json.dumps(spec), storages=storages), None)
        await svc.StartContainer(agent_pb2.StartContainerRequest(container_id="sleeper"), None)
        await asyncio.sleep(conf["sleeper"])
    print(json.dumps({"ready": True}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line)
        r = cmd["round"]
        cid = f"c{r}"
        spec, storages = request(conf, state, cid)
        out = {}
        mark_fd = int(os.environ.get("PROBE_MARK_FD", "-1"))
        def host_mark():
            # the host reads its vCPU thread's CPU time and answers; the vCPU idles meanwhile
            if mark_fd >= 0:
                os.write(mark_fd, b"m")
                os.read(mark_fd, 1)
        host_mark()
        t0, c0 = time.perf_counter(), cpu_ticks()
        def step(label):
            nonlocal t0, c0
            host_mark()
            t, c = time.perf_counter(), cpu_ticks()
            out[label] = [round((t - t0) * 1000, 1), round((c - c0) * 1000 / hz, 1)]
            t0, c0 = t, c
        create = svc.CreateContainer(agent_pb2.CreateContainerRequest(
            container_id=cid, oci_spec_json=json.dumps(spec), storages=storages), None)
        if conf["profile"] and r >= 1:
            sys.path.append("/probe/lsprof")  # the guest's Python has no _lsprof: the host's (3.11 ABI)
            import cProfile, io, pstats
            global PROF
            if "PROF" not in globals():
                PROF = cProfile.Profile()
            prof = PROF
            prof.enable()
            await create
            prof.disable()
        if conf["profile"] and r == conf["rounds"] - 1:
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(45)
            for ln in text.getvalue().splitlines():
                print("PROBE-PROFILE", ln, file=sys.stderr, flush=True)
        if not conf["profile"] or r < 1:
            await create
        step("CreateContainer")
        if cmd.get("strace"):
            # crun run of the same config (the root is still mounted), traced with its children
            cfg = json.load(open(f"{state}/bundles/{cid}/config.json"))
            cfg["linux"]["cgroupsPath"] = f"/pykata-{name}/traced"
            os.makedirs("/tmp/traced", exist_ok=True)
            json.dump(cfg, open("/tmp/traced/config.json", "w"))
            subprocess.run(["/lib64/ld-linux-x86-64.so.2", "--library-path", "/probe/strace", "/probe/strace/strace",
                            "-f", "-c", "-o", f"/tmp/strace-{name}-run", "/usr/bin/crun", "--root=/run/traced",
                            "run", "--bundle=/tmp/traced", "traced"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, check=False)
            subprocess.run(["/lib64/ld-linux-x86-64.so.2", "--library-path", "/probe/strace", "/probe/strace/strace",
                            "-f", "-c", "-o", f"/tmp/strace-{name}-delete", "/usr/bin/crun", "--root=/run/traced",
                            "delete", "--force", "traced"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, check=False)
            t0, c0 = time.perf_counter(), cpu_ticks()
        await svc.StartContainer(agent_pb2.StartContainerRequest(container_id=cid), None)
        step("StartContainer")
        resp = await svc.WaitProcess(agent_pb2.WaitProcessRequest(container_id=cid), None)
        step("WaitProcess (init's exit)")
        # with --keep, the previous round's container (its storages still mounted) goes only now
        gone = f"c{r - 1}" if conf["keep"] else cid
        if not conf["keep"] or r > 0:
            await svc.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id=gone), None)
        step("RemoveContainer")
        out["exit_status"] = resp.exit_status
        with open("/proc/self/mountinfo") as f:
            out["agent_mounts"] = sum(1 for _ in f)
        if cmd.get("strace"):
            for action in ("run", "delete"):
                p = f"/tmp/strace-{name}-{action}"
                if os.path.exists(p):
                    out[f"strace {action}"] = open(p).read()
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "worker":
        worker(sys.argv[2])
    else:
        main()
'''


def strace_files() -> list[tuple[str, bytes]]:
    """The host's strace and the libraries it needs, for the guest's /probe/strace."""
    exe = shutil.which("strace")
    if exe is None:
        raise SystemExit("--strace: no strace on the host")
    out = [("strace", Path(exe).read_bytes())]
    ldd = subprocess.run(["ldd", exe], capture_output=True, text=True, check=True).stdout
    for line in ldd.splitlines():
        parts = line.split("=>")
        if len(parts) == 2 and parts[1].strip().startswith("/"):
            lib = parts[1].split()[0]
            if "libc.so" not in lib:
                out.append((Path(lib).name, Path(lib).read_bytes()))
    return out


def package_files(src: Path) -> list[tuple[str, bytes]]:
    """The pykata package of a source tree (its .py files), relative to the package's parent."""
    out = []
    for p in sorted((src / "pykata").rglob("*.py")):
        out.append((str(p.relative_to(src)), p.read_bytes()))
    return out


def build_initrd(base: Path, out: Path, conf: dict[str, object], srcs: dict[str, Path], strace: bool) -> Path:
    init = INIT_SOURCE.read_text()
    if AGENT_EXEC not in init:
        raise SystemExit(f"{INIT_SOURCE} no longer runs the agent with {AGENT_EXEC!r}")
    init = init.replace(AGENT_EXEC, '\nmain("create_guest_probe")\n')
    reg, dirmode = stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755
    entries = [CpioEntry("init", stat.S_IFREG | 0o755, init.encode()),
               CpioEntry("usr/lib/pykata/create_guest_probe.py", reg, PROBE.encode()),
               CpioEntry("probe", dirmode, b""),
               CpioEntry("probe/conf.json", reg, json.dumps(conf).encode())]
    made = {"probe"}

    def add(path: str, data: bytes, mode: int = reg) -> None:
        parts = path.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in made:
                made.add(d)
                entries.append(CpioEntry(d, dirmode, b""))
        entries.append(CpioEntry(path, mode, data))

    for name, src in srcs.items():
        for rel, data in package_files(src):
            add(f"probe/src-{name}/{rel}", data)
    if conf.get("profile"):
        import _lsprof  # the host's: the guest image leaves it out, and cProfile, profile and pstats
        import cProfile
        import profile
        import pstats
        add(f"probe/lsprof/{Path(_lsprof.__file__).name}", Path(_lsprof.__file__).read_bytes(), stat.S_IFREG | 0o755)
        for module in (cProfile, profile, pstats):
            add(f"probe/lsprof/{Path(str(module.__file__)).name}", Path(str(module.__file__)).read_bytes(),
                stat.S_IFREG | 0o644)
    if strace:
        for name, data in strace_files():
            add(f"probe/strace/{name}", data, stat.S_IFREG | 0o755)
    overlay = io.BytesIO()
    write_archive(entries, overlay, mtime=0)
    data = base.read_bytes()
    out.write_bytes(data + b"\0" * (-len(data) % 4) + overlay.getvalue())
    return out


def busybox_disk() -> tuple[Path, int]:
    config = load_config()
    rootfs = ImageStore(config.runtime.cache_path).resolve("busybox").rootfs
    source = source_for(rootfs, rootfs, config.runtime.cache_path)
    assert source is not None
    image = RootImageCache(config.runtime, config.image).ensure(source)
    return image.path, image.prefetch


def connect_when_bound(sock_path: Path, wait: float) -> socket.socket:
    """A connection to QEMU's unix socket `sock_path` once QEMU made it (looked for up to `wait` s)."""
    for _ in range(int(wait / 0.05)):
        if sock_path.exists():
            break
        time.sleep(0.05)
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(sock_path))
    return sock


def answer_marks(qemu: subprocess.Popen[bytes], sock_path: Path, marks: list[int]) -> None:
    """Serve the probe's step marks: for each byte it sends, record the vCPU thread's CPU ns, answer."""
    sock = connect_when_bound(sock_path, 20)
    vcpu = None
    while qemu.poll() is None:
        got = sock.recv(1)
        if not got:
            break
        if vcpu is None:
            for t in os.listdir(f"/proc/{qemu.pid}/task"):
                with open(f"/proc/{qemu.pid}/task/{t}/comm") as f:
                    if f.read().startswith("CPU 0/"):
                        vcpu = f"/proc/{qemu.pid}/task/{t}/schedstat"
        assert vcpu is not None, os.listdir(f"/proc/{qemu.pid}/task")
        with open(vcpu) as f:
            marks.append(int(f.read().split()[0]))
        sock.sendall(b"k")
    sock.close()


def sample_ip(qemu: subprocess.Popen[bytes], sock_path: Path, console: Path, hz: float,
              samples: list[tuple[int, int]], gate: Callable[[], bool] | None = None) -> None:
    """Append (RIP, CR3) of the vCPU every 1/hz s from the second PROBE-ROUND line on to PROBE-DONE
    (with `gate`, only while it says so: with --host-cpu, during CreateContainer)."""
    sock = connect_when_bound(sock_path, 10)
    f = sock.makefile("rwb")

    def call(cmd: dict[str, object]) -> dict[str, object]:
        f.write(json.dumps(cmd).encode() + b"\n")
        f.flush()
        while True:
            reply = json.loads(f.readline())
            if "return" in reply or "error" in reply:
                return reply

    f.readline()
    call({"execute": "qmp_capabilities"})
    rip = re.compile(r"RIP=([0-9a-f]+)")
    cr3 = re.compile(r"CR3=([0-9a-f]+)")
    while qemu.poll() is None:
        text = console.read_text(errors="replace") if console.exists() else ""
        if "PROBE-DONE" in text:
            break
        if text.count("PROBE-ROUND ") >= 1 and (gate is None or gate()):
            out = str(call({"execute": "human-monitor-command",
                            "arguments": {"command-line": "info registers"}}).get("return", ""))
            m, c = rip.search(out), cr3.search(out)
            if m and c:
                samples.append((int(m[1], 16), int(c[1], 16)))
        time.sleep(1 / hz)
    sock.close()


def print_samples(samples: list[tuple[int, int]], vmlinux: Path) -> None:
    import bisect
    import collections

    syms: list[tuple[int, str]] = []
    out = subprocess.run(["nm", "-n", str(vmlinux)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "tTwW":
            syms.append((int(parts[0], 16), parts[2]))
    addrs = [a for a, _ in syms]
    kern: collections.Counter[str] = collections.Counter()
    user: collections.Counter[str] = collections.Counter()
    for ip, _ in samples:
        if ip >= 0xffff800000000000:
            i = bisect.bisect_right(addrs, ip) - 1
            kern[syms[i][1] if i >= 0 else "?"] += 1
        elif ip < 0x2000000:
            user["python (non-PIE)"] += 1
        elif 0x555555554000 <= ip < 0x555555700000:
            user["crun (PIE, no ASLR)"] += 1
            user[f"  crun +{(ip - 0x555555554000) >> 12:#x}000"] += 1
        else:
            user["libraries, ld.so, other"] += 1
    n = len(samples)
    print(f"vCPU instruction pointer, {n} samples: kernel {sum(kern.values())} ({100 * sum(kern.values()) / n:.0f}%), "
          f"user {n - sum(kern.values())} ({100 * (n - sum(kern.values())) / n:.0f}%)")
    for name, k in user.most_common(30):
        print(f"  {k:5d} {100 * k / n:5.1f}%  user: {name}")
    for name, k in kern.most_common(45):
        print(f"  {k:5d} {100 * k / n:5.1f}%  {name}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=8, help="rounds per variant")
    ap.add_argument("--src", action="append", default=[], metavar="NAME=DIR",
                    help="a variant: the agent of source tree DIR (its pykata package); none: the image's agent")
    ap.add_argument("--strace", action="store_true", help="one more round with crun under strace -f -c")
    ap.add_argument("--keep", action="store_true",
                    help="each container is removed after the next one was made (its storages mounted meanwhile)")
    ap.add_argument("--warm", choices=("none", "create", "full"), default="create",
                    help="before the rounds, a throwaway container of the image: created and removed (what the "
                         "pool's maker does), also started and waited for (full), or none")
    ap.add_argument("--sleeper", type=float, default=0, metavar="SECONDS",
                    help="a container running `sleep` through the rounds (made this long before them), so that "
                         "each measured container is a pod's second")
    ap.add_argument("--profile", action="store_true",
                    help="the last round's CreateContainer under cProfile (the agent's Python, by own time)")
    ap.add_argument("--sample", type=float, default=0, metavar="HZ",
                    help="sample the vCPU's instruction pointer (QMP `info registers`) this often during the "
                         "rounds after round 0 and print where the guest kernel spends it, by function, and "
                         "the user-space share")
    ap.add_argument("--host-cpu", action="store_true",
                    help="also measure each step's guest CPU as the host's vCPU thread used it (schedstat, ns; "
                         "the guest waits for the host at each step's edges): unlike the guest's own ticks, "
                         "not inflated when the host deschedules the vCPU under load")
    ap.add_argument("--cpu", default="max", help="QEMU's -cpu (default %(default)s), e.g. max,-erms,-fsrm")
    ap.add_argument("--initrd", type=Path, help="the guest initrd (default: the cached build)")
    ap.add_argument("--json", type=Path, help="also write the raw rounds here")
    args = ap.parse_args()
    kernel, rootfs = find_kernel(CACHE), find_rootfs(CACHE)
    initrd = args.initrd or (rootfs.initrd if rootfs else None)
    if kernel is None or initrd is None:
        print("no guest kernel/rootfs in the cache: run `pykata image build`", file=sys.stderr)
        return 1
    srcs = {}
    for v in args.src:
        name, _, d = v.partition("=")
        srcs[name] = Path(d).resolve()
    variants = list(srcs) or ["image"]
    disk, prefetch = busybox_disk()
    conf = {"variants": variants, "rounds": args.n, "keep": args.keep, "strace": args.strace, "warm": args.warm,
            "sleeper": args.sleeper,
            "profile": args.profile, "host_cpu": args.host_cpu,
            "serial": root_slot_serial(0), "prefetch": prefetch}
    mhz = next((float(ln.split(":")[1]) for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("cpu MHz")), 0.0)
    load0 = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    with tempfile.TemporaryDirectory(prefix="create-guest-") as d:
        work = Path(d)
        probe_initrd = build_initrd(Path(initrd), work / "initrd", conf, srcs, args.strace)
        console = work / "console.log"
        argv = [QEMU, "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on", "-accel", "tcg,thread=multi",
                "-cpu", args.cpu, "-m", "1024", "-smp", "1", "-nodefaults", "-no-user-config", "-nographic",
                "-serial", f"file:{console}", "-kernel", str(without_symbols(kernel.vmlinux)),  # --sample: nm vmlinux
                "-initrd", str(probe_initrd),
                "-no-reboot", "-device", "virtio-serial-device", "-chardev", "null,id=agent",
                "-device", "virtserialport,chardev=agent,name=agent.channel.0",
                "-drive", f"file={disk},if=none,id=img0,format=raw,readonly=on",
                "-device", f"virtio-blk-device,drive=img0,serial={root_slot_serial(0)}",
                "-global", "virtio-mmio.force-legacy=false",
                "-append", f"console=ttyS0 panic=-1 quiet rcu_expedited=1 tsc_early_khz={int(mhz * 1000)}"]
        samples: list[tuple[int, int]] = []
        if args.sample:
            argv += ["-qmp", f"unix:{work / 'qmp.sock'},server=on,wait=off"]
        marks: list[int] = []
        if args.host_cpu:
            argv[argv.index("null,id=agent")] = f"socket,id=agent,path={work / 'mark.sock'},server=on,wait=off"
            argv += ["-name", "probe,debug-threads=on"]  # the vCPU thread is then named "CPU 0/TCG"
        qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        marker = None
        if args.host_cpu:
            import threading

            marker = threading.Thread(target=answer_marks, args=(qemu, work / "mark.sock", marks), daemon=True)
            marker.start()
        try:
            if args.sample:
                sample_ip(qemu, work / "qmp.sock", console, args.sample, samples,
                          (lambda: len(marks) % 5 == 1) if args.host_cpu else None)
            if qemu.wait(timeout=1800) != 0:
                raise subprocess.CalledProcessError(qemu.returncode, argv)
        finally:
            if qemu.poll() is None:
                qemu.kill()
                qemu.wait()
        text = console.read_text(errors="replace")
    if os.environ.get("CREATE_GUEST_CONSOLE"):
        Path(os.environ["CREATE_GUEST_CONSOLE"]).write_text(text)
    rounds: dict[str, list[dict[str, object]]] = {v: [] for v in variants}
    seen = 0
    for line in text.splitlines():
        if line.startswith("PROBE-ROUND "):
            _, name, doc = line.split(" ", 2)
            try:
                got = json.loads(doc)
                edges = marks[5 * seen:5 * seen + 5]
                seen += 1
                if len(edges) == 5:
                    labels = [k for k, v in got.items() if isinstance(v, list)]
                    got["vcpu_ms"] = {k: (b - a) / 1e6 for k, a, b in zip(labels, edges, edges[1:], strict=False)}
                rounds[name].append(got)
            except ValueError:
                print(f"{name}: a round failed (console: CREATE_GUEST_CONSOLE=FILE keeps it)", file=sys.stderr)
    if not all(rounds.values()) or "PROBE-DONE" not in text:
        print(text[-4000:], file=sys.stderr)
        return 1
    # the agent's own split of each CreateContainer (its log line comes before the round's line)
    splits: dict[str, list[list[float]]] = {}
    pending: list[float] | None = None
    for line in text.splitlines():
        if line.startswith("PROBE-ROUND ") and pending is not None:
            splits.setdefault(line.split()[1], []).append(pending)
            pending = None
        m = AGENT_LINE.search(line)
        if m and not m[1].startswith("pykata"):
            pending = [float(x) for x in m.groups()[1:]]
    if args.json:
        args.json.write_text(json.dumps(rounds))
    load1 = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    steps = [k for k, v in rounds[variants[0]][0].items() if isinstance(v, list)]
    print(f"guest steps of one container (TCG, 1 vCPU), wall ms / guest CPU ms: round 0 | median of rounds "
          f"1..{args.n - 1}; load {load0} -> {load1}")
    for name in variants:
        rs = [r for r in rounds[name] if not any(k.startswith("strace") for k in r)]
        print(f"{name}:")
        tot0 = [0.0, 0.0]
        totm = [0.0, 0.0]
        for s in steps:
            first = rs[0][s]
            later = sorted(r[s] for r in rs[1:]) if len(rs) > 1 else [first]
            wall = sorted(x[0] for x in later)[len(later) // 2]
            cpu = sorted(x[1] for x in later)[len(later) // 2]
            tot0 = [tot0[0] + first[0], tot0[1] + first[1]]
            totm = [totm[0] + wall, totm[1] + cpu]
            print(f"  {s:<28}{first[0]:8.0f}{first[1]:6.0f} |{wall:8.0f}{cpu:6.0f}")
        print(f"  {'total':<28}{tot0[0]:8.0f}{tot0[1]:6.0f} |{totm[0]:8.0f}{totm[1]:6.0f}")
        sp = splits.get(name, [])
        if len(sp) > 1:
            med = [sorted(col)[len(col) // 2] for col in zip(*sp[1:], strict=True)]
            print(f"  the agent's split of CreateContainer (ms, total = storages + bundle + crun create): round 0 "
                  f"{' '.join(f'{x:.0f}' for x in sp[0])} | median {' '.join(f'{x:.0f}' for x in med)}")
        print(f"  agent's mounts after a round: {rs[-1].get('agent_mounts')}; exit status {rs[-1].get('exit_status')}")
        host = [r["vcpu_ms"] for r in rs[1:] if isinstance(r.get("vcpu_ms"), dict)]
        if host:
            parts = []
            for s in steps:
                vals = sorted(h[s] for h in host if s in h)
                parts.append(f"{s.split()[0]} {vals[len(vals) // 2]:.1f} (p25 {vals[len(vals) // 4]:.1f})")
            tot = sorted(sum(h.values()) for h in host)
            first = rs[0].get("vcpu_ms")
            zero = f"{sum(first.values()):.1f}" if isinstance(first, dict) else "?"
            print(f"  host's vCPU thread, CPU ms, median of rounds 1..: {', '.join(parts)}; "
                  f"total {tot[len(tot) // 2]:.1f} (round 0: {zero})")
        for r in rounds[name]:
            for k, v in r.items():
                if k.startswith("strace"):
                    print(f"  --- {k}\n{v}")
    if samples:
        print_samples(samples, kernel.vmlinux)
    profile = [ln.split("PROBE-PROFILE", 1)[1] for ln in text.splitlines() if "PROBE-PROFILE" in ln]
    if profile:
        print("the last round's CreateContainer under cProfile:")
        print("\n".join(profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
