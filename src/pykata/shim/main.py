"""`containerd-shim-pykata-v2`: the console script containerd runs (start, delete)."""

from __future__ import annotations

import os
import sys

from pykata.shim.flags import Flags, parse_flags
from pykata.timing import ENV as TIMING_ENV
from pykata.timing import mark, process_start_ns

SHIM_NAME = "containerd-shim-pykata-v2"  # bootstrap.SHIM_NAME (bootstrap is not imported on `start`'s fast path)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        flags = parse_flags(args)
        timed = os.environ.get(TIMING_ENV) and flags.action in ("start", "delete")
        if timed:  # bench/phases.py
            mark(f"{flags.action}.exec", process_start_ns())
            mark(f"{flags.action}.main")
            mark(f"{flags.action}.id@{flags.id}")  # bench/ctr_bench.py --timeline: this process's container
        if flags.version:
            from pykata import __version__

            print(f"{SHIM_NAME} (pykata {__version__})")
            return
        if flags.action == "start":
            address = _start(flags, args)
            sys.stdout.write(address)
            sys.stdout.flush()
            if timed:
                mark("start.done")
        elif flags.action == "pool-entry":  # pykata.factory.pool starts these, not containerd
            from pykata.shim.pooled import main as wait_in_pool

            wait_in_pool(flags)
        elif flags.action == "fork-server":  # `start` launches it (pykata.shim.forkserver)
            from pykata.shim.forkserver import serve

            serve(flags)
        elif flags.action == "delete":
            sys.stdout.buffer.write(_delete(flags, args))
            sys.stdout.flush()
            if timed:
                mark("delete.done")
        else:
            from pykata.shim.starterror import ShimStartError

            raise ShimStartError(f"unknown action {flags.action!r}: containerd runs this with start or delete")
    except Exception as e:
        # pykata.errors only now: `start` and `delete` handed to the fork server never import it (enum)
        from pykata.errors import PykataError

        if not isinstance(e, PykataError):
            raise
        print(f"{SHIM_NAME}: {e}", file=sys.stderr)
        sys.exit(1)


def _start(flags: Flags, args: list[str]) -> str:
    """`start`: handed to the fork server when one runs (pykata.shim.handoff), else done here."""
    from pykata.shim.handoff import NotServed, read_options, run_via_server

    options = read_options()
    if flags.id and flags.namespace:  # else the full `start` says what is missing
        try:
            out, _ = run_via_server(flags.address, [sys.executable, *sys.argv[:1], *args], options)
            return out.decode()
        except NotServed:
            pass
    from pykata.shim.bootstrap import start

    return start(flags, options)


def _delete(flags: Flags, args: list[str]) -> bytes:
    """`delete`: handed to the fork server when one runs, else done here; the DeleteResponse."""
    from pykata.shim.handoff import NotServed, run_via_server

    if flags.id:  # else `delete` says what is missing
        try:
            out, err = run_via_server(flags.address, [sys.executable, *sys.argv[:1], *args], b"")
            if err:
                sys.stderr.write(err)
            return out
        except NotServed:
            pass
    from pykata.shim.bootstrap import delete

    return delete(flags)
