"""`pykata sandbox ls` / `pykata sandbox inspect ID`: the running sandboxes, whoever owns them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys

import click

from pykata.config import load_config
from pykata.errors import PykataError
from pykata.sandbox import status
from pykata.sandbox.lookup import Found, find
from pykata.sandbox.remote import AttachedSandbox

TERM_RE = re.compile(r"^[A-Za-z0-9._+-]{1,64}$")


def _size(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.0f}MiB"


def _age(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@click.group("sandbox")
def sandbox() -> None:
    """Inspect running sandboxes (VMs): containerd's shims' and the CLI's/SDK's."""


@sandbox.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def ls(as_json: bool) -> None:
    """List every running sandbox: id, owner, VM pid, vCPUs/memory, template or cold, uptime, PSS."""
    infos = status.list_running(load_config())
    if as_json:
        click.echo(json.dumps([i.to_json() for i in infos], indent=1))
        return
    click.echo(f"{'SANDBOX ID':<14}{'NAME':<14}{'OWNER':<8}{'VM PID':<9}{'VCPUS':<7}{'MEMORY':<9}{'BOOT':<10}"
               f"{'UPTIME':<9}{'PSS':<9}CONTAINERS")
    for i in infos:
        mem = f"{i.memory_mib}MiB" if i.memory_mib else "-"
        click.echo(f"{i.id[:12]:<14}{i.name[:12]:<14}{i.owner:<8}{i.vmm_pid or '-'!s:<9}{i.vcpus or '-'!s:<7}"
                   f"{mem:<9}{i.boot:<10}{_age(i.uptime_seconds):<9}{_size(i.pss_bytes):<9}{len(i.containers)}")


@sandbox.command("inspect")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the default is also JSON, indented).")
@click.argument("sandbox_id")
def inspect(as_json: bool, sandbox_id: str) -> None:
    """Everything known of one sandbox (id, id prefix or name)."""
    try:
        found = find(load_config(), sandbox_id, "sandbox")
    except PykataError as e:
        click.echo(f"pykata: {e}", err=True)
        sys.exit(1)
    info = status.describe(found.dir, found.record).to_json()
    info["running"] = found.running
    click.echo(json.dumps(info, indent=None if as_json else 1))


async def _console(found: Found, command: tuple[str, ...], terminal: bool) -> int:
    from pykata.cli.run import attach
    from pykata.cli.termfilter import AnswerbackFilter

    # Of the admin's environment only $TERM goes to the guest (an admin's shell may hold secrets).
    term = os.environ.get("TERM", "")
    rows = columns = 0
    if terminal and os.isatty(1):
        columns, rows = os.get_terminal_size(1)
    async with await AttachedSandbox.attach(found) as sb:
        proc = await sb.debug_console(command, terminal=terminal, term=term if TERM_RE.match(term) else "",
                                      rows=rows, columns=columns)
        # a guest must not make the admin's terminal answer (into the guest) or touch the clipboard
        to_terminal = os.isatty(1) or os.isatty(2)
        return await attach(proc, interactive=True,
                            output_filter=(lambda: AnswerbackFilter().feed) if to_terminal else None)


@sandbox.command("exec", context_settings={"allow_interspersed_args": False})
@click.option("-t", "--tty", "tty_", is_flag=True, default=None,
              help="Give the command a terminal (the default without a command, when stdin is one).")
@click.argument("sandbox_id")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def exec_(tty_: bool | None, sandbox_id: str, command: tuple[str, ...]) -> None:
    """Debug console: a shell (or COMMAND) in the sandbox's guest itself, outside its containers, as the
    guest's root. Only when the host's configuration sets agent.pykata.debug_console_enabled = true
    (the sandbox must have been started with it). Exits with the command's status.

    \b
        pykata sandbox exec 3f2a            # interactive shell in the guest
        pykata sandbox exec 3f2a -- cat /proc/1/cmdline
    """
    config = load_config()
    if not config.agent.pykata.debug_console_enabled:
        click.echo("pykata: sandbox exec: the debug console is disabled: set "
                   "agent.pykata.debug_console_enabled = true in the host's configuration file "
                   f"({config.source or 'built-in defaults'}) and start the sandbox again", err=True)
        sys.exit(1)
    if command[:1] == ("--",):
        command = command[1:]
    terminal = tty_ if tty_ is not None else (not command and os.isatty(0))
    try:
        found = find(config, sandbox_id, "sandbox")
        if not found.running:
            raise PykataError(f"sandbox {sandbox_id} is not running")
        status = asyncio.run(_console(found, command, terminal))
    except PykataError as e:
        click.echo(f"pykata: sandbox exec: {e}", err=True)
        sys.exit(126)
    sys.exit(status)
