"""Real software as a new user runs it: the Debian bookworm image with python3.11 and its regression tests
(scripts/debian-rootfs.sh) imported into a private containerd (tests/shim/harness.py) and run with
`ctr run --rm` under runc and under pykata (io.containerd.pykata.v2), one container per module and
runtime, interleaved, the container's cwd and TMPDIR on:
  root       /tmp of the container's root file system (containerd's overlayfs snapshot under runc; the
             guest's overlay, its upper a guest tmpfs, under pykata)
  emptydir   /scratch, a CRI pod's emptyDir: kubelet's directory <kubelet root>/pods/<uid>/volumes/
             kubernetes.io~empty-dir/scratch bound in, with the pod uid annotation CRI gives (a host
             directory under runc, a guest tmpfs under pykata: pykata.resources.emptydir)
  hostpath   /scratch, a host directory bound in (9p in a templated VM under pykata)
Prints, per module and place, each runtime's outcome counts and time inside the container, the ratio,
and the tests whose outcome differs; --out keeps each run's output (stdout: RESULT lines, stderr: the
tracebacks) for a look at the causes.

    .venv/bin/python bench/real_software_ctr.py [--where root,emptydir,hostpath] [--modules test_os,...]
        [--timeout 900] [--out DIR]

A module `name:Part1,Part2` runs only the tests whose id has a component starting with a part
(tests/cli/data/pytests.py).

--suite apps runs real programs instead, on a rootfs with their Debian packages too (scripts/debian-rootfs.sh
apps; cached like the first): bench/data/real_software/*.sh, each a series of checks printed as RESULT lines
  sqlite_cli  the sqlite3 CLI: WAL (its -shm MAP_SHARED, locks) with two writer processes and a reader,
              integrity_check, checkpoint, .backup, .dump round trip, VACUUM; a rollback journal the same
  postgres    PostgreSQL 15: initdb -k, start (Unix socket in /var/run/postgresql), pgbench -i and a short
              run with fsync on, stop, pg_checksums, restart, pg_amcheck, crash (immediate stop), recovery
  git_tar     git init/commit/renames, local and --no-local clone, gc, fsck, repack, verify-pack,
              worktree; tar --xattrs and cp -a of a tree with hard links, user.* xattrs, a sparse file, a
              FIFO; cp --sparse=always and du (INFO lines: du figures)
  servers     a server and its client in one container: redis (Unix sockets in /run and in the place, TCP
              on 127.0.0.1, RDB, BGSAVE, AOF rewrite, restart, redis-benchmark), nginx (sendfile of the
              place's files to curl over Unix sockets and TCP, ranges, autoindex, reload), memcached (nc)
  tree_ops    coreutils, findutils, tar, cpio and rsync on a tree with odd names, permissions and special
              files; copies compared with their source, errors and exit codes as another user too
  sqlite_probe  the python3 sqlite3 module: WAL with two processes (also in the default suite)
Besides their checks, suites print what commands said (lib.sh `same`: exit code, stdout and stderr), and
the driver shows every output that differs between the runtimes as a diff.
The run ends with a table: software, place, each runtime's checks (ok/failed), outputs compared (and
those that differ), and pykata's wall time over runc's.

--suite cpython-more runs MORE_MODULES, the regression tests the default suite does not (mailbox, dbm,
compileall, gzip, threading, selectors, socketserver, httpservers, logging, asyncio's Unix events, the
whole test_socket, ...), on the first rootfs.

    .venv/bin/python bench/real_software_ctr.py --suite apps [--where root,emptydir,hostpath] --out DIR
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pykata.resources.emptydir import EMPTY_DIR_PLUGIN, SANDBOX_UID_ANNOTATION
from tests.cli.test_real_software import DRIVER, debian_rootfs, module_times, outcomes, outputs
from tests.cri.harness import admin_config
from tests.shim.harness import PYKATA_RUNTIME, RUNC_RUNTIME, Containerd

IMAGE = "pykata.local/debian-pytests:latest"
SUITE_DIR = Path(__file__).resolve().parent / "data/real_software"
APPS = ("sqlite_cli", "postgres", "git_tar", "servers", "tree_ops", "sqlite_probe")
RUNTIMES = {"runc": RUNC_RUNTIME, "pykata": PYKATA_RUNTIME}
# The modules: file-system and process semantics, and statistics as a CPU-only control. test_io and
# test_socket are cut to their file and AF_UNIX parts (the image has no network; runc's has lo down).
MODULES = (
    "test_os", "test_posix", "test_shutil", "test_tempfile", "test_mmap", "test_fcntl",
    "test_socket:TestUnixDomain,UnixStreamBase,SocketPairTest,TestLinuxAbstractNamespace,"
    "SendmsgUnixStreamTest,RecvmsgUnixStreamTest,RecvmsgSCMRightsStreamTest",
    "test_stat", "test_pathlib", "test_glob", "test_fileio",
    "test_io:CIOTest,CBufferedReaderTest,CBufferedWriterTest,CBufferedRandomTest,CTextIOWrapperTest,CMiscIOTest",
    "test_zipfile", "test_tarfile", "test_subprocess", "test_signal", "test_pty", "test_select", "test_time",
    "test_resource", "test_file_eintr", "test_statistics",
)
# --suite cpython-more: the modules the default suite does not run that touch files, sockets on loopback,
# processes and threads (test_socket whole: its TCP/UDP tests too, over the container's loopback).
MORE_MODULES = (
    "test_genericpath", "test_posixpath", "test_filecmp", "test_fileinput", "test_mailbox", "test_dbm_dumb",
    "test_shelve", "test_compileall", "test_py_compile", "test_zipimport", "test_gzip", "test_bz2", "test_lzma",
    "test_unicode_file", "test_unicode_file_functions", "test_threading", "test_threadsignals", "test_wait4",
    "test_fork1", "test_selectors", "test_poll", "test_epoll", "test_socketserver", "test_httpservers",
    "test_logging", "test_asyncio.test_unix_events", "test_socket", "test_uuid",
)
# Debian's libpython3.11-testsuite has no test_sqlite3; this exercises what a database does on the
# place: a WAL database (mmap'd -shm, locks) written by two processes at once, then a rollback-journal one.
SQLITE_PROBE = r"""
import os, sqlite3, sys, time
def writer(path, who, n):
    db = sqlite3.connect(path, timeout=30)
    for i in range(n):
        with db:
            db.execute("insert into t values (?, ?)", (who, i))
    db.close()
