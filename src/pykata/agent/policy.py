"""The agent policy (Kata's agent policy, declarative, without Rego): what the agent may do for the host.

The host sends the document (docs/policy.md; examples in examples/policy/) with SetPolicy before
CreateSandbox. From then on the agent is deny-by-default: an RPC runs only when the policy allows it,
and each refusal is PERMISSION_DENIED naming the rule ("policy: containers.commands: ..."). A missing
list allows nothing; "*" in `allow_rpcs` or `images`, or an empty argv prefix `[]` in `commands`,
allows everything of that kind.

    version = 1
    allow_rpcs = ["CreateSandbox", "CreateContainer", ...]   # RPC names of pykata.agent.v1.AgentService
    [containers]
    images = ["docker.io/library/busybox:*"]   # globs on the io.kubernetes.cri.image-name annotation
    commands = [["/pause"], ["sh", "-c"]]      # allowed argv prefixes of a container's process
    readonly_rootfs = true                     # root.readonly must be true
    mounts = ["/etc/hosts", "/data/*"]         # globs on destinations of bind mounts
    [exec]
    commands = [["ls"]]                        # allowed argv prefixes of ExecProcess
    stdio = false                              # stdio RPCs on exec processes (ReadStdout, ...)
    [copy_file]
    paths = ["/run/pykata-agent/shared/"]      # CopyFile only below these guest paths

Stdlib only: this module runs in the guest, and the host imports it to check a document early.
"""

from __future__ import annotations

import asyncio
import fnmatch
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

from pykata.errors import InvalidArgument, PermissionDenied
from pykata.protocols.agent import agent_pb2
from pykata.record import FrozenRecord

VERSION = 1
MAX_POLICY_BYTES = 64 << 10
MAX_ITEMS = 256
MAX_TEXT = 4096
IMAGE_ANNOTATION = "io.kubernetes.cri.image-name"
# RPCs a policy may name (Health's Check/Version are always served: they reveal nothing).
RPC_NAMES = frozenset(agent_pb2.DESCRIPTOR.services_by_name["AgentService"].methods_by_name)
# Stdio RPCs that `exec.stdio` governs when they address an exec process (exec_id != "").
EXEC_STDIO_RPCS = frozenset({"WriteStdin", "ReadStdout", "ReadStderr", "CloseStdin", "TtyWinResize"})
_BIND_OPTIONS = {"bind", "rbind"}


