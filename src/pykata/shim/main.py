"""`containerd-shim-pykata-v2`: the console script containerd runs (start, delete)."""

from __future__ import annotations

import sys

from pykata.errors import PykataError
from pykata.shim.bootstrap import SHIM_NAME, delete, start
from pykata.shim.flags import parse_flags


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        flags = parse_flags(args)
        if flags.version:
            from pykata import __version__

            print(f"{SHIM_NAME} (pykata {__version__})")
            return
        if flags.action == "start":
            address = start(flags)
            sys.stdout.write(address)
            sys.stdout.flush()
        elif flags.action == "delete":
            sys.stdout.buffer.write(delete(flags))
            sys.stdout.flush()
        else:
            raise PykataError(f"unknown action {flags.action!r}: containerd runs this with start or delete")
    except PykataError as e:
        print(f"{SHIM_NAME}: {e}", file=sys.stderr)
        sys.exit(1)
