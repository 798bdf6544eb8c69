"""A waiting shim of the warm pool (pykata.factory.pool): `containerd-shim-pykata-v2 pool-entry`.

It registers itself in the pool, restores a VM from the template (Sandbox.create_warm: agent
connected, VM paused) and waits on its control socket for one claim. A claim (`shim start` of a new
pod) carries containerd's flags, the bundle, the pod's sandbox id, the environment containerd gave
the shim, and the pod's listening socket; this process then withdraws from the pool and becomes that
pod's shim (pykata.shim.daemon), whose first Create takes the waiting VM if the pod fits it.

It ends without a claim on SIGTERM (`pykata factory pool destroy`, or a pool filled for another
configuration) or when its VM dies; if it is killed, its VM dies with it (lifeline) and its mounts
with its mount namespace. Once a pod took the VM, a reaper removes the rest if it is killed
(Sandbox.start_reaper, started at hand-out).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any, NoReturn

from pykata.config import Config, load_config
from pykata.factory import pool
from pykata.network import holding
from pykata.network.tap import ns_path
from pykata.sandbox import Sandbox

# The pod's shim, imported while this process waits, not once a pod has claimed it: on the pod's
# start path the import cost ~45 ms under load (bench/phases.py --pool: shim answer -> Create RPC).
from pykata.shim import daemon
from pykata.shim.detach import exit_with
from pykata.shim.flags import Flags
from pykata.shim.logs import open_log_fifo, setup_logging
from pykata.timing import mark

log = logging.getLogger("pykata.shim")

_FLAG_FIELDS = ("namespace", "address", "publish_binary", "id", "bundle")


def main(flags: Flags) -> NoReturn:
    """Wait in the pool, then serve the pod that claims this process. Never returns."""
    with contextlib.suppress(OSError):  # already a session leader (started with start_new_session)
        os.setsid()

    def wait_then_serve() -> int:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        os.chdir("/")
        return asyncio.run(_wait_then_serve(flags))

    # nowhere to report a failure before a claim; after one, stderr is the pod's log
    exit_with(wait_then_serve)


class _Waiting:
    def __init__(self, entry: pool.PoolEntry, sandbox: Sandbox) -> None:
        self.entry = entry
        self.sandbox = sandbox
        assert sandbox.vm is not None and sandbox.vm.restore_source is not None
        self._template_state = _file_id(sandbox.vm.restore_source.state)

    def check(self, message: dict[str, Any], fds: list[int]) -> str | None:
        """Why this VM cannot take the claim, or None."""
        if message.get("fingerprint") != self.entry.fingerprint:
            return "made for another configuration"
        vm = self.sandbox.vm
        if vm is None or vm.exited.done():
            return "its VM is gone"
        if vm.restore_source is None or _file_id(vm.restore_source.state) != self._template_state:
            return "its template was remade since"
        for key in ("bundle", "sandbox_id", "socket"):
            if not isinstance(message.get(key), str) or (key != "sandbox_id" and not message[key].startswith("/")):
                return f"bad claim: {key}"
        env, flags = message.get("env"), message.get("flags")
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            return "bad claim: env"
        if not isinstance(flags, dict) or not all(isinstance(flags.get(k, ""), str) for k in _FLAG_FIELDS):
            return "bad claim: flags"
        netns = message.get("netns", "")
        if not isinstance(netns, str):
            return "bad claim: netns"
        # a VM with a NIC serves exactly the pods that bring a network namespace (its fd), and only those
        if self.sandbox.warm_nics != (1 if netns else 0) or len(fds) != 1 + self.sandbox.warm_nics:
            has = "has a" if netns else "has no"
            return f"this VM has {self.sandbox.warm_nics} NICs; the pod {has} network namespace"
        return None


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


async def _wait_then_serve(flags: Flags) -> int:
    config = load_config()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # made at idle priority (before any thread: QEMU and every thread inherit it), bounded in time:
    # also what it may hold meanwhile (the template's lock, when it has to make the template) is
    # held at most IDLE_FILL_LIMIT at idle priority
    idle = config.factory.pool_fill_idle and pool.fill_at_idle_priority()
    entry = pool.new_entry(config)
    sandbox: Sandbox | None = None
    claimed = False
    to_normal: asyncio.TimerHandle | None = None
    try:
        if not await _until_quiet(config, stop):
            return 0
        if idle:
            to_normal = loop.call_later(pool.IDLE_FILL_LIMIT, pool.normal_priority, os.getpid())
        sandbox = await Sandbox.create_warm(config, entry.sandbox_dir, nics=config.factory.pool_nics)
        if to_normal is not None:  # ready: paused, it costs nothing at any priority; its pod's is normal
            to_normal.cancel()
            pool.normal_priority(os.getpid())
        if sandbox.warm_nics:
            holding.preload()  # not at hand-out: the pod's start would wait for it
        waiting = _Waiting(entry, sandbox)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(entry.control))
        os.chmod(entry.control, 0o600)
        listener.listen(8)
        listener.setblocking(False)
        assert sandbox.vm is not None
        ended = asyncio.ensure_future(_first(stop.wait(), asyncio.shield(sandbox.vm.exited)))
        got: tuple[dict[str, Any], list[int]] | None = None
        try:
            while got is None:
                accept = asyncio.ensure_future(loop.sock_accept(listener))
                done, _ = await asyncio.wait({accept, ended}, return_when=asyncio.FIRST_COMPLETED)
                if accept not in done:
                    accept.cancel()
                    return 0
                conn, _ = accept.result()
                accepted_ns = time.monotonic_ns()
                with conn:
                    got = _take(conn, waiting, listener)
        finally:
            ended.cancel()
            listener.close()
        claimed = True
        message, fds = got
        # marked once the claim's environment (PYKATA_TIMING_FILE, bench/ctr_bench.py --timeline) is ours
        answered = (accepted_ns, time.monotonic_ns())
        return await _serve_claim(flags, message, fds, sandbox, answered, pool.starting_marker(entry))
    finally:
        pool.withdraw(entry)
        if not claimed and sandbox is not None:
            await sandbox.stop(remove=True)
        if not claimed:
            shutil.rmtree(entry.sandbox_dir, ignore_errors=True)


async def _until_quiet(config: Config, stop: asyncio.Event) -> bool:
    """Wait until pods have stopped claiming waiting VMs for a moment (pool.quiet_wait: a burst of
    starts is over) before the VM is made; False when told to stop meanwhile. The entry is registered
    while it waits, so the burst's other claims do not start more of them."""
    started_at = time.time()
    while (wait := pool.quiet_wait(config, started_at)) > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), wait)
            return False
    return True


