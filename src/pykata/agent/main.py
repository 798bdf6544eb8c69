"""Agent entry point: parse arguments, register services, serve the host channel."""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pykata.agent.boot import LATE_STDLIB, load_deferred
from pykata.agent.channel import ChannelError, parse_channel, serve_serial, serve_vsock
from pykata.agent.entropy import crng_reseeder
from pykata.agent.health import HealthService
from pykata.agent.policy import PolicyGate
from pykata.agent.ports import DEFAULT_PORT_NAME
from pykata.agent.settings import DEFAULT_STATE_DIR, AgentSettings
from pykata.protocols.agent import AGENT_SERVICE, HEALTH_SERVICE
from pykata.record import Record
from pykata.ttrpc import Server

if TYPE_CHECKING:
    from pykata.agent.service import AgentService

log = logging.getLogger("pykata.agent")

# Written to the console once the agent serves: boot benchmarks and the VM tests look for it.
READY_LINE = "PYKATA_AGENT_READY"
# Printed once the work the agent starts after its ready line (precompile_seccomp) is done: a template's
# maker saves the guest after it (pykata.factory.template), so the template holds that work's result.
SETTLED_LINE = "PYKATA_AGENT_SETTLED"
# A host that boots a VM cold talks to its agent from the first moment (its bytes wait in the port); a
# template's maker never does before it saves the VM. This long after the ready line, the agent knows.
AFTER_READY_DELAY = 0.3
# Set by the kernel command line (PYKATA_BOOT_MARKS=1, see pykata.agent.pid1): print boot phase marks.
BOOT_MARKS_ENV = "PYKATA_BOOT_MARKS"
# How long after the ready line the agent waits before LateAgent's load unless an AgentService call comes
# first: a cold boot's host connects and checks the agent's health right after the line, and is answered
# before the imports begin (each runs in the loop's thread: a call waits for the module being imported).
LATE_START = 0.05
# What AgentService imports beyond what serving Health needs, heaviest subtrees first, imported one
# module at a time after the ready line (LateAgent) so a host's first calls are answered in between.
# Only an order: `pykata.agent.service` (last) imports whatever this list misses.
LATE_MODULES = ("json", "shutil", "hashlib", "pykata.agent.storage", "pykata.agent.guest", "pykata.agent.nsexec",
                "pykata.agent.diskfile", "pykata.agent.processes", "pykata.agent.console", "pykata.agent.crun",
                "pykata.agent.containers", "pykata.agent.volumesync", "pykata.agent.network",
                "pykata.agent.service")


# AgentService RPCs whose handlers are plain functions (they never await): once the service is loaded the
# server answers them in the loop turn that read them, with no task or timer (pykata.ttrpc.server). A
# sandbox on a template's clone sends these two first, and under TCG every guest instruction a clone
# runs is translated afresh: its first task and timer were ~1,000 translated blocks of ReseedRandomDev.
# SyncVolume applies a small tree in the loop turn too (else it hands back an awaitable).
IMMEDIATE_RPCS = frozenset({"ReseedRandomDev", "SetGuestDateTime", "SyncVolume"})


class LateAgent:
    """The AgentService, imported and started after the agent's ready line instead of before it.

    Serving Health and the session needs asyncio, protobuf and ttrpc; the container, storage and
    network handlers (~33 modules) only a pod's calls need. In a VM they load right after the ready
    line, one module at a time (`load`, a background task of `_serve`), so a cold boot's host sees the
    agent ready that much sooner and its first calls are answered between the imports; a call of this
    service before the load is done waits for it. A VM template is saved only after the agent settles
    (SETTLED_LINE, printed after the load), so every clone starts with them imported.
    """

    def __init__(self, settings: AgentSettings | None = None) -> None:
        self.settings = settings
        self._loading: asyncio.Task[AgentService] | None = None

    def load(self) -> asyncio.Task[AgentService]:
        """The task that imports and starts the AgentService (made by the first caller)."""
        if self._loading is None:
            self._loading = asyncio.ensure_future(self._load())
        return self._loading

    async def _load(self) -> AgentService:
        for name in LATE_STDLIB:
            load_deferred(name)
            await asyncio.sleep(0)
        for name in LATE_MODULES:
            importlib.import_module(name)
            await asyncio.sleep(0)  # a host's call waiting in the channel goes first
        from pykata.agent.service import AgentService

        agent = AgentService(self.settings)
        await agent.start()
        # What start-up made lives as long as the agent: out of the collector's sight, a collection
        # neither walks it (milliseconds under TCG) nor, in a child forked to exec (nsexec), writes to
        # every page of it (a copy-on-write fault each).
        gc.freeze()
        gc.enable()  # off during start-up (pykata.agent.boot)
        return agent

    async def precompile_seccomp(self) -> None:
        await (await self.load()).precompile_seccomp()

    async def close(self) -> None:
        if self._loading is None:
            return
        if not self._loading.done():
            self._loading.cancel()
            return
        if not self._loading.cancelled() and self._loading.exception() is None:
            await self._loading.result().close()

    def __getattr__(self, name: str) -> Any:
        if name not in AGENT_SERVICE.methods:
            raise AttributeError(name)
        if name in IMMEDIATE_RPCS:
            def now(req: Any, ctx: Any) -> Any:
                loading = self._loading
                if loading is not None and loading.done() and not loading.cancelled() \
                        and loading.exception() is None:
                    return getattr(loading.result(), name)(req, ctx)
                return later(req, ctx)  # an awaitable: the server awaits it in a task

            async def later(req: Any, ctx: Any) -> Any:
                agent = await asyncio.shield(self.load())
                result = getattr(agent, name)(req, ctx)
                if getattr(result, "__await__", None) is not None:  # the handler's own awaitable
                    result = await result
                return result

            now.__name__ = name
            return now

        async def call(req: Any, ctx: Any) -> Any:
            agent = await asyncio.shield(self.load())
            return await getattr(agent, name)(req, ctx)

        call.__name__ = name
        return call


