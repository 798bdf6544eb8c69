"""`pykata run` and the commands that act on what it runs: ps, exec, kill, rm, logs, cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import click

from pykata.agentapi.errors import AgentCallError
from pykata.cli import detach
from pykata.cli.publish import Publish
from pykata.cli.publish import free_port as publish_free_port
from pykata.cli.publish import parse_all as publish_parse_all
from pykata.config import Config, load_config, with_shared_fs
from pykata.config.parse import MAX_LOG_BACKUPS
from pykata.config.schema import SharedFs
from pykata.errors import HypervisorError, PykataError
from pykata.factory.template import TEMPLATE_PROGRESS
from pykata.hypervisor.console import BoundedLog
from pykata.hypervisor.errors import VmExitedError
from pykata.ids import HOSTNAME_RULE, USER_ID_RULE, is_hostname
from pykata.images import ImageStore
from pykata.network import EgressPolicy
from pykata.resources import sizing
from pykata.sandbox import Process, Sandbox, SpecError, Volume, build_spec
from pykata.sandbox.imageuser import ExecUser, container_user, resolve_user
from pykata.sandbox.lookup import (
    Found,
    NotFoundError,
    cleanup_orphans,
    find,
    remove_sandbox_dir,
    sweep_filter_rules,
)
from pykata.sandbox.ocispec import bundle_spec_with, check_cwd, parse_env, parse_size, with_init
from pykata.sandbox.remote import AttachedSandbox
from pykata.sandbox.sandbox import prepare_root_image
from pykata.sandbox.state import STATE_FILE, list_sandboxes
from pykata.sandbox.stdio import feed_stdin, pump_output
from pykata.ttrpc import Code


def _fail(message: str, code: int = 125) -> None:
    click.echo(f"pykata: {message}", err=True)
    sys.exit(code)


COMMAND_NOT_FOUND = 127  # docker's status for a command it could not find (126: found, not invocable)


def failure_status(e: PykataError, default: int, command: str | None = None) -> int:
    """The exit status of `run`/`exec` failing with `e`: 127 when the agent found no executable for the
    command (as docker and a shell say it), else `default` (125 for run, 126 for exec).

    An exec (`command`: its program) the agent could not start gets what `docker exec` gives under runc,
    whose daemon reads the runtime's message (moby's translateContainerdStartErr, case-insensitive): 127 when
    it names the program and says "executable file not found" or "no such file or directory", 126 for
    "permission denied", 127 for "not a directory" (a cwd or a path through a file: moby's hint about
    mounts), else 126.

    A run whose command the agent (crun create) could not start gets what `docker run` gives under runc (its
    CLI's runStartContainerErr): 127 for a command not found, 126 for one found that cannot be invoked
    ("permission denied"; crun says "open executable: Operation not permitted" for a directory, where runc
    says "permission denied"), else `default`."""
    if not isinstance(e, AgentCallError):
        return default
    if command is not None and e.rpc == "ExecProcess":
        said = e.message.lower()
        if command.lower() in said and ("executable file not found" in said or "no such file or directory" in said):
            return COMMAND_NOT_FOUND
        if "permission denied" in said:
            return 126
        if "not a directory" in said:
            return COMMAND_NOT_FOUND
        return default
    if (e.rpc in ("CreateContainer", "StartContainer", "ExecProcess")
            and e.code == Code.NOT_FOUND and "not found in $PATH" in e.message):
        return COMMAND_NOT_FOUND
    if e.rpc in ("CreateContainer", "StartContainer") and (
            "open executable: " in e.message or "permission denied" in e.message.lower()):
        return 126
    return default


def parse_signal(text: str) -> int:
    """'KILL', 'SIGKILL', '9' -> 9. Raises click.BadParameter naming SIGNAL."""
    t = text.upper()
    if t.isdigit() and 0 < int(t) < 65:
        return int(t)
    name = t if t.startswith("SIG") else f"SIG{t}"
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise click.BadParameter(f"unknown signal {text!r}", param_hint="SIGNAL") from None


@contextlib.contextmanager
def _raw_terminal(enabled: bool) -> Iterator[None]:
    if not enabled or not os.isatty(0):
        yield
        return
    saved = termios.tcgetattr(0)
    tty.setraw(0)
    try:
        yield
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)


async def attach(proc: Process, *, interactive: bool, log_dir: Path | None = None,
                 log_max_bytes: int = 10 << 20, log_backups: int = 2,
                 output_filter: Callable[[], Callable[[bytes], bytes]] | None = None) -> int:
    """Connect the local terminal/stdio to `proc`, forward signals and window size; return its status.

    With `log_dir`, the output is also kept in stdout.log and stderr.log there, each rotated at
    `log_max_bytes` keeping `log_backups` older files (a container printing forever fills nothing).
    `output_filter` makes one filter per output stream, applied before our stdout/stderr see it."""
    loop = asyncio.get_running_loop()
    logs: list[BoundedLog] = []
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        logs = [BoundedLog(log_dir / f"{stream}.log", log_max_bytes * (log_backups + 1), log_backups)
                for stream in ("stdout", "stderr")]
    out = _sink(sys.stdout.buffer, logs[0] if logs else None)
    err = _sink(sys.stderr.buffer, logs[1] if logs else None)
    if output_filter is not None:
        out, err = _filtered(out, output_filter()), _filtered(err, output_filter())
    pumps = [asyncio.ensure_future(pump_output(proc, "stdout", out))]
    if not proc.terminal:
        pumps.append(asyncio.ensure_future(pump_output(proc, "stderr", err)))
    feeder = asyncio.ensure_future(feed_stdin(proc, 0)) if interactive else None
    if feeder is None:
        with contextlib.suppress(PykataError):
            await proc.close_stdin()

    background: set[asyncio.Future[None]] = set()

    def spawn(aw: Any) -> None:
        task = asyncio.ensure_future(_quiet(aw))
        background.add(task)
        task.add_done_callback(background.discard)

    def forward(sig: int) -> None:
        spawn(proc.signal(sig))

    handled = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT]
    for s in handled:
        loop.add_signal_handler(s, forward, s)
    if proc.terminal and os.isatty(1):
        def resize() -> None:
            cols, rows = os.get_terminal_size(1)
            spawn(proc.resize(rows, cols))
        loop.add_signal_handler(signal.SIGWINCH, resize)
        handled.append(signal.SIGWINCH)
        resize()
    try:
        with _raw_terminal(proc.terminal and interactive):
            status = await proc.wait()
            await asyncio.gather(*pumps, return_exceptions=True)
    finally:
        for s in handled:
            loop.remove_signal_handler(s)
        # when the wait failed (the VM died), the pumps fail too: collected here, not printed by asyncio
        # as "Task exception was never retrieved" tracebacks after pykata's own one-line error
        tasks = [*pumps, *([feeder] if feeder is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for f in logs:
            f.close()
    return status


def _filtered(sink: Callable[[bytes], None], keep: Callable[[bytes], bytes]) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        kept = keep(data)
        if kept:
            sink(kept)
    return write


def _sink(terminal: BinaryIO, log: BoundedLog | None) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        terminal.write(data)
        terminal.flush()
        if log is not None:
            log.write(data)
    return write


async def _quiet(aw: Any) -> None:
    with contextlib.suppress(PykataError):
        await aw


async def run_async(config: Config, image_ref: str, command: tuple[str, ...], *, name: str, rm: bool,
                    interactive: bool, tty_: bool, env: list[str], workdir: str | None, user: str | None,
                    volumes: list[str], cpus: float | None, memory: str | None,
                    sandbox_id: str | None = None, shared_fs: SharedFs | None = None,
                    entrypoint: str | None = None, init: bool = False, network: str = "none",
                    publish: list[str] | None = None) -> int:
    # everything that can be wrong with the input is checked before a VM boots
    vols = [Volume.parse(v) for v in volumes]
    egress_policy, published = _network(config, network, publish or [])
    mem = parse_size(memory) if memory else None
    envs = parse_env(env, os.environ)
    if cpus is not None and cpus <= 0:
        raise SpecError("--cpus", f"{cpus} must be positive")
    if name and not is_hostname(name):  # it becomes the guest's host name
        raise SpecError("--name", f"{name[:80]!r} is not a host name ({HOSTNAME_RULE})")
    if name:
        for _, rec in list_sandboxes(Path(config.runtime.runtime_dir) / "sandboxes"):
            if rec is not None and rec.name == name:
                raise SpecError("--name", f"the name {name!r} is in use by {rec.id[:12]}")
    image = ImageStore(Path(config.runtime.cache_dir), config.image).resolve(image_ref)
    # -u, else the image's USER (docker's order), names looked up in the image's /etc/passwd and group
    who = container_user(image.rootfs, user, image.config.user)
    args = process_args(image.config.entrypoint, image.config.cmd, command, entrypoint)
    if image.bundle_spec is not None:
        given = args if entrypoint is not None else list(command)
        spec = bundle_spec_with(image.bundle_spec, given, envs, workdir, (who.uid, who.gid) if user else None,
                                tty_, mem, cpus, groups=who.groups)
    else:
        spec = build_spec(args, env=[*image.config.env, *envs], cwd=workdir or image.config.working_dir,
                          user=(who.uid, who.gid), groups=who.groups, terminal=tty_, hostname=name or "pykata",
                          memory_bytes=mem, cpus=cpus)
    if init:
        spec = with_init(spec)
    if shared_fs is not None:
        config = with_shared_fs(config, shared_fs)
    config, vcpus, memory_mib = sizing.fit(config, sizing.container_size(cpus, mem, cpus_source="--cpus",
                                                                          memory_source="--memory"))
    # a bad image fails here, before a VM boots
    await prepare_root_image(config, image.rootfs)
    TEMPLATE_PROGRESS.set(lambda message: click.echo(f"pykata: {message}", err=True))  # a wait of 10-30 s
    # the VM dies with this process however it dies (a timeout's SIGKILL included) and its reaper removes
    # the mounts and directory then: nobody else serves or stops it
    sandbox = await Sandbox.create(sandbox_id, config=config, vcpus=vcpus, memory_mib=memory_mib, name=name,
                                   egress=egress_policy, die_with_owner=True)
    status = 255
    try:
        await _publish(sandbox, published)
        try:
            container = await sandbox.create_container(sandbox.id, spec, image.rootfs, volumes=vols,
                                                       image=image_ref)
            await container.start()
            if sandbox_id is not None:
                detach.silence_terminal()  # the background half of `run -d`: its output goes to the logs
            status = await attach(container.init, interactive=interactive, log_dir=sandbox.dir / "logs",
                                  log_max_bytes=config.runtime.run_log_max_size << 20,
                                  log_backups=config.runtime.run_log_backups)
        except PykataError as e:
            reason = await _vm_death(sandbox)
            if reason is None:
                raise
            raise VmExitedError(f"{e} (the VM is gone: QEMU {reason})") from e
        sandbox._update_container(sandbox.id, status="exited", exit_code=status, finished_at=time.time())
    finally:
        await sandbox.stop(remove=rm)
    return status


def _network(config: Config, network: str, publish: list[str]) -> tuple[EgressPolicy | None, list[Publish]]:
    """--network and -p, checked before a VM boots. Raises SpecError naming the flag."""
    if network not in ("none", "egress"):
        raise SpecError("--network", f"{network[:80]!r}: use none (no network, the default) or egress (outbound "
                                     "IPv4 through the host's filter, see README)")
    published = publish_parse_all(publish)
    if published and network != "egress":
        raise SpecError("--publish", "needs --network egress (a container has no network by default)")
    if published and config.qemu.user_network == "passt":
        raise SpecError("--publish", "is not available with hypervisor.qemu.user_network = \"passt\" "
                                     "(configuration.toml): its forwards do not work yet (README)")
    return (EgressPolicy.build() if network == "egress" else None), published


async def _publish(sandbox: Sandbox, published: list[Publish]) -> None:
    """Make each -p forward on the VM's user-mode network; a port left to choose is printed once made.
    Raises SpecError naming --publish when a host port cannot be bound."""
    for p in published:
        for _ in range(3 if p.host_port == 0 else 1):
            port = p.host_port or publish_free_port(p.host_ip, p.protocol)
            try:
                await sandbox.forward_port(p.container_port, port, p.host_ip, p.protocol)
            except HypervisorError as e:
                last: HypervisorError = e
                continue
            if p.host_port == 0:
                click.echo(f"pykata: published {p.host_ip}:{port} -> {p.container_port}/{p.protocol}", err=True)
            break
        else:
            raise SpecError("--publish", f"{p}: cannot bind the host port: {last}")


def process_args(image_entrypoint: tuple[str, ...], image_cmd: tuple[str, ...], command: tuple[str, ...],
                 entrypoint: str | None) -> list[str]:
    """The container's argv as docker makes it: ENTRYPOINT + (COMMAND or CMD); `--entrypoint E` replaces the
    image's ENTRYPOINT and drops its CMD ("" leaves no entrypoint: COMMAND alone). Raises SpecError when
    nothing is left to run."""
    if entrypoint is not None:
        if "\0" in entrypoint:
            raise SpecError("--entrypoint", "contains NUL")
        args = [*([entrypoint] if entrypoint else []), *command]
    else:
        args = [*image_entrypoint, *(command or image_cmd)]
    if not args and entrypoint is not None:
        raise SpecError("--entrypoint", "is empty and no COMMAND was given: nothing to run")
    return args


VM_DEATH_WAIT = 2.0


async def _vm_death(sandbox: Sandbox) -> str | None:
    """Why the sandbox's VM ended, when it ended unasked (or does within VM_DEATH_WAIT seconds): an agent
    call usually fails with the connection before pykata has seen QEMU's exit, and the user needs the cause."""
    vm = sandbox.vm
    if vm is None:
        return None
    try:
        gone = await asyncio.wait_for(asyncio.shield(vm.exited), VM_DEATH_WAIT)
    except TimeoutError:
        return None
    return None if gone.requested else gone.reason


@click.command(context_settings={"ignore_unknown_options": False, "allow_interspersed_args": False})
@click.option("--rm", is_flag=True, help="Remove the container and its state when it exits.")
@click.option("-d", "--detach", "detach_", is_flag=True, help="Run in the background; print its id (`pykata attach`).")
@click.option("-i", "--interactive", is_flag=True, help="Keep stdin open and feed it to the container.")
@click.option("-t", "--tty", "tty_", is_flag=True, help="Give the process a terminal.")
@click.option("--name", default="", help="A name to refer to the container by.")
@click.option("-e", "--env", multiple=True,
              help="Set an environment variable: KEY=VALUE, or KEY for this shell's value (left out when unset).")
@click.option("-w", "--workdir", default=None, help="Working directory inside the container.")
@click.option("-u", "--user", default=None,
              help="USER[:GROUP] to run as: numbers, or names from the image's /etc/passwd and /etc/group "
                   "(default: the image's USER, else root).")
@click.option("--entrypoint", default=None,
              help="Run this instead of the image's ENTRYPOINT (its CMD is dropped, as docker does; \"\": none).")
@click.option("--init", is_flag=True,
              help="Run a tiny init (tini, from the guest image) as PID 1 that starts COMMAND, forwards signals "
                   "to it and reaps orphaned processes, as docker run --init.")
@click.option("-v", "--volume", multiple=True, help="Bind mount HOST:GUEST[:ro].")
@click.option("--cpus", type=float, default=None, help="CPU limit (also sizes the VM).")
@click.option("--memory", "-m", default=None, help="Memory limit, e.g. 512m (also sizes the VM).")
@click.option("--network", default="none", show_default=True,
              help="none: no network; egress: outbound IPv4 through the host's filter (as the SDK's "
                   "network=\"egress\"), needed by -p.")
@click.option("-p", "--publish", multiple=True,
              help="[IP:][HOSTPORT:]CONTAINERPORT[/tcp|/udp]: forward the host's IP:HOSTPORT (IP 127.0.0.1 "
                   "unless given; HOSTPORT free unless given, printed) to the container's port (--network egress).")
@click.option("--shared-fs", type=click.Choice(["virtio-fs", "virtio-9p"]), default=None,
              help="How -v volumes reach the VM: virtio-fs behaves as runc's bind mount but boots the VM "
                   "cold (~2.5 s more under TCG); default: 9p in a template clone.")
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(rm: bool, detach_: bool, interactive: bool, tty_: bool, name: str, env: tuple[str, ...],
        workdir: str | None, user: str | None, entrypoint: str | None, init: bool, volume: tuple[str, ...],
        cpus: float | None, memory: str | None, network: str, publish: tuple[str, ...],
        shared_fs: SharedFs | None, image: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in a new container from IMAGE, inside its own VM; exit with its status."""
    sandbox_id = detach.detached_id() if detach_ else None
    if detach_ and interactive:
        raise click.BadParameter("a detached container has no stdin to keep open", param_hint="--interactive")
    try:
        check_cwd(workdir, "--workdir")
        _network(load_config(), network, list(publish))  # a bad flag fails here, not in the background
        if detach_ and sandbox_id is None:
            detach.start_detached(load_config())
        status = asyncio.run(run_async(
            load_config(), image, command, name=name, rm=rm, interactive=interactive, tty_=tty_, env=list(env),
            workdir=workdir, user=user, volumes=list(volume), cpus=cpus, memory=memory, sandbox_id=sandbox_id,
            shared_fs=shared_fs, entrypoint=entrypoint, init=init, network=network, publish=list(publish)))
    except PykataError as e:
        _fail(str(e), failure_status(e, 125))
    sys.exit(status)


async def _exec_async(found: Found, command: tuple[str, ...], interactive: bool, tty_: bool,
                      env: list[str], workdir: str, user: ExecUser) -> int:
    async with await AttachedSandbox.attach(found) as sandbox:
        proc = await sandbox.exec(found.record.id, list(command), env=env, cwd=workdir, uid=user.uid, gid=user.gid,
                                  groups=user.groups, terminal=tty_)
        return await attach(proc, interactive=interactive)


@click.command(name="exec", context_settings={"allow_interspersed_args": False})
@click.option("-i", "--interactive", is_flag=True)
@click.option("-t", "--tty", "tty_", is_flag=True)
@click.option("-e", "--env", multiple=True, help="KEY=VALUE, or KEY for this shell's value (as run -e).")
@click.option("-w", "--workdir", default="/")
@click.option("-u", "--user", default=None, help="USER[:GROUP]: numbers, or names from the container's image.")
@click.argument("container")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(interactive: bool, tty_: bool, env: tuple[str, ...], workdir: str, user: str | None, container: str,
          command: tuple[str, ...]) -> None:
    """Run COMMAND in a running CONTAINER; exit with its status."""
    try:
        check_cwd(workdir, "--workdir")
        found = find(load_config(), container)
        if not found.running:  # exec's own failures are 126 (failure_status), this one too
            _fail(f"container {container} is not running", 126)
        if found.record.containers and found.record.id not in found.record.containers:
            # a CRI pod's sandbox: its pause runs no process in the guest (runtime.sandbox_pause_in_guest)
            _fail(f"{container} is a pod whose sandbox container has no process to exec in; exec into one of "
                  f"its containers (crictl exec, ctr task exec): {', '.join(sorted(found.record.containers))}", 126)
        status = asyncio.run(_exec_async(found, command, interactive, tty_, parse_env(list(env), os.environ), workdir,
                                         _exec_user(found, user) if user else _container_user(found)))
    except PykataError as e:
        _fail(str(e), failure_status(e, 126, command[0]))
    sys.exit(status)


def _container_user(found: Found) -> ExecUser:
    """exec without -u: the user the container's init runs as (run -u, else the image's USER, with its
    groups), as docker exec: its record's [uid, gid, groups...] read as the SDK reads a saved user
    (ExecUser.from_list). A container whose record does not say (made by an older pykata) runs it as
    root with the groups its image gives root, as container_user decides for the SDK and run without
    a USER. Raises SpecError naming the record's field when it holds no such list (ids outside runc's
    range, too many groups): rather than a guess, which could be root."""
    record = found.record.containers.get(found.record.id)
    ids = record.user if record is not None else []
    if not ids:
        return container_user(_image_root(found), None, "")
    who = ExecUser.from_list(ids)
    if who is None:
        raise SpecError(f"containers.{found.record.id}.user",
                        f"{found.dir / STATE_FILE} holds {str(ids)[:80]}, not [uid, gid, groups...] with each id "
                        f"{USER_ID_RULE}; give -u")
    return who


def _exec_user(found: Found, user: str) -> ExecUser:
    """exec's -u, as docker exec's: looked up in the container's image as run's -u (resolve_user: names,
    and numbers too, which get their primary and supplementary groups when the image lists them). A
    container whose image pykata does not know takes numbers only (group 0 unless given). Raises
    SpecError naming --user."""
    return resolve_user(_image_root(found), user)


def _image_root(found: Found) -> Path | None:
    """The root file system of the container's image, None when pykata does not know it (a bundle, or
    an image removed from the store since)."""
    record = found.record.containers.get(found.record.id)
    if record is None or not record.image:
        return None
    config = load_config()
    try:
        return ImageStore(Path(config.runtime.cache_dir), config.image).resolve(record.image).rootfs
    except PykataError:  # removed from the store since: numbers still work
        return None


def _rows(config: Config, all_: bool) -> list[dict[str, Any]]:
    rows = []
    for _, rec in list_sandboxes(Path(config.runtime.runtime_dir) / "sandboxes"):
        if rec is None:
            continue
        alive = rec.owner_alive() and rec.status != "stopped"
        for c in rec.containers.values() or []:
            status = c.status if alive else ("exited" if c.exit_code is not None else "dead")
            if not all_ and status != "running":
                continue
            rows.append({"id": rec.id, "name": rec.name, "image": c.image, "command": c.command,
                         "status": status, "exit_code": c.exit_code, "created": c.created_at,
                         "vmm_pid": rec.vmm_pid if alive else None})
    return rows


@click.command()
@click.option("-a", "--all", "all_", is_flag=True, help="Show exited containers too.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("-q", "--quiet", is_flag=True, help="Only the ids (as docker ps -q: pykata rm -f $(pykata ps -aq)).")
def ps(all_: bool, as_json: bool, quiet: bool) -> None:
    """List containers."""
    rows = _rows(load_config(), all_)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if quiet:
        for r in rows:
            click.echo(r["id"][:12])
        return
    click.echo(f"{'CONTAINER ID':<14}{'IMAGE':<16}{'COMMAND':<24}{'STATUS':<14}NAME")
    for r in rows:
        st = r["status"] if r["status"] != "exited" else f"exited ({r['exit_code']})"
        cmd = " ".join(r["command"])[:22]
        click.echo(f"{r['id'][:12]:<14}{r['image'][:15]:<16}{cmd:<24}{st:<14}{r['name']}")


@click.command()
@click.argument("container")
@click.argument("sig", metavar="[SIGNAL]", default="KILL")
def kill(container: str, sig: str) -> None:
    """Send SIGNAL (default KILL) to a running CONTAINER's main process."""
    signum = parse_signal(sig)
    config = load_config()
    try:
        found = find(config, container)
        if not found.running:
            _fail(f"container {container} is not running", 1)
        asyncio.run(_signal(found, signum))
    except PykataError as e:
        _fail(str(e), 1)
    click.echo(container)  # what the user typed, as docker kill prints it