t0 = time.monotonic()
for mode in ("wal", "delete"):
    path = os.path.join(os.getcwd(), f"probe-{mode}.db")
    db = sqlite3.connect(path)
    print("RESULT", "ok" if db.execute(f"pragma journal_mode={mode}").fetchone()[0] == mode else "fail",
          f"sqlite.{mode}.journal_mode")
    db.execute("pragma mmap_size=1048576")
    db.execute("create table t (who, i)")
    db.commit()
    pid = os.fork()
    if pid == 0:
        writer(path, "child", 200)
        os._exit(0)
    writer(path, "parent", 200)
    os.waitpid(pid, 0)
    print("RESULT", "ok" if db.execute("select count(*) from t").fetchone()[0] == 400 else "fail",
          f"sqlite.{mode}.two_writers")
    print("RESULT", "ok" if db.execute("pragma integrity_check").fetchone()[0] == "ok" else "fail",
          f"sqlite.{mode}.integrity")
    if mode == "wal":
        db.execute("pragma wal_checkpoint(truncate)")
        print("RESULT", "ok" if os.path.getsize(path + "-wal") == 0 else "fail", "sqlite.wal.checkpoint")
    db.close()
print("MODULE sqlite_probe", f"{time.monotonic() - t0:.2f}")
"""
# What a program sees of each place's size (the "statfs figures that make sense"): not counted as
# tests, printed as is.
STATFS_PROBE = r"""
import os, subprocess
for path in ("/", "/usr/lib/python3.11", os.getcwd()):
    s = os.statvfs(path)
    print(f"STATFS {path} bsize={s.f_bsize} blocks={s.f_blocks} bfree={s.f_bfree} bavail={s.f_bavail} "
          f"files={s.f_files} ffree={s.f_ffree} total={s.f_blocks * s.f_frsize >> 20}MiB "
          f"used={(s.f_blocks - s.f_bfree) * s.f_frsize >> 20}MiB avail={s.f_bavail * s.f_frsize >> 20}MiB")
