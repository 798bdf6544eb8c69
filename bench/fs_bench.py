#!/usr/bin/env python3
"""Filesystem benchmark: metadata operations on a container's root filesystem, runc vs pykata on the
same bundle, in one run.

A static probe (bench/data/fsbench.c, built with gcc) runs as the container's process on a busybox
bundle to which a tree of 2000 files in 110 directories is added under /usr/share/fsbench:
  create / stat / unlink  N files (default 2000) in /tmp: the container's writable layer
  walk                    readdir + lstat of every entry below /usr: the image's read-only layers
  rewalk                  the same walk again (the guest's dentries and inodes now exist)
Each runtime runs the bundle --runs times (a fresh container each time); the median is reported:
  runc         `runc run` on the host (the baseline), its root an overlay as containerd's overlayfs
               snapshotter makes it for `ctr run`: the image's tree the lower layer, a fresh upper for
               each container (so a first walk makes the overlay's dentries and inodes, on the host)
  runc-dir     `runc run` on the bundle's rootfs directory itself (no overlay: what this bench
               compared with before; its walk is a walk of dentries that exist since the tree was written)
  pykata       `pykata run` with runtime.rootfs_upper = "guest" (overlay in the guest, upper on tmpfs,
               the image a read-only ext4 disk in an image slot: runtime.rootfs_block_slots)
  pykata-9p    as pykata, the image through the shared directory instead (rootfs_block_slots = 0)
  pykata-host  `pykata run` with runtime.rootfs_upper = "host" (overlay on the host, through 9p/virtio-fs)
  pykata-vfs   as pykata, but a cold-booted VM (factory.enable_template = false)
  pykata-vfs-shared  as pykata-vfs, the image through virtio-fs (rootfs_block_slots = 0)
With --emptydir, a second table: the same probe with /tmp an emptyDir volume of a CRI pod (the bundle
carries the pod uid annotation; the volume is kubelet's directory <kubelet root>/pods/<uid>/volumes/
kubernetes.io~empty-dir/scratch under a temp kubelet root), so create/stat/unlink run in the volume:
  runc                 `runc run` on the overlay root, /tmp a bind of the host directory (what runc does)
  pykata               the volume made in the guest (a tmpfs: pykata.resources.emptydir)
  pykata-host-shared   runtime.disable_guest_empty_dir = true: the host directory over the shared
                       file system (9p in templated VMs), as before: what a hostPath or `-v` volume gets
  pykata-vfs-host-shared  as pykata-host-shared in a cold-booted VM (factory.enable_template = false):
                       the host directory over virtio-fs (what `pykata run --shared-fs virtio-fs` or the
                       shared_fs annotation give a volume); skipped with --no-vfs; with
                       `--vfs-cache auto,always,none` once per hypervisor.qemu.virtio_fs_cache mode
                       (pykata-vfs-host-shared-MODE; coherence per mode: bench/vfs_cache_bench.py)
The pykata columns use the configuration in force ($PYKATA_CONFIG or the packaged one: templated VMs,
so 9p); the others change keys of the packaged configuration. Runtimes take turns within each run.

Wall times on a shared host measure its load as much as the file systems (a busy host stretches a VM's
phases 2-3x and runc's create from 0.07 s to 1.4 s). `--gap MS` adds the CPU time of each phase, which
load changes far less (at load 10 still up to ~2x): the probe pauses MS milliseconds around each
phase; for runc it reports its own CPU time, for pykata the host samples the CPU time of the VM's vCPU
threads (QEMU's `CPU n/...` threads of the `pykata run`, every 2 ms) and sums it over each phase,
placed by the guest's own timestamps (the first phase starts after the first stretch of idle vCPU).
The pauses would let the image prewarm (runtime.rootfs_prewarm) run between phases, so --gap turns it
off: the figures are the cold costs. `--prewarm N` sets runtime.rootfs_prewarm for every pykata column;
`--variant NAME=SECTION.KEY=VALUE` adds a column pykata-NAME with one key of the configuration in force
changed (any number of them).

    .venv/bin/python bench/fs_bench.py [--files 2000] [--runs 3] [--no-host] [--no-vfs] [--no-shared]
                                       [--no-runc-dir] [--gap 300] [--prewarm N] [--variant NAME=SECTION.KEY=VALUE ...]
                                       [--emptydir | --only-emptydir]
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from pykata.config.load import packaged_default_text
from pykata.images import ImageStore
from pykata.resources.emptydir import EMPTY_DIR_PLUGIN, SANDBOX_UID_ANNOTATION
from pykata.sandbox import build_spec

ROOT = Path(__file__).resolve().parents[1]
PYKATA = str(ROOT / ".venv/bin/pykata")
PROBE = ROOT / "bench/data/fsbench.c"
OPS = ("create", "stat", "unlink", "walk", "rewalk")
SAMPLE_INTERVAL = 0.002


class Phase:
    """One phase as the probe printed it: wall seconds, the probe's CPU seconds, its start (the
    clock of the machine it ran on: the guest's for pykata)."""

    def __init__(self, wall: float, cpu: float, start: float) -> None:
        self.wall, self.cpu, self.start = wall, cpu, start


