"""The error of a shim's `start` or `delete` command line (apart from pykata.shim.flags, so that parsing the
command line imports no pykata.errors: `start` handed to the fork server needs none of it)."""

from __future__ import annotations

from pykata.errors import PykataError


class ShimStartError(PykataError):
    """`start` or `delete` cannot do its job; the message says why."""