print(subprocess.run(["df", "-k", "/", os.getcwd()], capture_output=True, text=True).stdout, end="")
print("MODULE statfs_probe 0")
"""
ENV = ("HOME=/root", "PYTHONDONTWRITEBYTECODE=1", "LANG=C.UTF-8")


def _blob(path: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (path / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


def build_archive(rootfs: Path, work: Path) -> Path:
    """An OCI archive of `rootfs` (GNU tar: owners, modes, links, xattrs) plus a layer with the driver."""
    blobs = work / "oci/blobs/sha256"
    blobs.mkdir(parents=True)
    layer = work / "layer.tar"
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-C", str(rootfs), "-cf",
                    str(layer), "."], check=True)
    h = hashlib.sha256()
    with open(layer, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    base = (f"sha256:{h.hexdigest()}", layer.stat().st_size)
    layer.rename(blobs / h.hexdigest())
    driver = work / "driver.tar"
    with tarfile.open(driver, "w") as t:
        for name, data in (("pytests.py", DRIVER.read_bytes()), ("sqlite_probe.py", SQLITE_PROBE.encode()),
                           ("statfs_probe.py", STATFS_PROBE.encode()),
                           *((f"suites/{f.name}", f.read_bytes()) for f in sorted(SUITE_DIR.glob("*.sh")))):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            t.addfile(info, io.BytesIO(data))
    top = _blob(blobs, driver.read_bytes())
    config = _blob(blobs, json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["bash"]},
        "rootfs": {"type": "layers", "diff_ids": [base[0], top[0]]}}).encode())
    manifest = _blob(blobs, json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config[0], "size": config[1]},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": s}
                   for d, s in (base, top)]}).encode())
    (work / "oci/oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (work / "oci/index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest[0], "size": manifest[1],
         "annotations": {"org.opencontainers.image.ref.name": IMAGE}}]}))
    archive = work / "image.tar"
    subprocess.run(["tar", "-C", str(work / "oci"), "-cf", str(archive), "."], check=True)
    subprocess.run(["rm", "-rf", str(work / "oci"), str(driver)], check=True)
    return archive


def run_one(ctd: Containerd, runtime: str, where: str, module: str, kubelet: Path, hostdir: Path,
            timeout: float) -> tuple[subprocess.CompletedProcess[bytes] | None, float]:
    cid = f"rsw-{uuid.uuid4().hex[:8]}"
    args = ["run", "--rm", "--runtime", RUNTIMES[runtime]]
    cwd = "/tmp"
    if where == "emptydir":
        uid = f"uid-{cid}"
        vol = kubelet / "pods" / uid / "volumes" / EMPTY_DIR_PLUGIN / "scratch"
        vol.mkdir(parents=True)
        vol.chmod(0o777)
        args += ["--annotation", f"{SANDBOX_UID_ANNOTATION}={uid}",
                 "--mount", f"type=bind,src={vol},dst=/scratch,options=rbind:rw"]
        cwd = "/scratch"
    elif where == "hostpath":
        vol = hostdir / cid
        vol.mkdir()
        vol.chmod(0o777)
        args += ["--mount", f"type=bind,src={vol},dst=/scratch,options=rbind:rw"]
        cwd = "/scratch"
    args += ["--cwd", cwd, "--env", f"TMPDIR={cwd}", *(x for e in ENV for x in ("--env", e)), IMAGE, cid]
    if module in ("sqlite_probe", "statfs_probe"):
        args += ["python3", f"/{module}.py"]
    elif (SUITE_DIR / f"{module}.sh").exists():
        args += ["bash", f"/suites/{module}.sh"]
    else:
        args += ["python3", "/pytests.py", module]
    start = time.monotonic()
    try:
        p: subprocess.CompletedProcess[bytes] | None = ctd.ctr(*args, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        p = None
    finally:
        ctd.remove(cid)
    return p, time.monotonic() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--where", default="root,emptydir,hostpath")
    ap.add_argument("--suite", choices=("cpython", "cpython-more", "apps"), default="cpython",
                    help="CPython's regression tests (default), more of them (MORE_MODULES), or real programs "
                         "(sqlite3, PostgreSQL, git, tar, redis, nginx, memcached, coreutils, rsync)")
    ap.add_argument("--modules", default=None,
                    help="';'-separated (a module's parts are ','-separated); default: the suite's")
    ap.add_argument("--runtimes", default="runc,pykata")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    default = {"cpython": (*MODULES, "sqlite_probe"), "cpython-more": MORE_MODULES, "apps": APPS}[args.suite]
    modules = args.modules.split(";") if args.modules else list(default)
    out = args.out
    if out:
        out.mkdir(parents=True, exist_ok=True)
    rootfs = debian_rootfs("apps" if args.suite == "apps" else "")
    table: list[str] = []
    with tempfile.TemporaryDirectory(prefix="rsw-ctr-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        kubelet = work / "kubelet"
        hostdir = work / "hostpath"
        hostdir.mkdir()
        os.environ["PYKATA_CONFIG"] = str(admin_config(work / "pykata.toml", kubelet_root_dir=f'"{kubelet}"'))
        ctd = Containerd(work / "containerd")
        try:
            ctd.start()
            t0 = time.monotonic()
            ctd.ctr("images", "import", "--base-name", IMAGE.rsplit(":", 1)[0], str(build_archive(rootfs, work)),
                    timeout=600)
            print(f"image built and imported in {time.monotonic() - t0:.1f} s", flush=True)
            for module in modules:
                for where in args.where.split(","):
                    seen: dict[str, dict[str, str]] = {}
                    said: dict[str, dict[str, list[str]]] = {}
                    walls: dict[str, float] = {}
                    notes: list[str] = []
                    line = f"{module[:40]:40} {where:9}"
                    for runtime in args.runtimes.split(","):
                        p, wall = run_one(ctd, runtime, where, module, kubelet, hostdir, args.timeout)
                        load = Path("/proc/loadavg").read_text().split()[0]
                        walls[runtime] = wall
                        if p is None:
                            line += f" | {runtime} TIMEOUT {wall:.0f}s"
                            continue
                        stdout, stderr = p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
                        if out:
                            tag = f"{module.partition(':')[0]}.{where}.{runtime}"
                            (out / f"{tag}.out").write_text(stdout)
                            (out / f"{tag}.err").write_text(stderr)
                        res = seen[runtime] = outcomes(stdout)
                        said[runtime] = outputs(stdout)
                        counts = {o: sum(v == o for v in res.values()) for o in ("ok", "fail", "error", "skip")}
                        inside = module_times(stdout).get(module, float("nan"))
                        line += (f" | {runtime} rc={p.returncode} ok={counts['ok']} fail={counts['fail']}"
                                 f" err={counts['error']} skip={counts['skip']} in={inside:.1f}s wall={wall:.1f}s"
                                 f" load={load}")
                        if module == "statfs_probe":
                            line += "\n" + "".join(f"    {runtime}: {x}\n" for x in stdout.splitlines()[:-1])
                        notes += [f"    {runtime}: {x}" for x in stdout.splitlines() if x.startswith("INFO")]
                    if len(seen) == 2:
                        a, b = seen.values()
                        diff = sorted(t for t in a.keys() | b.keys() if a.get(t) != b.get(t))
                        line += f" | differ={len(diff)}"
                        for t in diff:
                            line += f"\n    {t}: " + " / ".join(f"{r} {s.get(t)}" for r, s in seen.items())
                    if len(said) == 2 and any(said.values()):
                        (ra, a_out), (rb, b_out) = said.items()
                        odiff = sorted(n for n in a_out.keys() | b_out.keys() if a_out.get(n) != b_out.get(n))
                        line += f"\n    outputs compared={len(a_out.keys() | b_out.keys())} differ={len(odiff)}"
                        for n in odiff:
                            line += f"\n    output {n}:\n" + "".join(
                                f"      {x}\n" for x in list(difflib.unified_diff(
                                    a_out.get(n, ["(not printed)"]), b_out.get(n, ["(not printed)"]), ra, rb,
                                    lineterm="", n=1))[2:40])
                        seen.setdefault(ra, {}).update({f"output:{n}": "same" for n in a_out})
                        seen.setdefault(rb, {}).update(
                            {f"output:{n}": "same" if b_out.get(n) == a_out.get(n) else "differs" for n in b_out})
                    print("\n".join((line, *notes)), flush=True)
                    table.append(_table_row(module, where, seen, walls, load))
        finally:
            ctd.stop()
    print("\n| software | place | " + " | ".join(args.runtimes.split(",")) + " | wall ratio | load |")
    print("|---|---|" + "---|" * len(args.runtimes.split(",")) + "---|---|")
    print("\n".join(table))


def _table_row(module: str, where: str, seen: dict[str, dict[str, str]], walls: dict[str, float],
               load: str) -> str:
    cells = []
    for runtime, wall in walls.items():
        res = seen.get(runtime)
        if res is None:
            cells.append(f"timeout ({wall:.0f} s)")
            continue
        failed = sorted(t for t, o in res.items() if o in ("fail", "error"))
        ok = sum(o == "ok" for o in res.values())
        said = [t for t in res if t.startswith("output:")]
        differs = sorted(t.partition(":")[2] for t in said if res[t] == "differs")
        cells.append(f"{ok} ok" + (f", {len(failed)} failed: {' '.join(failed)[:200]}" if failed else "")
                     + (f", {len(said)} outputs" if said else "")
                     + (f" ({len(differs)} differ: {' '.join(differs)[:300]})" if differs else "")
                     + f" ({wall:.1f} s)")
    ratio = f"{walls['pykata'] / walls['runc']:.1f}x" if {"runc", "pykata"} <= walls.keys() else "-"
    return f"| {module.partition(':')[0]} | {where} | " + " | ".join(cells) + f" | {ratio} | {load} |"


if __name__ == "__main__":
    main()
