"""From the OCI spec the host sends to the config.json crun runs: checked and rewritten for the guest.

What changes on the way (Kata does the same):
  * root.path must already be a guest path inside the agent's allowed directories (the shared
    directory or a storage the agent mounted); it is replaced by its resolved form.
  * bind mounts must come from inside those directories too; other mount types are kept only if
    they are kernel file systems crun knows how to make (proc, sysfs, tmpfs, devpts, ...).
  * the network namespace entry is removed: the VM's network namespace is the pod's, and a
    container that made its own would have no network at all. Other namespaces keep their type
    but lose any `path` (host namespace paths mean nothing in the guest); the pid namespace may
    join the sandbox's instead.
  * hooks are dropped (they are host programs), so are AppArmor/SELinux labels (the guest kernel
    has neither); seccomp stays. crun's own annotations (run.oci.*: a raw seccomp program in place
    of the spec's, plugins to load) are refused.
  * linux.cgroupsPath becomes the agent's per-sandbox cgroup for the container.
  * linux.personality is always set (LINUX unless the spec chose LINUX32): crun runs at fixed
    addresses (agent.command.fixed_layout) and this persona gives the workload its randomization back.
  * a tmpfs mount whose source is POD_SHM_SOURCE (the host's stand-in for the pod's /dev/shm, see
    pykata.sandbox.ocispec.for_guest) becomes a bind of the VM's own /dev/shm, a tmpfs the guest
    init mounts: every container of the pod (the VM) shares it, as they share it under runc.
"""

from __future__ import annotations

import copy
import json
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pykata.agent.validation import (
    MAX_RESOURCES_BYTES,
    MAX_SPEC_BYTES,
    check_abs_path,
    check_args,
    check_count,
    check_env,
    check_string,
    check_within,
    open_dir_below,
)
from pykata.errors import InvalidArgument
from pykata.ids import check_user_id
from pykata.protocols.agent import agent_pb2

Spec = dict[str, Any]

KERNEL_MOUNT_TYPES = frozenset({"proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2", "shm"})
BIND_TYPES = frozenset({"bind", "rbind", "none", ""})
NAMESPACE_TYPES = frozenset({"pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time"})
_U32 = 2**32
POD_SHM_SOURCE = "pykata-pod-shm"
POD_SHM = Path("/dev/shm")
# A mount of this type is the guest image's tini (Debian's static build) bound read-only at its
# destination: the container's PID 1 for `pykata run --init` (docker's --init), reaping orphans and
# forwarding signals. Nothing of the host or of another container is reachable through it.
INIT_MOUNT_TYPE = "pykata-init"
GUEST_INIT = Path("/usr/bin/tini-static")
# annotations crun itself acts on (crun(1) "Extensions to OCI"): refused, see rewrite_spec
CRUN_ANNOTATIONS = "run.oci."