@click.command()
@click.option("-t", "--time", "grace", type=click.FloatRange(0, 3600), default=10.0, show_default=True,
              help="Seconds to wait after SIGTERM before SIGKILL.")
@click.argument("containers", nargs=-1, required=True)
def stop(grace: float, containers: tuple[str, ...]) -> None:
    """Stop running CONTAINERs as docker stop does: SIGTERM, then SIGKILL after --time seconds (a PID 1 without
    a handler, such as httpd, ignores SIGTERM); the container stays, exited, for logs and rm."""
    def stop_one(config: Config, ref: str) -> str:
        found = find(config, ref)
        if found.running:
            asyncio.run(_signal(found, signal.SIGTERM))
            deadline = time.monotonic() + grace
            if not _wait_stopped(config, found.record.id, deadline):
                asyncio.run(_signal(found, signal.SIGKILL))
                _wait_stopped(config, found.record.id, deadline + 30)
        return ref

    _each_container(containers, stop_one)


def _each_container(containers: tuple[str, ...], act: Callable[[Config, str], str]) -> NoReturn:
    """Run `act` on each container reference, printing what it returns (the reference as the user gave
    it: a name or an id prefix, as docker prints it) or the error; exit 1 if any failed, as docker's stop
    and rm do."""
    config = load_config()
    failed = False
    for ref in containers:
        try:
            click.echo(act(config, ref))
        except PykataError as e:
            click.echo(f"pykata: {e}", err=True)
            failed = True
    sys.exit(1 if failed else 0)


