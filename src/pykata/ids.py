"""Identifiers: one rule for the ids of containers, execs and sandboxes (a VM is named by its sandbox).

The rule is containerd's grammar (`identifiers.Validate`: letters and digits in runs joined by single
'.', '_' or '-'), so whatever containerd hands the shim is judged the same way by the shim, the
sandbox, the VM driver and the agent, and an id that passes the first check passes every later one.
The length limit is 64, not containerd's 76: a sandbox id names directories that hold unix sockets
(/run/pykata/sandboxes/<id>/vm/virtiofsd.sock), and a socket path must fit sun_path (107 bytes);
CRI's ids are 64 hex digits. An id of 65-76 characters is refused at the shim, naming the field,
instead of failing later inside the driver.

Stdlib only: the guest agent imports this module too.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

from pykata.errors import InvalidArgument

MAX_ID_LENGTH = 64
_ID_RE = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$")
# A guest's host name (a sandbox's or container's name becomes it): the host checks it before anything
# boots, the agent again.
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,62})$")
HOSTNAME_RULE = "letters, digits, '.', '-'; at most 63, starting with a letter or digit"


# A user or group id a container process may run as: runc's range (it refuses larger ones, "uids and gids
# must be in range 0-2147483647"). 4294967295 above all must never reach setresuid/setresgid: it is
# (uid_t)-1, "leave unchanged", so a process asked to run as it stays root. The host checks every id
# where it arrives (spec process.user, -u, the SDK's user, additionalGids), the agent again.
MAX_USER_ID = 2**31 - 1
USER_ID_RULE = f"an integer in [0, {MAX_USER_ID}] (runc's range; 4294967295 is -1: setresuid would keep root)"


def is_user_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_USER_ID


def check_user_id(field: str, value: object) -> int:
    """`value` when it is a uid/gid a process may run as (USER_ID_RULE). Raises InvalidArgument naming
    `field`."""
    if not is_user_id(value):
        raise InvalidArgument(field, f"{str(value)[:40]} is not {USER_ID_RULE}")
    assert isinstance(value, int)
    return value


def check_process_user(user: object, field: str) -> None:
    """Check the ids of an OCI process.user object (uid, gid, additionalGids). Raises InvalidArgument
    naming the bad one (`field`.uid, `field`.additionalGids[2])."""
    if not isinstance(user, dict):
        raise InvalidArgument(field, "must be an object")
    for key in ("uid", "gid"):
        if key in user:
            check_user_id(f"{field}.{key}", user[key])
    gids = user.get("additionalGids") or []
    if not isinstance(gids, list):
        raise InvalidArgument(f"{field}.additionalGids", "must be a list")
    for i, g in enumerate(gids):
        check_user_id(f"{field}.additionalGids[{i}]", g)


def is_valid_id(value: object) -> bool:
    """True when `value` is an id by the rule above (a str of 1..64 characters in containerd's grammar)."""
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH and _ID_RE.match(value) is not None


def is_hostname(value: object) -> bool:
    """True when `value` may be a guest's host name (HOSTNAME_RE)."""
    return isinstance(value, str) and HOSTNAME_RE.match(value) is not None


def check_id(field: str, value: object) -> str:
    """`value` when it is a valid container, exec or sandbox id; else raises InvalidArgument naming
    `field` (the request field, annotation or argument it came from)."""
    if not is_valid_id(value):
        shown = repr(value[:80] if isinstance(value, str) else value)
        raise InvalidArgument(field, f"{shown} is not a valid id (1-{MAX_ID_LENGTH} letters and digits, "
                                     "joined by single '.', '_' or '-')")
    assert isinstance(value, str)
    return value


def check_container_id(value: object, field: str = "container_id") -> str:
    """A container id. Raises InvalidArgument naming `field`."""
    return check_id(field, value)


def check_sandbox_id(value: object, field: str = "sandbox_id") -> str:
    """A sandbox id (it also names the sandbox's VM). Raises InvalidArgument naming `field`."""
    return check_id(field, value)


def check_exec_id(value: object, field: str = "exec_id", *, allow_empty: bool = False) -> str:
    """An exec id; "" (a container's init process) only when `allow_empty`. Raises InvalidArgument."""
    if allow_empty and value == "":
        return ""
    return check_id(field, value)


def vm_process_name(vm_id: str) -> str:
    """The name a VM's QEMU carries on its command line (`-name pykata-<id>,...`; a VM is named by its
    sandbox): how a recorded VMM pid is told from a process that reused it."""
    return f"pykata-{vm_id}"


def names_vm(argv: Sequence[str], vm_id: str) -> bool:
    """Whether command line `argv` is that of VM `vm_id`'s QEMU (or of its lifeline wrapper): an exact
    `-name` argument, never a substring (the ids "abc" and "abc1", a user's process naming the path)."""
    want = vm_process_name(vm_id)
    return any(a == "-name" and v.split(",", 1)[0] == want for a, v in itertools.pairwise(argv))