def make_bundle(tmp: Path, files: int, gap_ms: int) -> Path:
    rootfs = ImageStore(tmp / "cache").resolve("busybox").rootfs
    bundle = tmp / "bundle"
    shutil.copytree(rootfs, bundle / "rootfs", symlinks=True)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(bundle / "rootfs/bin/fsbench"), str(PROBE)], check=True)
    tree = bundle / "rootfs/usr/share/fsbench"
    for i in range(10):
        for j in range(10):
            d = tree / f"d{i}" / f"e{j}"
            d.mkdir(parents=True)
            for k in range(20):
                (d / f"f{k}").write_text("x")
    spec = build_spec(["/bin/fsbench", str(files), "/usr", str(gap_ms)], env=["PATH=/bin"], cwd="/",
                      user=(0, 0), hostname="fsbench")
    spec["linux"]["resources"] = {}
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def parse(out: str) -> dict[str, Phase]:
    phases = {}
    for line in out.splitlines():
        name, *values = line.split()
        if name in OPS and len(values) == 3:
            phases[name] = Phase(*map(float, values))
    if set(phases) != set(OPS):
        raise SystemExit(f"fsbench printed {out!r}")
    return phases


def _ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat[stat.rindex(")") + 2:].split()[1])
        chain.append(pid)
    return chain


def _vcpu_threads(root: int) -> list[Path]:
    """schedstat files of the vCPU threads of the QEMU that process `root` started (any depth)."""
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or not (proc / "comm").read_text().startswith("qemu-system"):
                continue
            if root not in _ancestors(int(proc.name)):
                continue
            return [t / "schedstat" for t in (proc / "task").iterdir() if (t / "comm").read_text().startswith("CPU ")]
        except OSError:
            continue
    return []