def _wait_stopped(config: Config, sandbox_id: str, deadline: float) -> bool:
    """Whether the container stopped (or went: a `run --rm` one is removed as it exits) by `deadline`."""
    while time.monotonic() < deadline:
        try:
            if not find(config, sandbox_id).running:
                return True
        except NotFoundError:
            return True
        time.sleep(0.1)
    return False


async def _signal(found: Found, signum: int) -> None:
    async with await AttachedSandbox.attach(found) as sandbox:
        await sandbox.signal(found.record.id, signum)


@click.command()
@click.option("-f", "--force", is_flag=True, help="Kill the container first if it is running.")
@click.argument("containers", nargs=-1, required=True)
def rm(force: bool, containers: tuple[str, ...]) -> None:
    """Remove containers (and their VMs and state)."""
    def remove_one(config: Config, ref: str) -> str:
        found = find(config, ref)
        if found.running:
            if not force:
                raise PykataError(f"container {ref} is running: stop it first or use rm -f")
            with contextlib.suppress(PykataError):
                asyncio.run(_signal(found, signal.SIGKILL))
            _wait_owner(found, 10.0)
        remove_sandbox_dir(found.dir, found.record)
        return ref

    _each_container(containers, remove_one)


def _wait_owner(found: Found, timeout: float) -> None:
    """Give the owning `pykata run` a moment to see the exit and stop its VM itself."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and found.record.owner_alive() and found.dir.exists():
        time.sleep(0.05)


@click.command()
@click.option("-f", "--follow", is_flag=True, help="Go on printing what it prints until it exits (docker logs -f).")
@click.argument("container")
def logs(follow: bool, container: str) -> None:
    """Print a container's output (stdout to stdout, stderr to stderr), oldest kept first."""
    try:
        config = load_config()
        found = find(config, container)
    except PykataError as e:
        _fail(str(e), 1)
    for stream, out in (("stdout", sys.stdout.buffer), ("stderr", sys.stderr.buffer)):
        log = found.dir / "logs" / f"{stream}.log"
        older = [log.with_name(f"{log.name}.{n}") for n in range(MAX_LOG_BACKUPS, 0, -1)]
        for path in (older if follow else [*older, log]):  # following prints the current file from its start
            stream_file(path, out)
    if follow:
        with contextlib.suppress(KeyboardInterrupt):
            detach.follow(found.dir, found.record.id)  # attach's loop; logs exits 0 as docker's does


def stream_file(path: Path, out: BinaryIO, chunk: int = 64 << 10) -> None:
    """Copy `path` to `out` a chunk at a time (a log may be large; memory stays at one chunk). A missing
    file is nothing to copy."""
    try:
        f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return
    with f:
        while data := f.read(chunk):
            out.write(data)
        out.flush()


@click.command()
def cleanup() -> None:
    """Remove sandboxes whose owner died (VMs, mounts, directories, egress filter rules)."""
    for sid in cleanup_orphans(load_config()):
        click.echo(f"removed {sid}")
    for sid in asyncio.run(sweep_filter_rules()):
        click.echo(f"removed the filter rules of {sid}")


COMMANDS = [run, exec_, ps, kill, stop, rm, logs, cleanup, detach.attach_cmd]
