"""`containerd-shim-pykata-v2`: the console script containerd runs (start, delete)."""

from __future__ import annotations

import os
import sys

from pykata.errors import PykataError
from pykata.shim.bootstrap import SHIM_NAME, delete, start
from pykata.shim.flags import parse_flags
from pykata.timing import ENV as TIMING_ENV
from pykata.timing import mark, process_start_ns


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        flags = parse_flags(args)
        timed = os.environ.get(TIMING_ENV) and flags.action in ("start", "delete")
        if timed:  # bench/phases.py
            mark(f"{flags.action}.exec", process_start_ns())
            mark(f"{flags.action}.main")
        if flags.version:
            from pykata import __version__

            print(f"{SHIM_NAME} (pykata {__version__})")
            return
        if flags.action == "start":
            address = start(flags)
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
            sys.stdout.buffer.write(delete(flags))
            sys.stdout.flush()
            if timed:
                mark("delete.done")
        else:
            raise PykataError(f"unknown action {flags.action!r}: containerd runs this with start or delete")
    except PykataError as e:
        print(f"{SHIM_NAME}: {e}", file=sys.stderr)
        sys.exit(1)
