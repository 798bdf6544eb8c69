"""The shape of an OCI runtime spec (a bundle's config.json, or containerd's) as far as the host reads it.

In the image layer, below the sandbox: the image store reads a bundle's root and process, the sandbox
its mounts and resources.
"""

from __future__ import annotations

from typing import Any

from pykata.errors import InvalidArgument
from pykata.ids import check_process_user

# The parts of an OCI spec the host itself reads (a bundle's config.json, containerd's): each must have
# the type the runtime spec gives it before anything is taken from it. The agent checks the whole spec
# again in the guest; this is only so that a malformed one is refused by name instead of crashing the host.
_SPEC_SHAPE: tuple[tuple[str, type, type | None], ...] = (
    ("process", dict, None), ("process.args", list, str), ("process.env", list, str), ("process.cwd", str, None),
    ("process.user", dict, None), ("root", dict, None), ("root.path", str, None), ("mounts", list, dict),
    ("linux", dict, None), ("linux.resources", dict, None), ("linux.resources.memory", dict, None),
    ("linux.resources.cpu", dict, None), ("linux.namespaces", list, dict), ("hooks", dict, None),
    ("annotations", dict, str),
)
_MOUNT_SHAPE: tuple[tuple[str, type, type | None], ...] = (
    ("destination", str, None), ("source", str, None), ("type", str, None), ("options", list, str),
)
_KIND: dict[type, str] = {dict: "an object", list: "a list", str: "a string"}


def check_spec_shape(spec: object, where: str = "config.json") -> dict[str, Any]:
    """`spec` when every part of it the host reads has its type in the OCI runtime spec. Raises
    InvalidArgument naming the first part that has not (`config.json.mounts[2].options`)."""
    if not isinstance(spec, dict):
        raise InvalidArgument(where, "must be a JSON object")
    _check_shape(spec, _SPEC_SHAPE, where)
    for i, mount in enumerate(spec.get("mounts") or []):
        _check_shape(mount, _MOUNT_SHAPE, f"{where}.mounts[{i}]")
    user = (spec.get("process") or {}).get("user")
    if user is not None:  # a uid of 4294967295 would leave the container's process root (ids.MAX_USER_ID)
        check_process_user(user, f"{where}.process.user")
    return spec


def _check_shape(doc: dict[str, Any], shape: tuple[tuple[str, type, type | None], ...], where: str) -> None:
    for path, kind, item in shape:  # a parent comes before its parts
        node: Any = doc
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            continue
        items = node.values() if isinstance(node, dict) else node
        if not isinstance(node, kind) or (item is not None and not all(isinstance(x, item) for x in items)):
            of = f" of {_KIND[item].split(' ', 1)[1]}s" if item is not None else ""
            raise InvalidArgument(f"{where}.{path}", f"must be {_KIND[kind]}{of}")
