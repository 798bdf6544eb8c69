"""The warm pool (Kata's VM cache): VMs restored from the template ahead of time, each held paused by
a waiting process, handed whole to the next pod that fits.

Who holds a pooled VM: not one pool daemon serving VMs over a socket (Kata's `factory init` + VM cache
server), but one waiting *shim* per VM (pykata.shim.pooled): a shim process that has done its imports,
restored a VM from the template, connected to its agent and paused it. A pod start (`shim start`)
claims a waiting one over its control socket and hands it containerd's parameters and the pod's
listening socket; that process becomes the pod's shim. So QEMU stays the child of the process that
serves the pod (its QMP channel, agent connection, console, exit and cleanup are never handed
between processes), and a claim skips the shim's start-up, the restore and the wait for the agent.

Layout under <runtime_dir>/pool/ (root only, 0711):
    <eid>.json   the waiting process: {"pid", "fingerprint", "created_at"}; present while it waits
    <eid>.sock   its control socket, accepting exactly one claim (then removed: never shared)
    <eid>/       its sandbox directory (a claimed one stays here; sandboxes/<pod id> links to it)
    starting/<eid>  a claimed one whose pod has not started its first container yet (its pid): no
                 waiting VM is made while one is there (quiet_wait: not during a burst of starts)
    recent-image the image disk key (pykata.resources.rootimage) of the latest pooled pod's first
                 container: a waiting VM being made puts that disk in a free image slot ahead of time
                 (factory.pool_prefill_image), so a pod of the same image fills no slot at hand-out

With factory.pool_nics = 1 each waiting VM has one NIC, on a tap in a holding network namespace of its
own (pykata.network.holding), and serves only pods that bring a network namespace (CRI): `shim start`
sends that namespace's fd with the claim (the waiting process's mount namespace predates the pod's
mount), and the pod's first Create moves the tap into it.

A pod's shim refills the pool through `fill`'s `fork`: the shims' fork server (pykata.shim.forkserver)
forks the waiting shims from its imported state (~0.35 CPU s less each than a fresh process), each
in a mount namespace of its own as `unshare --mount` gives a fresh one; without a server (it is
launched for the next refill), `fill` starts fresh processes. `pykata factory pool fill` forks them
through a server that runs already for its --address (pykata.shim.forkclient.pool_fork), and never
launches one (it would live in the command's session).

Nothing leaks when a waiting process dies, however it dies: its QEMU runs behind
pykata.hypervisor.jail.lifeline_prefix (killed with its owner), its mounts live in the mount
namespace it was started in (`fill` starts it with `unshare --mount`), its holding network namespace
is held only by its fds and QEMU's tap, and `prune` removes the files of dead ones (every `fill`, `claim`
and the shim's `delete` after a dead shim run it). A claimed one whose pod's shim dies has the reaper
that shim started at hand-out (pykata.sandbox.reaper; pykata.shim.tasks.pod): it removes the directory,
the pod's sandboxes/<id> link and cgroups.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pykata.config.schema import Config
from pykata.fsutil import atomic_write, descendants, file_lock, process_alive, read_all, start_ticks

log = logging.getLogger("pykata.factory")

MAX_CLAIM_BYTES = 1 << 20
CLAIM_TIMEOUT = 2.0
# A waiting VM with its shim, for the memory bound (measured: ~105 MiB PSS at idle).
ENTRY_MIB = 150
# A waiting process that has not written its control socket after this long is stuck: pruned.
STARTING_LIMIT = 300.0
SHIM_EXECUTABLE = "containerd-shim-pykata-v2"  # a fixed name (ARCHITECTURE.md)
ENTRY_ENV = "PYKATA_POOL_ENTRY"  # the entry `fill` registered for the waiting process it starts
ENTRY_ID = re.compile(r"pool-[0-9a-f]{12}")
# A waiting VM starts being made only once no pod that claimed one is still starting (a burst of starts
# is over) and none claimed one for REFILL_QUIET seconds: even at idle priority, VMs made during a
# burst of 10 pooled starts halved its rate (bench/ctr_bench.py --rate 4 --pool --pool-size 10, load
# 12-17: 0.73 and 0.69/s refilled 1 s after each claim, 1.57 and 1.04/s refilled after the run).
# The quiet spans the gap between one start's end and the next one's claim in a burst of starts one
# at a time (the next `ctr run`, containerd, `shim start`: 0.1-0.4 s, more on a loaded host; with
# 0.5 s, one gap past it at load 8-12 let all ten refills begin during such a burst).
REFILL_QUIET = 2.0
# A claimed pod counts as starting until its first container started, its shim ended, or this long.
START_LIMIT = 20.0
# ... but a waiting VM waits at most this long (a host where pods start without pause still refills).
REFILL_MAX_DEFER = 30.0
# A waiting VM being made runs at idle priority (factory.pool_fill_idle) for at most this long, then
# at normal priority: on a host busy all the time it still gets ready (within qemu.boot_timeout).
IDLE_FILL_LIMIT = 10.0


def entry_argv() -> list[str]:
    """The command that starts one waiting shim: this installation's `containerd-shim-pykata-v2
    pool-entry` (pykata.shim.pooled; the factory names it, it does not import it)."""
    script = Path(sys.executable).parent / SHIM_EXECUTABLE
    found = str(script) if script.exists() else shutil.which(SHIM_EXECUTABLE) or SHIM_EXECUTABLE
    return [sys.executable, found, "pool-entry"]


def pool_root(config: Config) -> Path:
    return config.runtime.runtime_path / "pool"


def fingerprint(config: Config) -> str:
    """What a pooled VM was made for: the whole configuration (a pod whose annotations change any of
    it, or whose host configuration changed since, does not take it)."""
    import pykata

    # the installation too: two checkouts sharing a runtime_dir never take each other's VMs
    return hashlib.sha256(f"{pykata.__file__}\n{config!r}".encode()).hexdigest()[:24]


@dataclass(frozen=True)
class PoolEntry:
    """One waiting VM (its process may be dead: `alive`)."""

    id: str
    root: Path
    pid: int
    fingerprint: str
    created_at: float
    # the process's start time (fsutil.start_ticks): with the pid it names that process, never one
    # that reused its pid after it died (prune and destroy signal it); 0 in entries written before
    start: int = 0

    @property
    def meta(self) -> Path:
        return self.root / f"{self.id}.json"

    @property
    def control(self) -> Path:
        return self.root / f"{self.id}.sock"

    @property
    def sandbox_dir(self) -> Path:
        return self.root / self.id

    @property
    def ready(self) -> bool:
        return self.control.exists()

    @property
    def alive(self) -> bool:
        return process_alive(self.pid) and (not self.start or start_ticks(self.pid) == self.start)


def new_entry(config: Config) -> PoolEntry:
    """Register this process as a waiting VM being made (counted by `fill` from now on): under the id
    `fill` gave it when it started it (ENTRY_ENV; `fill` may not have written it yet when the process
    was forked from the shims' fork server), else a new one."""
    given = os.environ.pop(ENTRY_ENV, "")
    for entry in list_entries(config):
        if entry.id == given and entry.pid == os.getpid():
            return entry
    return _register(config, given if ENTRY_ID.fullmatch(given) else f"pool-{secrets.token_hex(6)}", os.getpid())


def _register(config: Config, entry_id: str, pid: int) -> PoolEntry:
    root = pool_root(config)
    root.mkdir(parents=True, exist_ok=True, mode=0o711)
    entry = PoolEntry(entry_id, root, pid, fingerprint(config), time.time(), start_ticks(pid) or 0)
    atomic_write(entry.meta, json.dumps({"pid": entry.pid, "fingerprint": entry.fingerprint,
                                         "created_at": entry.created_at, "start": entry.start}),
                 make_parents=False)
    return entry


RECENT_IMAGE = "recent-image"
IMAGE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def remember_image(config: Config, key: str) -> None:
    """Record `key` (an image disk's key) as the image pooled pods asked for last, for the waiting VMs
    made from now on (recent_image). Writes only when it changed. Never raises."""
    if config.factory.pool_size <= 0 or not config.factory.pool_prefill_image or not IMAGE_KEY.fullmatch(key):
        return
    path = pool_root(config) / RECENT_IMAGE
    with contextlib.suppress(OSError):
        if path.read_text()[:256] == key:
            return
    with contextlib.suppress(OSError):
        atomic_write(path, key, make_parents=False)


def recent_image(config: Config) -> str | None:
    """The image disk key remember_image recorded last, or None (none, or not a key). Never raises."""
    try:
        key = (pool_root(config) / RECENT_IMAGE).read_text()[:256]
    except OSError:
        return None
    return key if IMAGE_KEY.fullmatch(key) else None


def starting_marker(entry: PoolEntry) -> Path:
    """<pool>/starting/<entry id>: present while the pod that claimed `entry` starts (`begin_start`)."""
    return entry.root / "starting" / entry.id


def begin_start(entry: PoolEntry) -> Path:
    """Record that a pod claimed `entry` and is starting (its process, `entry.pid`, serves it), for
    `quiet_wait`; the caller removes the returned marker once the pod's first container started. Never
    raises."""
    marker = starting_marker(entry)
    with contextlib.suppress(OSError):
        marker.parent.mkdir(mode=0o700, exist_ok=True)
        atomic_write(marker, str(entry.pid), make_parents=False)
    return marker


def end_start(marker: Path) -> None:
    with contextlib.suppress(OSError):
        marker.unlink()


def starting(config: Config) -> tuple[int, float]:
    """How many claimed pods are still starting (markers of live processes younger than START_LIMIT),
    and the seconds since the latest claim or end of a start (the markers' directory changed; infinite
    when there never was one). Removes the markers of ended ones. Never raises."""
    directory = pool_root(config) / "starting"
    count = 0
    now = time.time()
    with contextlib.suppress(OSError):
        for marker in directory.iterdir():
            try:
                at = marker.stat().st_mtime
                pid = int(marker.read_text()[:16])
            except (OSError, ValueError):
                continue
            if now - at < START_LIMIT and process_alive(pid):
                count += 1
            elif not process_alive(pid) or now - at > 2 * START_LIMIT:
                end_start(marker)
    try:
        since = max(0.0, now - directory.stat().st_mtime)
    except OSError:
        since = float("inf")
    return count, since


def quiet_wait(config: Config, started_at: float) -> float:
    """How much longer a waiting VM's process started at `started_at` (time.time()) waits before it
    makes its VM: while a pod that claimed one is still starting (`begin_start`), and for REFILL_QUIET
    seconds after the latest claim or end of a start (between the waves of a burst); never past
    REFILL_MAX_DEFER after it started. The REFILL_QUIET part applies only while the pool still holds a
    ready VM: pods that start one after another (a churn of pod cycles 1-2 s apart) never leave
    REFILL_QUIET of quiet, so they would drain the pool and find it empty for REFILL_MAX_DEFER; once it
    is empty a refill waits only for the starts in flight. 0: now."""
    left = started_at + REFILL_MAX_DEFER - time.time()
    busy, since = starting(config)
    if busy:
        wait = 0.2
    elif since < REFILL_QUIET and any(entry.ready and entry.alive for entry in list_entries(config)):
        wait = REFILL_QUIET - since
    else:
        wait = 0.0
    return max(0.0, min(wait, left))


def withdraw(entry: PoolEntry) -> None:
    """Take `entry` out of the pool (claimed or ending): no one finds or claims it any more."""
    for path in (entry.control, entry.meta):
        with contextlib.suppress(OSError):
            path.unlink()


def list_entries(config: Config) -> list[PoolEntry]:
    """The registered waiting VMs, live or not (never raises)."""
    root = pool_root(config)
    found = []
    with contextlib.suppress(OSError):
        for meta in sorted(root.glob("pool-*.json")):
            try:
                data = json.loads(meta.read_text()[:4096])
                found.append(PoolEntry(meta.stem, root, int(data["pid"]), str(data["fingerprint"]),
                                       float(data["created_at"]), int(data.get("start", 0))))
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return found


def prune(config: Config) -> list[str]:
    """Remove what dead waiting processes left (their files; their VM and mounts died with them) and
    kill ones stuck starting. Returns the removed entry ids. Never raises."""
    removed = []
    root = pool_root(config)
    for entry in list_entries(config):
        stuck = not entry.ready and time.time() - entry.created_at > STARTING_LIMIT
        if entry.alive and not stuck:
            continue
        if stuck and entry.alive:
            with contextlib.suppress(OSError):
                os.kill(entry.pid, 9)
        withdraw(entry)
        shutil.rmtree(entry.sandbox_dir, ignore_errors=True)
        removed.append(entry.id)
    starting(config)  # removes the markers of starts whose process ended
    # directories of claimed VMs whose shim died and that `shim delete` did not reach
    with contextlib.suppress(OSError):
        for d in root.glob("pool-*"):
            if d.is_dir() and not (root / f"{d.name}.json").exists() and not _owner_alive(d):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
    return removed


def _owner_alive(directory: Path) -> bool:
    try:
        data = json.loads((directory / "state.json").read_text()[:1 << 20])
        return process_alive(int(data["owner_pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        # no record yet: being made right now, or a dead one's; the age decides
        with contextlib.suppress(OSError):
            return time.time() - directory.stat().st_mtime < STARTING_LIMIT
        return False


def fill_at_idle_priority() -> bool:
    """Make this process (its calling thread: call it before any other thread exists) and everything
    it starts from now on (QEMU and its threads inherit it) run under SCHED_IDLE: a waiting VM being
    made takes only CPU time no one else wants, so refilling the pool never slows the pod starts that
    emptied it (each costs ~1 CPU second: restore, reseed, warm-up). Returns False when the kernel
    refused (never raises)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError as e:
        log.warning("factory pool: cannot fill at idle priority: %s", e)
        return False
    return True


def normal_priority(pid: int) -> None:
    """Every thread of `pid` and of every process below it back under SCHED_OTHER (the waiting VM is
    ready, or has waited IDLE_FILL_LIMIT, or serves a pod). Never raises (threads come and go)."""
    for proc in (pid, *descendants(pid)):
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{proc}/task"):
                with contextlib.suppress(OSError, ValueError):
                    tid = int(task)
                    if os.sched_getscheduler(tid) == os.SCHED_IDLE:
                        os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))


def mem_available_mib() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


def fill(config: Config, argv: Sequence[str], started_one: Callable[[int], None] | None = None,
         fork: Callable[[str], int | None] | None = None) -> int:
    """Start waiting processes (`argv`, in a mount namespace of their own, detached) until the pool
    has `factory.pool_size` live ones, while the host keeps `pool_min_free_mib` available. Returns
    how many it started; `started_one` is called with each one's pid right after it started (a pod's
    shim moves it out of the pod's cgroup). `fork`, when given, is tried first for each: it starts one
    with the given entry id (ENTRY_ENV) by other means (the shims' fork server, whose children have
    done their imports) and returns its pid, or None to fall back to `argv`. Never raises (a pool
    that cannot fill only means cold starts)."""
    size = config.factory.pool_size
    if size <= 0 or not config.factory.enable_template:
        return 0
    root = pool_root(config)
    started = 0
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o711)
        with file_lock(root / ".lock"):
            prune(config)
            mine = fingerprint(config)
            # entries made for another configuration or installation are not counted (nor ended:
            # they may be another checkout's; `pykata factory pool destroy` ends every one)
            live = [e for e in list_entries(config) if e.alive]
            missing = size - sum(1 for e in live if e.fingerprint == mine)
            env = {k: v for k, v in os.environ.items() if k != "PYKATA_TIMING_FILE"}
            unshare = shutil.which("unshare") or "/usr/bin/unshare"
            for _ in range(max(0, missing)):
                if mem_available_mib() - ENTRY_MIB * (started + 1) < config.factory.pool_min_free_mib:
                    log.info("factory pool: not refilled: host memory available is below "
                             "factory.pool_min_free_mib (%d MiB)", config.factory.pool_min_free_mib)
                    break
                entry_id = f"pool-{secrets.token_hex(6)}"
                pid = fork(entry_id) if fork is not None else None
                if pid is None:
                    pid = subprocess.Popen([unshare, "--mount", "--propagation", "slave", "--", *argv],
                                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
                                           cwd="/", env={**env, ENTRY_ENV: entry_id}).pid
                # registered now, under the lock, not once it has started up: the next `fill` counts it,
                # and a `destroy` right after this finds it (unshare execs: the pid stays the shim's)
                _register(config, entry_id, pid)
                started += 1
                if started_one is not None:
                    started_one(pid)
    except OSError as e:
        log.warning("factory pool: cannot fill: %s", e)
    return started


def claim(config: Config, message: dict[str, Any], fds: Sequence[int]) -> int | None:
    """Claim one waiting VM for a pod: send it `message` (JSON) and `fds` (the pod's listening socket,
    then its network namespace when it has one: factory.pool_nics = 1). Returns the process id that
    now serves the pod, or None when no waiting VM took it (none ready, or each one refused).
    Never raises."""
    if config.factory.pool_size <= 0:
        return None
    mine = fingerprint(config)
    body = json.dumps({**message, "fingerprint": mine}).encode()
    entries = list_entries(config)
    # concurrent claims (a burst of pod starts) begin at different entries, not all at the first one
    # (which takes one and resets the others, who then try the next)
    first = os.getpid() % max(1, len(entries))
    for entry in entries[first:] + entries[:first]:
        if entry.fingerprint != mine or not entry.ready or not entry.alive:
            continue
        with contextlib.suppress(OSError, ValueError), \
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(CLAIM_TIMEOUT)
            s.connect(str(entry.control))
            socket.send_fds(s, [body], list(fds))
            s.shutdown(socket.SHUT_WR)
            reply = json.loads(read_all(s, 4096) or b"{}")
            if isinstance(reply, dict) and reply.get("ok") is True and isinstance(reply.get("pid"), int):
                return int(reply["pid"])
            log.info("factory pool: %s refused the claim: %s", entry.id, str(reply.get("error"))[:200])
    return None


def serve_claim(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """Read one claim from an accepted control connection (blocking, bounded): its message and the
    fds it carries (the listening socket, then the pod's network namespace if it has one). Raises
    ValueError for anything else (the caller closes)."""
    sock.settimeout(CLAIM_TIMEOUT)
    data, fds, _, _ = socket.recv_fds(sock, MAX_CLAIM_BYTES, 4)
    try:
        data += read_all(sock, MAX_CLAIM_BYTES - len(data))
        message = json.loads(data)
        if not isinstance(message, dict) or len(fds) not in (1, 2):
            raise ValueError("a claim is one JSON object, one socket and at most one network namespace")
    except BaseException:
        for f in fds:
            os.close(f)
        raise
    return message, list(fds)


def answer(sock: socket.socket, **reply: Any) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(json.dumps(reply).encode())


def destroy(config: Config, timeout: float = 10.0) -> list[str]:
    """End every waiting VM of this pool (SIGTERM: each stops its VM; SIGKILL after `timeout`) and
    remove what is left. VMs already claimed by pods are theirs. Returns the entry ids. Never raises."""
    root = pool_root(config)
    lock = file_lock(root / ".lock") if root.is_dir() else contextlib.nullcontext()
    with lock:  # not while a `fill` is starting ones
        entries = [e for e in list_entries(config) if e.alive]
        for e in entries:
            with contextlib.suppress(OSError):
                os.kill(e.pid, 15)
    deadline = time.monotonic() + timeout
    while any(e.alive for e in entries) and time.monotonic() < deadline:
        time.sleep(0.05)
    for e in entries:
        if e.alive:
            with contextlib.suppress(OSError):
                os.kill(e.pid, 9)
    while any(e.alive for e in entries) and time.monotonic() < deadline + 5:
        time.sleep(0.05)
    prune(config)
    return [e.id for e in entries]