class VcpuSampler:
    """Samples (monotonic time, CPU ns of the vCPU threads) of the VM that `pid` starts, until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self._times: list[float] = []
        self._ns: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        files: list[Path] = []
        while not files and not self._stop.wait(0.01):
            files = _vcpu_threads(self.pid)
        while not self._stop.wait(SAMPLE_INTERVAL):
            try:
                ns = sum(int(f.read_text().split()[0]) for f in files)
            except OSError:
                return  # the VM is gone
            self.samples.append((time.monotonic(), ns))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _cpu(self, start: float, end: float) -> float:
        """vCPU seconds between the first sample at or after `start` and the last at or before `end`."""
        i = bisect.bisect_left(self._times, start)
        j = bisect.bisect_right(self._times, end) - 1
        return (self._ns[j] - self._ns[i]) / 1e9 if j > i else 0.0

    def phase_cpu(self, phases: dict[str, Phase], gap: float) -> dict[str, float] | None:
        """vCPU seconds of each phase. The guest's timestamps give the phases' places relative to each
        other; the first phase is put at the start of a burst of vCPU time after `gap` of near idle,
        the one that makes the phases hold the most vCPU time. None: no such place."""
        self._times = [t for t, _ in self.samples]
        self._ns = [ns for _, ns in self.samples]
        first = phases[OPS[0]].start
        best: tuple[float, float] | None = None
        for (t0, c0), (t1, c1) in zip(self.samples, self.samples[1:], strict=False):
            if t1 <= t0 or (c1 - c0) / 1e9 / (t1 - t0) < 0.3:
                continue  # not a busy sample
            if self._cpu(t0 - 0.8 * gap, t0) > 0.1 * 0.8 * gap:
                continue  # not after a pause
            score = sum(self._cpu(t0 + p.start - first - SAMPLE_INTERVAL, t0 + p.start - first + p.wall + 0.005)
                        for p in phases.values())
            if best is None or score > best[0]:
                best = (score, t0)
        if best is None:
            return None
        anchor = best[1]
        return {op: self._cpu(anchor + p.start - first - SAMPLE_INTERVAL, anchor + p.start - first + p.wall + 0.005)
                for op, p in phases.items()}


class Result:
    def __init__(self, phases: dict[str, Phase], cpu: dict[str, float] | None, load: float) -> None:
        self.phases, self.cpu, self.load = phases, cpu, load


def _load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def run_runc(bundle: Path, overlay: bool) -> Result:
    """runc on the bundle: with `overlay`, as containerd's overlayfs snapshotter gives a container its
    root (the image's tree as the lower layer, a fresh upper per container; ctr run does this), else
    on the bundle's rootfs directory itself."""
    cid = f"fsbench-{uuid.uuid4().hex[:8]}"
    work = Path(tempfile.mkdtemp(prefix="runc-", dir=bundle.parent))
    run_bundle = bundle
    mounted = None
    try:
        if overlay:
            for d in ("upper", "work", "rootfs"):
                (work / d).mkdir()
            spec = json.loads((bundle / "config.json").read_text())
            spec["root"]["path"] = str(work / "rootfs")
            (work / "config.json").write_text(json.dumps(spec))
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={bundle / 'rootfs'},"
                            f"upperdir={work / 'upper'},workdir={work / 'work'}", str(work / "rootfs")], check=True)
            mounted = work / "rootfs"
            run_bundle = work
        p = subprocess.run(["runc", "run", "--bundle", str(run_bundle), cid], capture_output=True, text=True,
                           timeout=300)
    finally:
        subprocess.run(["runc", "delete", "-f", cid], capture_output=True)
        if mounted:
            subprocess.run(["umount", str(mounted)], check=True)
        shutil.rmtree(bundle / "rootfs/tmp/fsbench", ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    if p.returncode:
        raise SystemExit(f"runc: {p.stderr}")
    phases = parse(p.stdout)
    return Result(phases, {op: ph.cpu for op, ph in phases.items()}, _load())


def run_pykata(bundle: Path, config: Path | None, gap: float) -> Result:
    env = dict(os.environ, **({"PYKATA_CONFIG": str(config)} if config else {}))
    proc = subprocess.Popen([PYKATA, "run", "--rm", str(bundle)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    sampler = VcpuSampler(proc.pid) if gap else None
    try:
        out, err = proc.communicate(timeout=1200)
    finally:
        if sampler:
            sampler.stop()
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    if proc.returncode:
        raise SystemExit(f"pykata: {err}")
    phases = parse(out)
    cpu = sampler.phase_cpu(phases, gap) if sampler else None
    if sampler and cpu is None:
        print(f"warning: could not place the phases in the VM's vCPU time ({len(sampler.samples)} samples)",
              file=sys.stderr)
    return Result(phases, cpu, _load())


def table(title: str, med: dict[str, dict[str, float]]) -> None:
    print(title)
    print(f"{'operation':<10}" + "".join(f"{k:>24}" for k in med))
    for op in OPS:
        base = med["runc"][op]
        cells = [f"{base:>24.4f}"]
        for k in med:
            if k == "runc":
                continue
            ratio = med[k][op] / base if base > 0 else float("inf")
            cells.append(f"{med[k][op]:>14.4f} ({ratio:>6.1f}x)")
        print(f"{op:<10}" + "".join(cells))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-host", action="store_true", help="skip rootfs_upper = \"host\" (slow)")
    ap.add_argument("--no-vfs", action="store_true", help="skip the cold-booted virtio-fs VM")
    ap.add_argument("--no-shared", action="store_true", help="skip the image through the shared directory")
    ap.add_argument("--no-runc-dir", action="store_true", help="skip runc on the bundle's directory itself")
    ap.add_argument("--gap", type=int, default=0, metavar="MS",
                    help="pause MS ms around each phase and report CPU time too (turns the prewarm off)")
    ap.add_argument("--prewarm", type=int, default=None, metavar="N",
                    help="runtime.rootfs_prewarm for every pykata column (default: the configuration's)")
    ap.add_argument("--emptydir", action="store_true",
                    help="also the emptyDir table: /tmp an emptyDir volume (runc, guest, host-shared)")
    ap.add_argument("--only-emptydir", action="store_true", help="only the emptyDir table")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=SECTION.KEY=VALUE",
                    help="also a column pykata-NAME: the configuration in force with one key set, e.g. "
                         "nowarm=runtime.rootfs_prewarm=0 or noerms=hypervisor.qemu.cpu_model='\"max,-erms\"'")
    ap.add_argument("--vfs-cache", default="", metavar="MODES",
                    help="the emptyDir table's virtio-fs column once per hypervisor.qemu.virtio_fs_cache mode, "
                         "e.g. auto,always,none (columns pykata-vfs-host-shared-MODE)")
    args = ap.parse_args()
    prewarm = 0 if args.gap else args.prewarm
    with tempfile.TemporaryDirectory(prefix="fsbench-") as d:
        tmp = Path(d)
        bundle = make_bundle(tmp, args.files, args.gap)
        configs: dict[str, Path | None] = {"pykata": None}
        text = packaged_default_text()
        in_force = Path(os.environ["PYKATA_CONFIG"]).read_text() if os.environ.get("PYKATA_CONFIG") else text
        if prewarm is not None:
            text = set_key(text, "runtime.rootfs_prewarm", str(prewarm))
            in_force = set_key(in_force, "runtime.rootfs_prewarm", str(prewarm))
            (tmp / "pykata.toml").write_text(in_force)
            configs["pykata"] = tmp / "pykata.toml"
        for variant in args.variant:
            name, _, setting = variant.partition("=")
            dotted, _, value = setting.partition("=")
            if not name or not dotted or not value:
                raise SystemExit(f"--variant {variant!r}: expected NAME=SECTION.KEY=VALUE")
            (tmp / f"variant-{name}.toml").write_text(set_key(in_force, dotted, value))
            configs[f"pykata-{name}"] = tmp / f"variant-{name}.toml"
        shared = ("rootfs_block_slots = 4", "rootfs_block_slots = 0")
        cold = ("enable_template = true", "enable_template = false")
        variants = {
            "pykata-9p": [shared] if not args.no_shared else None,
            "pykata-host": [('rootfs_upper = "guest"', 'rootfs_upper = "host"')] if not args.no_host else None,
            "pykata-vfs": [cold] if not args.no_vfs else None,
            "pykata-vfs-shared": [cold, shared] if not (args.no_vfs or args.no_shared) else None,
        }
        for name, changes in variants.items():
            if changes is None:
                continue
            changed = text
            for old, new in changes:
                if old not in changed:
                    raise SystemExit(f"the packaged configuration has no {old!r}")
                changed = changed.replace(old, new)
            (tmp / f"{name}.toml").write_text(changed)
            configs[name] = tmp / f"{name}.toml"
        results: dict[str, list[Result]] = {} if args.only_emptydir else {
            "runc": [], **({} if args.no_runc_dir else {"runc-dir": []}), **{k: [] for k in configs}}
        vfs_modes = [m for m in args.vfs_cache.split(",") if m]
        emptydir = EmptyDirRun(tmp, bundle, in_force, vfs_modes) if args.emptydir or args.only_emptydir else None
        ed_vfs = () if args.no_vfs else tuple(emptydir.shared_vfs) if emptydir else ()
        ed_columns = ("runc", "pykata", "pykata-host-shared", *ed_vfs)
        ed_results: dict[str, list[Result]] = {k: [] for k in ed_columns}
        gap = args.gap / 1000
        for _ in range(args.runs):
            if not args.only_emptydir:
                results["runc"].append(run_runc(bundle, overlay=True))
                if not args.no_runc_dir:
                    results["runc-dir"].append(run_runc(bundle, overlay=False))
                for name, cfg in configs.items():
                    results[name].append(run_pykata(bundle, cfg, gap))
            if emptydir is not None:
                with emptydir:
                    ed_results["runc"].append(emptydir.clean(run_runc(bundle, overlay=True)))
                    ed_results["pykata"].append(emptydir.clean(run_pykata(bundle, emptydir.guest, gap)))
                    ed_results["pykata-host-shared"].append(emptydir.clean(run_pykata(bundle, emptydir.shared, gap)))
                    for column in ed_vfs:
                        ed_results[column].append(emptydir.clean(run_pykata(bundle, emptydir.shared_vfs[column], gap)))
    prewarm_note = f", runtime.rootfs_prewarm = {prewarm}" if prewarm is not None else ""
    if results:
        report(f"{args.files} files in /tmp, walk of /usr ({args.runs} runs, median wall seconds; ratio to runc"
               f"{prewarm_note})", results, args.gap)
    if emptydir is not None:
        report(f"{args.files} files in /tmp, an emptyDir volume; walk of /usr ({args.runs} runs, median wall "
               f"seconds; ratio to runc on the host directory{prewarm_note})", ed_results, args.gap)
    loads = [r.load for v in (*results.values(), *ed_results.values()) for r in v]
    print(f"load average (1 min) after each run: min {min(loads):.2f} max {max(loads):.2f}; at the end: "
          f"{Path('/proc/loadavg').read_text().strip()}")
    return 0


def report(title: str, results: dict[str, list[Result]], gap: int) -> None:
    table(title, {k: {op: statistics.median(r.phases[op].wall for r in v) for op in OPS} for k, v in results.items()})
    if gap:
        cpu = {k: [r.cpu for r in v if r.cpu is not None] for k, v in results.items()}
        if all(cpu.values()):
            table(f"CPU seconds: runc's process, pykata's vCPUs (median of {min(map(len, cpu.values()))}+ runs; "
                  "ratio to runc)",
                  {k: {op: statistics.median(c[op] for c in v) for op in OPS} for k, v in cpu.items()})


class EmptyDirRun:
    """The bundle with /tmp an emptyDir volume while entered (its own config.json restored after), and
    the configurations of the two pykata columns: the configuration in force naming the temp kubelet
    root, and the same with the guest emptyDir off."""

    UID = "0f6b2a4e-1c9d-4e1f-9a57-fsbench00001"

    def __init__(self, tmp: Path, bundle: Path, in_force: str, vfs_modes: list[str]) -> None:
        self.bundle = bundle
        kubelet = tmp / "kubelet"
        self.volume = kubelet / "pods" / self.UID / "volumes" / EMPTY_DIR_PLUGIN / "scratch"
        self.volume.mkdir(parents=True)
        self.volume.chmod(0o777)
        text = set_or_add(in_force, "runtime.kubelet_root_dir", f'"{kubelet}"')
        self.guest = tmp / "emptydir-guest.toml"
        self.guest.write_text(set_or_add(text, "runtime.disable_guest_empty_dir", "false"))
        self.shared = tmp / "emptydir-shared.toml"
        self.shared.write_text(set_or_add(text, "runtime.disable_guest_empty_dir", "true"))
        vfs = set_or_add(self.shared.read_text(), "factory.enable_template", "false")
        self.shared_vfs: dict[str, Path] = {}  # column -> configuration
        for mode in vfs_modes or [""]:
            column = f"pykata-vfs-host-shared{'-' + mode if mode else ''}"
            self.shared_vfs[column] = tmp / f"emptydir-{column}.toml"
            self.shared_vfs[column].write_text(
                set_key(vfs, "hypervisor.qemu.virtio_fs_cache", f'"{mode}"') if mode else vfs)
        self.original = ""

    def __enter__(self) -> EmptyDirRun:
        config = self.bundle / "config.json"
        self.original = config.read_text()
        spec = json.loads(self.original)
        spec["annotations"] = {**spec.get("annotations", {}), SANDBOX_UID_ANNOTATION: self.UID}
        spec["mounts"] = [*spec.get("mounts", []), {"destination": "/tmp", "type": "bind", "source": str(self.volume),
                                                      "options": ["rbind", "rw"]}]
        config.write_text(json.dumps(spec))
        return self

    def __exit__(self, *exc: object) -> None:
        (self.bundle / "config.json").write_text(self.original)

    def clean(self, result: Result) -> Result:
        """Empty the host directory (runc wrote there; the guest's run must leave it empty)."""
        for p in self.volume.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        return result


def set_or_add(text: str, dotted: str, value: str) -> str:
    """set_key, or the key added at the top of its section when the file has no line for it."""
    section, _, key = dotted.rpartition(".")
    try:
        return set_key(text, dotted, value)
    except SystemExit:
        if f"[{section}]\n" not in text:
            raise SystemExit(f"the configuration has no [{section}] section") from None
        return text.replace(f"[{section}]\n", f"[{section}]\n{key} = {value}\n", 1)


def set_key(text: str, dotted: str, value: str) -> str:
    """`text` (a configuration file) with `dotted` (section.key, e.g. runtime.rootfs_prewarm) set to
    `value` (TOML), on the line that sets it."""
    section, _, key = dotted.rpartition(".")
    current = ""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            current = stripped.strip("[]").strip()
        elif current == section and stripped.split("=")[0].strip() == key and "=" in stripped:
            lines[i] = f"{key} = {value}"
            return "\n".join(lines) + "\n"
    raise SystemExit(f"the configuration has no {dotted} line")


if __name__ == "__main__":
    sys.exit(main())
