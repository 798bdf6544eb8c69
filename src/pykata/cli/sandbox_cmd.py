"""`pykata sandbox ls` / `pykata sandbox inspect ID`: the running sandboxes, whoever owns them."""

from __future__ import annotations

import json
import sys

import click

from pykata.config import load_config
from pykata.errors import PykataError
from pykata.sandbox import status
from pykata.sandbox.lookup import find


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
        found = find(load_config(), sandbox_id)
    except PykataError as e:
        click.echo(f"pykata: {e}", err=True)
        sys.exit(1)
    info = status.describe(found.dir, found.record).to_json()
    info["running"] = found.running
    click.echo(json.dumps(info, indent=None if as_json else 1))