async def _first(*aws: Any) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


def _take(conn: socket.socket, waiting: _Waiting,
          listener: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """Read a claim; accept it (withdrawing from the pool first: one claim only) or refuse it."""
    conn.setblocking(True)
    try:
        message, fds = pool.serve_claim(conn)
    except (OSError, ValueError) as e:
        pool.answer(conn, ok=False, error=f"unreadable claim: {e}")
        return None
    why = waiting.check(message, fds)
    if why is not None:
        for fd in fds:
            os.close(fd)
        pool.answer(conn, ok=False, error=why)
        return None
    pool.withdraw(waiting.entry)
    pool.begin_start(waiting.entry)  # before the answer: a refill of this claim's `start` sees it
    listener.close()  # a claim racing this one finds the socket gone, or is reset
    pool.answer(conn, ok=True, pid=os.getpid())
    return message, fds


async def _serve_claim(flags: Flags, message: dict[str, Any], fds: list[int], sandbox: Sandbox,
                       answered: tuple[int, int], starting: Path) -> int:
    given = message["flags"]
    flags = Flags(namespace=str(given.get("namespace", "")), address=str(given.get("address", "")),
                  publish_binary=str(given.get("publish_binary", "")), id=str(given.get("id", "")),
                  bundle=str(given.get("bundle", "")), debug=bool(given.get("debug")), action="start")
    os.environ.clear()
    os.environ.update(message["env"])
    bundle = Path(message["bundle"])
    log_fd = open_log_fifo(bundle)
    if log_fd is not None:
        os.dup2(log_fd, 2)
    sandbox_id = str(message["sandbox_id"])
    setup_logging(log_fd, sandbox_id, debug=flags.debug)
    logging.getLogger("asyncio").handlers[:] = logging.getLogger("pykata").handlers
    mark("pool.accepted", answered[0])
    mark("pool.answered", answered[1])
    mark("daemon.claimed")
    listener = socket.socket(fileno=fds[0])
    # the pod's network namespace, held by its fd for the pod's life (closed when this process ends)
    netns = ns_path(fds[1]) if len(fds) > 1 else None
    log.info("claimed from the warm pool (%s)%s", sandbox.dir.name,
             f" for network namespace {message['netns']}" if netns else "")
    # the pod counts as starting (no refill of the pool begins) until its first container runs
    return await daemon.serve(flags, listener, sandbox_id, Path(message["socket"]), warm=sandbox, warm_netns=netns,
                              on_first_start=lambda: pool.end_start(starting))
