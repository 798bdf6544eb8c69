"""`pykata agent-ctl SANDBOX RPC [JSON]`: call any agent RPC of a running sandbox (Kata's agent-ctl)."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import click

from pykata.config import load_config
from pykata.errors import PykataError
from pykata.sandbox.lookup import find
from pykata.sandbox.remote import AttachedSandbox, agent_rpcs


def _fail(message: str) -> None:
    click.echo(f"pykata: agent-ctl: {message}", err=True)
    sys.exit(1)


async def _call(sandbox: str, rpc: str, body: str, timeout: float) -> str:
    found = find(load_config(), sandbox, "sandbox")
    if not found.running:
        raise PykataError(f"sandbox {found.record.id[:12]} is not running")
    async with await AttachedSandbox.attach(found) as sb:
        return await sb.call_json(rpc, body, timeout=timeout)


@click.command("agent-ctl", short_help="Call an agent RPC of a running sandbox (for debugging).")
@click.option("--list", "list_", is_flag=True, help="List the agent's RPCs and their request fields.")
@click.option("--json", "as_json", is_flag=True, help="With --list: print JSON.")
@click.option("--timeout", type=click.FloatRange(0.1, 3600), default=30.0, show_default=True,
              help="Seconds the agent has to answer.")
@click.argument("sandbox", required=False)
@click.argument("rpc", required=False)
@click.argument("body", required=False, default="{}")
def agent_ctl(list_: bool, as_json: bool, timeout: float, sandbox: str | None, rpc: str | None, body: str) -> None:
    """Call agent RPC (e.g. ListInterfaces, GetGuestDetails) of SANDBOX (id, prefix or name) with a JSON
    BODY (protobuf JSON names, e.g. '{"memBlockSize": true}'); print the reply as JSON. Host root only:
    this bypasses the runtime and can change the guest's state under it."""
    if list_:
        infos = agent_rpcs()
        if as_json:
            click.echo(json.dumps([i.to_json() for i in infos], indent=1))
        else:
            for i in infos:
                fields = ", ".join(f"{k}: {v}" for k, v in i.fields.items())
                click.echo(f"{i.name}({fields}) -> {i.response.rsplit('.', 1)[-1]}")
        return
    if not sandbox or not rpc:
        _fail("usage: pykata agent-ctl SANDBOX RPC [JSON] (or --list)")
        return
    if os.geteuid() != 0:
        _fail("only root may call agent RPCs directly")
    try:
        click.echo(asyncio.run(_call(sandbox, rpc, body, timeout)))
    except PykataError as e:
        _fail(str(e))