def build_server(agent: AgentService | LateAgent | None = None) -> Server:
    """A ttrpc server with every service the agent offers (AgentService when `agent` is given)."""
    # a host's session hello is understood on every transport (agent protocol 8, pykata.ttrpc.session)
    server = Server(sessions=True)
    server.register(HEALTH_SERVICE, HealthService())
    if agent is not None:
        # Every AgentService RPC passes the agent policy first (pykata.agent.policy).
        server.register(AGENT_SERVICE, PolicyGate(agent))
    return server


async def run(channel_spec: str, settings: AgentSettings | None = None, listen: str | None = None) -> None:
    """Serve until cancelled. Raises ChannelError when the channel is unusable.

    `listen` ("unix:PATH") serves a unix socket instead of the channel (tests run the agent on
    the host this way).
    """
    if listen is None:
        parse_channel(channel_spec)  # a bad channel fails before anything starts
    agent = LateAgent(settings)
    if listen is not None:
        await agent.load()  # on a host (tests): everything before serving
    server = build_server(agent)
    try:
        await _serve(channel_spec, server, listen, load=agent.load, after_ready=agent.precompile_seccomp)
    finally:
        await agent.close()


async def _serve(channel_spec: str, server: Server, listen: str | None, *,
                 load: Callable[[], Awaitable[object]] | None = None,
                 after_ready: Callable[[], Awaitable[None]] | None = None) -> None:
    """Serve on the channel (or `listen`); in the VM only, once the ready line is out, await `load`
    (its failure ends serving, raised here) and then start `after_ready`."""
    if listen is not None:
        if not listen.startswith("unix:") or len(listen) == len("unix:"):
            raise ChannelError(f"--listen: expected unix:PATH, got {listen!r}")
        try:
            listener = await server.serve_unix(listen.removeprefix("unix:"))
        except OSError as exc:
            raise ChannelError(f"--listen: cannot listen on {listen}: {exc.strerror}") from exc
        log.info("serving on %s", listen)
        print(READY_LINE, flush=True)
        try:
            await listener.serve_forever()
        finally:
            await server.close()
        return
    channel = parse_channel(channel_spec)
    ready = asyncio.Event()
    # In the VM only (never with --listen on a host): a new host session reseeds the kernel's CRNG.
    reseed = crng_reseeder()
    host_came: list[bool] = []

    def on_session() -> None:
        if not host_came:
            host_came.append(True)
        reseed()

    if channel.kind == "vsock":
        serving = asyncio.ensure_future(serve_vsock(server, channel.port, ready, on_session=on_session))
    else:
        serving = asyncio.ensure_future(serve_serial(server, channel.device, ready, on_session=on_session))
    waiter = asyncio.ensure_future(ready.wait())
    await asyncio.wait({serving, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if ready.is_set():
        where = f"vsock port {channel.port}" if channel.kind == "vsock" else channel.device
        log.info("serving on %s", where)
        print(READY_LINE, flush=True)
    # Beside serving, not before the ready line: a cold boot's host is not kept waiting for it, and a
    # template's maker saves the guest only once it idles, so the template holds what it did.
    background = asyncio.ensure_future(_then_settled(load, after_ready, lambda: bool(host_came))) \
        if (load is not None or after_ready is not None) and ready.is_set() else None
    try:
        if background is not None:
            await asyncio.wait({serving, background}, return_when=asyncio.FIRST_COMPLETED)
            if background.done() and not background.cancelled() and background.exception() is not None:
                serving.cancel()
                background.result()  # raises: the agent cannot serve its pod
        await serving
    finally:
        if background is not None:
            background.cancel()
        waiter.cancel()
        await server.close()


async def _then_settled(load: Callable[[], Awaitable[object]] | None,
                        after_ready: Callable[[], Awaitable[None]] | None, host_came: Callable[[], bool]) -> None:
    """Await `load` (LateAgent's imports: raises what it raises), then run `after_ready` unless a host has
    spoken by AFTER_READY_DELAY, then print SETTLED_LINE.

    That work (AgentService.precompile_seccomp) is for a VM template: saved before any host spoke, every
    clone has its result. In a cold-booted VM its host is there at once with the pod's requests, and the
    work only competes with them: the guest's nice 19 does not reach the host, where its vCPU still
    takes a host CPU under TCG (a pod's first container took 2.4 s beside it against 0.4 s after, at
    load 14; it did not even finish before that container)."""
    if load is not None:
        await asyncio.sleep(LATE_START)
        await load()
    if after_ready is not None:
        await asyncio.sleep(AFTER_READY_DELAY)
        if host_came():
            log.info("start-up work skipped: a host spoke first (a cold boot; its pod would wait for it)")
        else:
            await after_ready()  # never raises; cancelled: no line
    print(SETTLED_LINE, flush=True)


EXEC_WITH = ("native", "crun", "spawner", "fork")


class AgentArgs(Record):
    """The agent's command line, parsed."""

    __slots__ = ("cgroup_parent", "channel", "crun", "debug", "exec_with", "listen", "shared_dir", "state_dir")
    __match_args__ = ("channel", "listen", "state_dir", "shared_dir", "cgroup_parent", "crun", "exec_with", "debug")

    def __init__(self, channel: str = f"serial:{DEFAULT_PORT_NAME}", listen: str | None = None,
                 state_dir: Path = DEFAULT_STATE_DIR, shared_dir: Path | None = None, cgroup_parent: str = "pykata",
                 crun: str = "crun", exec_with: str = "native", debug: bool = False) -> None:
        self.channel = channel
        self.listen = listen
        self.state_dir = state_dir
        self.shared_dir = shared_dir
        self.cgroup_parent = cgroup_parent
        self.crun = crun
        self.exec_with = exec_with
        self.debug = debug


def parse_args(argv: Sequence[str] | None) -> AgentArgs:
    """Parse the agent's arguments (sys.argv[1:] when `argv` is None); exits as argparse does on
    bad ones or --help."""
    args = list(sys.argv[1:] if argv is None else argv)
    # The guest's init passes only `--channel C [--debug] [--exec-with E]` (pykata.agent.pid1.agent_argv):
    # read that directly, since importing argparse (and gettext) is ~5% of the agent's imports under TCG.
    fast = _parse_init_args(args)
    if fast is not None:
        return fast
    import argparse

    parser = argparse.ArgumentParser(prog="pykata-agent", description="pykata guest agent")
    parser.add_argument("--channel", default=f"serial:{DEFAULT_PORT_NAME}",
                        help="device path, serial:<virtio port name> or vsock:<port>")
    parser.add_argument("--listen", metavar="unix:PATH",
                        help="serve on a unix socket instead of the channel (tests on a host)")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help="crun state, bundles, sockets (default %(default)s)")
    parser.add_argument("--shared-dir", type=Path, default=None,
                        help="where the host's shared file system is mounted (default STATE_DIR/shared)")
    parser.add_argument("--cgroup-parent", default="pykata",
                        help="containers get cgroup /CGROUP_PARENT/<container id> (default %(default)s)")
    parser.add_argument("--crun", default="crun", help="crun executable (default: found in PATH)")
    parser.add_argument("--exec-with", choices=EXEC_WITH, default="native",
                        help="start exec processes with the agent's own setns path where it covers the "
                             "process spec (native, the default) or always with `crun exec`")
    parser.add_argument("--debug", action="store_true", help="log at debug level")
    return AgentArgs(**vars(parser.parse_args(args)))


def _parse_init_args(args: list[str]) -> AgentArgs | None:
    """`--channel C [--debug] [--exec-with E]` in any order, each at most once; None for anything
    else (argparse then parses it, or says what is wrong)."""
    parsed = AgentArgs()
    seen: set[str] = set()
    i = 0
    while i < len(args):
        opt = args[i]
        if opt in seen:
            return None
        seen.add(opt)
        if opt == "--debug":
            parsed.debug = True
            i += 1
            continue
        value = args[i + 1] if i + 1 < len(args) else ""
        if opt == "--channel" and value and not value.startswith("-"):
            parsed.channel = value
        elif opt == "--exec-with" and value in EXEC_WITH:
            parsed.exec_with = value
        else:
            return None
        i += 2
    return parsed if "--channel" in seen else None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the agent; returns the exit status (as PID 1, returning ends the VM)."""
    if os.environ.get(BOOT_MARKS_ENV) == "1":  # bench/boot_bench.py: its imports are done
        print(f"PYKATA_BOOT imported {time.clock_gettime(time.CLOCK_BOOTTIME):.3f}", flush=True)
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
                        format="pykata-agent: %(levelname)s %(name)s: %(message)s")
    try:
        settings = AgentSettings(state_dir=args.state_dir, shared_dir=args.shared_dir,
                                 cgroup_parent=args.cgroup_parent, crun=args.crun,
                                 native_exec=args.exec_with in ("native", "spawner", "fork"),
                                 exec_spawner=args.exec_with == "spawner",
                                 exec_start=args.exec_with == "native")
    except ValueError as exc:
        log.error("--cgroup-parent: %s", exc)
        return 2
    try:
        asyncio.run(run(args.channel, settings, args.listen))
    except (ChannelError, OSError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
