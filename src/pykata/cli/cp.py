"""`pykata cp`: copy a file between the host and a running sandbox's container (docker cp's shape).

It goes through the SDK's files API (pykata.sdk.files): the guest resolves the container path in the
container's own view with `cat`, the host never does; what comes back is bounded (--max-bytes) and the
host file appears whole or not at all.
"""

from __future__ import annotations

import asyncio
import sys

import click

from pykata.errors import PykataError

MAX_BYTES = 4 << 30


def _split(arg: str) -> tuple[str, str] | None:
    """"SANDBOX:PATH" -> (SANDBOX, PATH); a host path (no colon before the first slash) -> None."""
    head, sep, tail = arg.partition(":")
    if not sep or "/" in head or not head:
        return None
    return head, tail


async def _copy(src: str, dst: str, max_bytes: int) -> None:
    from pykata.sdk import AsyncSandbox

    remote_src, remote_dst = _split(src), _split(dst)
    if remote_src is not None and remote_dst is None:
        sb = await AsyncSandbox.connect(remote_src[0])
        try:
            await sb.files.download(remote_src[1], dst, max_bytes=max_bytes)
        finally:
            await sb.close()
    elif remote_dst is not None and remote_src is None:
        sb = await AsyncSandbox.connect(remote_dst[0])
        try:
            await sb.files.upload(src, remote_dst[1])
        finally:
            await sb.close()
    else:
        raise click.UsageError("exactly one of SRC and DEST is SANDBOX:PATH")


@click.command("cp")
@click.option("--max-bytes", type=click.IntRange(1, 1 << 40), default=MAX_BYTES, show_default=True,
              help="Refuse a download larger than this (the guest decides what it sends).")
@click.argument("src")
@click.argument("dest")
def cp(max_bytes: int, src: str, dest: str) -> None:
    """Copy a file from the host into a running sandbox's container or back: `pykata cp FILE
    SANDBOX:PATH` or `pykata cp SANDBOX:PATH FILE` (SANDBOX: id, id prefix or name). Regular files only;
    the permission bits are kept."""
    try:
        asyncio.run(_copy(src, dest, max_bytes))
    except (PykataError, OSError) as e:
        click.echo(f"pykata: cp: {e}", err=True)
        sys.exit(1)