class PolicyError(ValueError):
    """A policy document is malformed; `field` names the offending key."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"policy: {field}: {message}")
        self.field = field


class Policy(FrozenRecord):
    __slots__ = ("allow_rpcs", "container_commands", "copy_file_paths", "exec_commands", "exec_stdio", "images",
                 "mounts", "readonly_rootfs", "source")
    __match_args__ = ("allow_rpcs", "images", "container_commands", "readonly_rootfs", "mounts", "exec_commands",
                      "exec_stdio", "copy_file_paths", "source")
    allow_rpcs: frozenset[str]
    images: tuple[str, ...]
    container_commands: tuple[tuple[str, ...], ...]
    readonly_rootfs: bool
    mounts: tuple[str, ...]
    exec_commands: tuple[tuple[str, ...], ...]
    exec_stdio: bool
    copy_file_paths: tuple[str, ...]
    source: dict[str, Any]

    def __init__(self, allow_rpcs: frozenset[str] = frozenset(), images: tuple[str, ...] = (),
                 container_commands: tuple[tuple[str, ...], ...] = (), readonly_rootfs: bool = False,
                 mounts: tuple[str, ...] = (), exec_commands: tuple[tuple[str, ...], ...] = (),
                 exec_stdio: bool = False, copy_file_paths: tuple[str, ...] = (),
                 source: dict[str, Any] | None = None) -> None:
        self._init("allow_rpcs", allow_rpcs)
        self._init("images", images)
        self._init("container_commands", container_commands)
        self._init("readonly_rootfs", readonly_rootfs)
        self._init("mounts", mounts)
        self._init("exec_commands", exec_commands)
        self._init("exec_stdio", exec_stdio)
        self._init("copy_file_paths", copy_file_paths)
        self._init("source", {} if source is None else source)

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__match_args__[:-1])  # `source` is not compared

    # -- checks ------------------------------------------------------------------------------------

    def check(self, rpc: str, req: Any) -> None:
        """Raises PermissionDenied naming the rule that refuses `rpc` with `req`."""
        if rpc not in self.allow_rpcs and "*" not in self.allow_rpcs:
            raise denied("allow_rpcs", f"{rpc} is not allowed")
        if rpc == "CreateContainer":
            self.check_container(req)
        elif rpc == "ExecProcess":
            args = list(req.process.args) if req.HasField("process") else []
            if not _prefix_allowed(args, self.exec_commands):
                raise denied("exec.commands", f"{_show(args)} starts with no allowed command")
            if (req.stdin or req.close_stdin) and not self.exec_stdio:
                raise denied("exec.stdio", f"stdin on exec process {req.exec_id[:64]!r} is not allowed")
        elif rpc == "WaitProcess" and req.exec_id and req.output_limit and not self.exec_stdio:
            raise denied("exec.stdio", f"output on exec process {req.exec_id[:64]!r} is not allowed")
        elif rpc in EXEC_STDIO_RPCS and req.exec_id and not self.exec_stdio:
            raise denied("exec.stdio", f"{rpc} on exec process {req.exec_id[:64]!r} is not allowed")
        elif rpc == "CopyFile":
            path = posixpath.normpath(req.path) if req.path.startswith("/") else ""
            if not any(path == p.rstrip("/") or path.startswith(p.rstrip("/") + "/") for p in self.copy_file_paths):
                raise denied("copy_file.paths", f"{req.path[:256]!r} is outside the allowed paths")

    def check_container(self, req: agent_pb2.CreateContainerRequest) -> None:
        import json  # (in the guest, loaded after the ready line: pykata.agent.main.LATE_MODULES)

        try:
            spec = json.loads(req.oci_spec_json)
        except ValueError:
            spec = None
        if not isinstance(spec, dict):
            raise denied("containers", "the OCI spec is not a JSON object")
        annotations = spec.get("annotations") if isinstance(spec.get("annotations"), dict) else {}
        image = annotations.get(IMAGE_ANNOTATION) if isinstance(annotations, dict) else None
        if not isinstance(image, str) or not image:
            if "*" not in self.images:
                raise denied("containers.images", f"the container names no image (annotation {IMAGE_ANNOTATION})")
        elif not any(fnmatch.fnmatchcase(image, pat) for pat in self.images):
            raise denied("containers.images", f"image {image[:256]!r} is not allowed")
        process = spec.get("process") if isinstance(spec.get("process"), dict) else {}
        args = process.get("args") if isinstance(process, dict) else None
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            args = []
        if not _prefix_allowed(args, self.container_commands):
            raise denied("containers.commands", f"{_show(args)} starts with no allowed command")
        root = spec.get("root")
        if self.readonly_rootfs and not (isinstance(root, dict) and root.get("readonly") is True):
            raise denied("containers.readonly_rootfs", "the container's root filesystem must be read-only")
        mounts = spec.get("mounts")
        for i, m in enumerate(mounts if isinstance(mounts, list) else []):
            if not isinstance(m, dict):
                continue
            raw = m.get("options")
            options = {o for o in raw if isinstance(o, str)} if isinstance(raw, list) else set()
            if m.get("type") != "bind" and not _BIND_OPTIONS & options:
                continue  # kernel filesystems (proc, sysfs, tmpfs, ...) bring nothing in
            dest = m.get("destination")
            dest = posixpath.normpath(dest) if isinstance(dest, str) and dest.startswith("/") else str(dest)
            if not any(fnmatch.fnmatchcase(dest, pat) for pat in self.mounts):
                raise denied("containers.mounts", f"mounts[{i}]: bind mount on {dest[:256]!r} is not allowed")


def denied(rule: str, message: str) -> PermissionDenied:
    return PermissionDenied(f"policy: {rule}: {message}")


def _show(args: Sequence[str]) -> str:
    return repr([a[:64] for a in args[:8]])[:400]


def _prefix_allowed(args: Sequence[str], prefixes: Sequence[Sequence[str]]) -> bool:
    return any(len(args) >= len(p) and list(args[:len(p)]) == list(p) for p in prefixes)


# -- parsing ---------------------------------------------------------------------------------------

def parse_policy(text: str | bytes) -> Policy:
    """Parse and check a policy document (JSON).

    Raises:
        PolicyError: naming the offending key (unknown keys, wrong types, bad RPC names, too large).
    """
    import json  # (as in Policy.check_container)

    if len(text) > MAX_POLICY_BYTES:
        raise PolicyError("(document)", f"{len(text)} bytes, at most {MAX_POLICY_BYTES}")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise PolicyError("(document)", f"not valid JSON: {exc}") from None
    return policy_from_mapping(data)


def policy_from_mapping(data: object) -> Policy:
    """Build a Policy from a parsed document (JSON object or TOML table). Raises PolicyError."""
    if not isinstance(data, Mapping):
        raise PolicyError("(document)", "must be a table/object")
    _only(data, "", {"version", "allow_rpcs", "containers", "exec", "copy_file"})
    if data.get("version") != VERSION:
        raise PolicyError("version", f"must be {VERSION}, got {data.get('version')!r}")
    rpcs = _strings(data, "allow_rpcs", "")
    for i, name in enumerate(rpcs):
        if name != "*" and name not in RPC_NAMES:
            raise PolicyError(f"allow_rpcs[{i}]", f"unknown RPC {name!r}")
    containers = _table(data, "containers")
    _only(containers, "containers.", {"images", "commands", "readonly_rootfs", "mounts"})
    exec_ = _table(data, "exec")
    _only(exec_, "exec.", {"commands", "stdio"})
    copy = _table(data, "copy_file")
    _only(copy, "copy_file.", {"paths"})
    paths = _strings(copy, "paths", "copy_file.")
    for i, p in enumerate(paths):
        if not p.startswith("/") or ".." in p.split("/"):
            raise PolicyError(f"copy_file.paths[{i}]", f"{p!r} is not an absolute path without '..'")
    return Policy(
        allow_rpcs=frozenset(rpcs), images=tuple(_strings(containers, "images", "containers.")),
        container_commands=_argv_list(containers, "commands", "containers."),
        readonly_rootfs=_bool(containers, "readonly_rootfs", "containers."),
        mounts=tuple(_strings(containers, "mounts", "containers.")),
        exec_commands=_argv_list(exec_, "commands", "exec."), exec_stdio=_bool(exec_, "stdio", "exec."),
        copy_file_paths=tuple(paths), source=dict(data))


def _only(table: Mapping[str, Any], prefix: str, known: set[str]) -> None:
    for key in table:
        if key not in known:
            raise PolicyError(f"{prefix}{key}", f"unknown key (known: {', '.join(sorted(known))})")


def _table(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise PolicyError(key, "must be a table/object")
    return value


def _bool(table: Mapping[str, Any], key: str, prefix: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise PolicyError(prefix + key, f"must be true or false, got {value!r}")
    return value


def _strings(table: Mapping[str, Any], key: str, prefix: str) -> list[str]:
    value = table.get(key, [])
    if not isinstance(value, list) or len(value) > MAX_ITEMS:
        raise PolicyError(prefix + key, f"must be a list of at most {MAX_ITEMS} strings")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item or len(item) > MAX_TEXT or "\0" in item:
            raise PolicyError(f"{prefix}{key}[{i}]", f"must be a non-empty string, got {item!r}"[:300])
    return list(value)


def _argv_list(table: Mapping[str, Any], key: str, prefix: str) -> tuple[tuple[str, ...], ...]:
    value = table.get(key, [])
    if not isinstance(value, list) or len(value) > MAX_ITEMS:
        raise PolicyError(prefix + key, f"must be a list of at most {MAX_ITEMS} argv prefixes (lists of strings)")
    out = []
    for i, argv in enumerate(value):
        if not isinstance(argv, list) or len(argv) > MAX_ITEMS or not all(
                isinstance(a, str) and len(a) <= MAX_TEXT and "\0" not in a for a in argv):
            raise PolicyError(f"{prefix}{key}[{i}]", "must be a list of strings (an argv prefix)")
        out.append(tuple(argv))
    return tuple(out)


class PolicyGate:
    """Wraps the AgentService for the ttrpc server: every RPC is checked against the policy (once
    one is set) before the service sees it; SetPolicy is answered here."""

    def __init__(self, service: object) -> None:
        self._service = service
        self.policy: Policy | None = None

    def SetPolicy(self, req: agent_pb2.SetPolicyRequest, ctx: Any) -> Any:
        from google.protobuf.empty_pb2 import Empty

        if self.policy is not None:
            self.policy.check("SetPolicy", req)
        try:
            self.policy = parse_policy(req.policy_json)
        except PolicyError as exc:
            raise InvalidArgument("policy_json", str(exc)) from None
        return Empty()

    def __getattr__(self, name: str) -> Any:
        handler = getattr(self._service, name)
        if name not in RPC_NAMES:
            return handler

        if not asyncio.iscoroutinefunction(handler):
            # a plain function (or one that hands back an awaitable): the server answers it in the loop
            # turn that read it (pykata.ttrpc.server), checked as it is called, in the order calls came
            def gated_now(req: Any, ctx: Any) -> Any:
                if self.policy is not None:
                    self.policy.check(name, req)
                return handler(req, ctx)

            return gated_now

        async def gated(req: Any, ctx: Any) -> Any:
            if self.policy is not None:
                self.policy.check(name, req)
            return await handler(req, ctx)

        return gated