def load_json_object(field: str, text: str, limit: int) -> dict[str, Any]:
    """Parse bounded JSON text that must be an object. Raises InvalidArgument."""
    if len(text.encode()) > limit:
        raise InvalidArgument(field, f"larger than {limit} bytes")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(field, f"not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(field, "must be a JSON object")
    return doc


def load_spec(text: str) -> Spec:
    spec = load_json_object("oci_spec_json", text, MAX_SPEC_BYTES)
    for key in ("process", "root"):
        if not isinstance(spec.get(key), dict):
            raise InvalidArgument(f"oci_spec_json.{key}", "missing or not an object")
    return spec


def load_resources(text: str) -> dict[str, Any]:
    return load_json_object("linux_resources_json", text, MAX_RESOURCES_BYTES)


def _uint(field: str, value: object, limit: int = _U32) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
        raise InvalidArgument(field, f"{value!r} is not an integer in [0, {limit})")
    return value


def check_process(proc: dict[str, Any], field: str) -> dict[str, Any]:
    """Check an OCI `process` object in place; returns it without the labels the guest lacks."""
    proc["args"] = check_args(f"{field}.args", proc.get("args"))
    proc["env"] = check_env(f"{field}.env", proc.get("env"))
    proc["cwd"] = check_abs_path(f"{field}.cwd", proc.get("cwd") or "/")
    user = proc.get("user", {})
    if not isinstance(user, dict):
        raise InvalidArgument(f"{field}.user", "must be an object")
    # the last line: 4294967295 ((uid_t)-1) would make setresuid a no-op and leave the process root
    user["uid"] = check_user_id(f"{field}.user.uid", user.get("uid", 0))
    user["gid"] = check_user_id(f"{field}.user.gid", user.get("gid", 0))
    gids = user.get("additionalGids") or []
    if not isinstance(gids, list):
        raise InvalidArgument(f"{field}.user.additionalGids", "must be a list")
    check_count(f"{field}.user.additionalGids", gids, 256)
    user["additionalGids"] = [check_user_id(f"{field}.user.additionalGids[{i}]", g) for i, g in enumerate(gids)]
    if not user["additionalGids"]:
        del user["additionalGids"]
    if "umask" in user and user["umask"] is not None:
        user["umask"] = _uint(f"{field}.user.umask", user["umask"], 0o1000)
    proc["user"] = user
    if not isinstance(proc.get("terminal", False), bool):
        raise InvalidArgument(f"{field}.terminal", "must be true or false")
    size = proc.get("consoleSize")
    if size is not None:
        if not isinstance(size, dict):
            raise InvalidArgument(f"{field}.consoleSize", "must be an object")
        for k in ("height", "width"):
            _uint(f"{field}.consoleSize.{k}", size.get(k, 0), 65536)
    for key in ("capabilities", "rlimits"):
        if key in proc and not isinstance(proc[key], dict | list):
            raise InvalidArgument(f"{field}.{key}", "has the wrong type")
    proc.pop("apparmorProfile", None)
    proc.pop("selinuxLabel", None)
    return proc


def _is_bind(mount: Mapping[str, Any]) -> bool:
    options = mount.get("options") or []
    return mount.get("type") in ("bind", "rbind") or "bind" in options or "rbind" in options


def check_mounts(mounts: object, roots: Sequence[Path], pod_shm: Path = POD_SHM) -> list[dict[str, Any]]:
    """Check the spec's mounts; bind sources are resolved and must lie inside `roots`; the pod's shm
    (a tmpfs of source POD_SHM_SOURCE) becomes a bind of `pod_shm`."""
    if mounts is None:
        return []
    if not isinstance(mounts, list):
        raise InvalidArgument("oci_spec_json.mounts", "must be a list")
    check_count("oci_spec_json.mounts", mounts)
    out = []
    for i, m in enumerate(mounts):
        field = f"oci_spec_json.mounts[{i}]"
        if not isinstance(m, dict):
            raise InvalidArgument(field, "must be an object")
        m = dict(m)
        m["destination"] = check_abs_path(f"{field}.destination", m.get("destination"))
        options = m.get("options") or []
        if not isinstance(options, list):
            raise InvalidArgument(f"{field}.options", "must be a list of strings")
        check_count(f"{field}.options", options, 64)
        m["options"] = [check_string(f"{field}.options[{j}]", o, max_len=4096) for j, o in enumerate(options)]
        mtype = m.get("type", "")
        if not isinstance(mtype, str):
            raise InvalidArgument(f"{field}.type", "must be a string")
        if _is_bind(m):
            if mtype not in BIND_TYPES:
                raise InvalidArgument(f"{field}.type", f"{mtype!r} with a bind option")
            m["source"] = str(check_within(f"{field}.source", m.get("source"), roots))
        elif mtype == "tmpfs" and m.get("source") == POD_SHM_SOURCE:
            # only the flags of the container's mount stay: the pod's tmpfs has its size and mode
            keep = [o for o in m["options"] if o in ("ro", "rw", "nosuid", "nodev", "noexec")]
            m = {"destination": m["destination"], "type": "bind", "source": str(pod_shm),
                 "options": ["rbind", *keep]}
        elif mtype == INIT_MOUNT_TYPE:
            if not GUEST_INIT.is_file():
                raise InvalidArgument(f"{field}.type", f"{INIT_MOUNT_TYPE}: this guest image has no {GUEST_INIT} "
                                                       "(an image built before --init: pykata image build)")
            m = {"destination": m["destination"], "type": "bind", "source": str(GUEST_INIT),
                 "options": ["bind", "ro", "nosuid", "nodev"]}
        elif mtype not in KERNEL_MOUNT_TYPES:
            raise InvalidArgument(f"{field}.type",
                                  f"{mtype!r} is not allowed (bind mounts and {sorted(KERNEL_MOUNT_TYPES)})")
        else:
            check_string(f"{field}.source", m.get("source", mtype), max_len=256)
        out.append(m)
    return out


def _namespaces(linux: dict[str, Any], pid_ns_path: str | None) -> list[dict[str, str]]:
    entries = linux.get("namespaces") or []
    if not isinstance(entries, list):
        raise InvalidArgument("oci_spec_json.linux.namespaces", "must be a list")
    out = []
    seen = set()
    for i, ns in enumerate(entries):
        if not isinstance(ns, dict) or ns.get("type") not in NAMESPACE_TYPES:
            raise InvalidArgument(f"oci_spec_json.linux.namespaces[{i}]", f"unknown namespace {ns!r}")
        kind = ns["type"]
        if kind == "network" or kind in seen:
            continue
        seen.add(kind)
        entry = {"type": kind}
        if kind == "pid" and pid_ns_path:
            entry["path"] = pid_ns_path
        out.append(entry)
    if pid_ns_path and "pid" not in seen:
        out.append({"type": "pid", "path": pid_ns_path})
    return out


def device_entries(devices: Iterable[agent_pb2.Device]) -> list[dict[str, Any]]:
    """linux.devices entries for the devices the host hot-plugged (found under the guest's /dev)."""
    out = []
    for i, dev in enumerate(devices):
        field = f"devices[{i}]"
        if not dev.vm_path or not dev.container_path:
            continue
        real = check_within(f"{field}.vm_path", dev.vm_path, [Path("/dev")])
        try:
            st = os.stat(real)
        except OSError as exc:
            raise InvalidArgument(f"{field}.vm_path", f"{dev.vm_path}: {exc.strerror}") from None
        if stat.S_ISBLK(st.st_mode):
            kind = "b"
        elif stat.S_ISCHR(st.st_mode):
            kind = "c"
        else:
            raise InvalidArgument(f"{field}.vm_path", f"{dev.vm_path} is not a device")
        out.append({"path": check_abs_path(f"{field}.container_path", dev.container_path), "type": kind,
                    "major": os.major(st.st_rdev), "minor": os.minor(st.st_rdev),
                    "fileMode": stat.S_IMODE(st.st_mode), "uid": 0, "gid": 0})
    return out


def rewrite_spec(spec: Spec, *, roots: Sequence[Path], cgroups_path: str, terminal: bool = False,
                 pid_ns_path: str | None = None, extra_mounts: Sequence[dict[str, Any]] = (),
                 devices: Sequence[dict[str, Any]] = (), pod_shm: Path = POD_SHM, owned: bool = False) -> Spec:
    """The config.json for crun: a new dict, or with `owned` (the caller parsed `spec` for this call
    and keeps no other use of it, as CreateContainer does) `spec` itself, rewritten in place: a deep
    copy of a whole spec is a few ms of every create under TCG. Raises InvalidArgument naming the
    field (`spec` may then be half rewritten)."""
    out = spec if owned else copy.deepcopy(spec)
    out.pop("hooks", None)
    notes = out.get("annotations")
    if notes is not None and not isinstance(notes, dict):
        raise InvalidArgument("oci_spec_json.annotations", "must be an object")
    for key in notes or {}:
        if isinstance(key, str) and key.startswith(CRUN_ANNOTATIONS):
            # crun reads these from config.json: a raw BPF program instead of the spec's seccomp
            # (run.oci.seccomp_bpf_data), shared libraries to load (run.oci.seccomp.plugins), ...
            raise InvalidArgument(f"oci_spec_json.annotations[{key[:80]!r}]",
                                  "crun's own annotations (run.oci.*) are not accepted from the host")
    root = out["root"]
    real_root = check_within("oci_spec_json.root.path", root.get("path"), roots)
    if not real_root.is_dir():
        raise InvalidArgument("oci_spec_json.root.path", f"{root.get('path')!r} is not a directory")
    root["path"] = str(real_root)
    if not isinstance(root.get("readonly", False), bool):
        raise InvalidArgument("oci_spec_json.root.readonly", "must be true or false")
    process = check_process(out["process"], "oci_spec_json.process")
    if terminal:
        process["terminal"] = True
    if "hostname" in out:
        check_string("oci_spec_json.hostname", out["hostname"], max_len=64)
    mounts = check_mounts(out.get("mounts"), roots, pod_shm)
    have = {m["destination"] for m in mounts}
    mounts.extend(m for m in extra_mounts if m["destination"] not in have)
    out["mounts"] = mounts
    linux = out.setdefault("linux", {})
    if not isinstance(linux, dict):
        raise InvalidArgument("oci_spec_json.linux", "must be an object")
    linux["namespaces"] = _namespaces(linux, pid_ns_path)
    linux["personality"] = _personality(linux.get("personality"))
    linux["cgroupsPath"] = cgroups_path
    linux.pop("mountLabel", None)
    if not isinstance(linux.get("resources", {}), dict):
        raise InvalidArgument("oci_spec_json.linux.resources", "must be an object")
    if devices:
        listed = linux.get("devices") or []
        if not isinstance(listed, list):
            raise InvalidArgument("oci_spec_json.linux.devices", "must be a list")
        paths = {d["path"] for d in devices}
        linux["devices"] = [d for d in listed if isinstance(d, dict) and d.get("path") not in paths] + list(devices)
        rules = linux.setdefault("resources", {}).setdefault("devices", [])
        rules.extend({"allow": True, "type": d["type"], "major": d["major"], "minor": d["minor"],
                      "access": "rwm"} for d in devices)
    return out


def _personality(given: Any) -> dict[str, Any]:
    """linux.personality for crun: the spec's (LINUX or LINUX32), else LINUX. crun runs without
    address-space randomization (agent.command.fixed_layout) and the container's init inherits
    that; crun sets this persona before the workload's exec, which gives the workload its
    randomization back, so every container must have one crun applies. Raises InvalidArgument."""
    if given is None:
        return {"domain": "LINUX"}
    if not isinstance(given, dict) or given.get("domain") not in ("LINUX", "LINUX32"):
        raise InvalidArgument("oci_spec_json.linux.personality", "domain must be LINUX or LINUX32")
    return given


# -- exec processes ----------------------------------------------------------------------------

def process_from_proto(proc: agent_pb2.Process, base: Mapping[str, Any], rootfs: Path) -> dict[str, Any]:
    """The OCI process.json for `crun exec`: the request's fields, with the container's init
    process supplying capabilities, rlimits and no_new_privileges when the request leaves them out.

    Raises InvalidArgument naming the bad field of `process`.
    """
    out: dict[str, Any] = {
        "args": list(proc.args), "env": list(proc.env), "cwd": proc.cwd or "/",
        "terminal": proc.terminal,
        "user": {"uid": proc.user.uid, "gid": proc.user.gid},
    }
    if proc.user.additional_gids:
        out["user"]["additionalGids"] = list(proc.user.additional_gids)
    if proc.user.HasField("umask"):
        out["user"]["umask"] = proc.user.umask
    if proc.user.username:
        name = check_string("process.user.username", proc.user.username, max_len=256, allow_empty=False)
        out["user"]["uid"], out["user"]["gid"] = lookup_user(rootfs, name)
    if proc.terminal and (proc.console_height or proc.console_width):
        out["consoleSize"] = {"height": proc.console_height, "width": proc.console_width}
    if proc.HasField("capabilities"):
        caps = proc.capabilities
        out["capabilities"] = {k: list(getattr(caps, k)) for k in
                               ("bounding", "effective", "inheritable", "permitted", "ambient")}
    elif "capabilities" in base:
        out["capabilities"] = copy.deepcopy(base["capabilities"])
    _within_bounding(out.get("capabilities"), base.get("capabilities"))
    if proc.rlimits:
        out["rlimits"] = [{"type": r.type, "hard": r.hard, "soft": r.soft} for r in proc.rlimits]
    elif "rlimits" in base:
        out["rlimits"] = copy.deepcopy(base["rlimits"])
    out["noNewPrivileges"] = proc.no_new_privileges or bool(base.get("noNewPrivileges", False))
    if proc.HasField("oom_score_adj"):
        out["oomScoreAdj"] = proc.oom_score_adj
    return check_process(out, "process")


def _within_bounding(caps: object, base: object) -> None:
    """An exec gets no capability the container's init may not have: crun exec would grant what
    the process asks for (it starts from the agent's full set), so the agent refuses it first.

    Raises InvalidArgument naming the set and the capability.
    """
    bounding = base.get("bounding") if isinstance(base, dict) else None
    if not isinstance(caps, dict) or not isinstance(bounding, list):
        return  # no bounding set in the container's spec: crun leaves every capability
    allowed = set(bounding)
    for kind in ("bounding", "effective", "inheritable", "permitted", "ambient"):
        extra = [c for c in caps.get(kind) or [] if c not in allowed]
        if extra:
            raise InvalidArgument(f"process.capabilities.{kind}",
                                  f"{extra[0]} is not in the container's bounding set")


def lookup_user(rootfs: Path, name: str) -> tuple[int, int]:
    """uid and gid of `name` in the container's /etc/passwd (never following a symlink out).

    Raises InvalidArgument when there is no such user.
    """
    try:
        etc = open_dir_below(rootfs, ["etc"], field="process.user.username")
    except OSError:
        raise InvalidArgument("process.user.username", "the container has no /etc/passwd") from None
    try:
        fd = os.open("passwd", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=etc)
        with os.fdopen(fd, "r", errors="replace") as f:
            text = f.read(1 << 20)
    except OSError:
        raise InvalidArgument("process.user.username", "the container has no readable /etc/passwd") from None
    finally:
        os.close(etc)
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) >= 4 and parts[0] == name and parts[2].isdigit() and parts[3].isdigit():
            return int(parts[2]), int(parts[3])
    raise InvalidArgument("process.user.username", f"no user {name!r} in the container's /etc/passwd")
