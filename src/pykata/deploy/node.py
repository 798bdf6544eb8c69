"""`pykata install node`: put pykata on a Kubernetes node, as kata-deploy does for Kata; `--uninstall`
takes it all off again.

The installer runs in a privileged DaemonSet pod that mounts the node's / at `root` (/host). Paths are
node paths (what containerd on the node sees) and reach the node's files under `root`. Install, in
order: the payload at the prefix (/opt/pykata), the shim link on containerd's PATH, pykata's runtime
handler in containerd's configuration, a containerd restart (only when the configuration changed),
and last the node label, so pods are scheduled only once the node can run them. Uninstall reverses it
in the opposite order. Every step finds what an earlier, interrupted run left and carries on, and a
second install with nothing new changes nothing.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pykata.config import parse_toml
from pykata.deploy import containerd_config, crio_config, labels, payload
from pykata.errors import ConfigError, PykataError

SHIM_NAME = "containerd-shim-pykata-v2"
RESTART_TIMEOUT = 120.0
CONTAINER_RUNTIMES = ("containerd", "crio")
# from a pod with hostPID: systemctl in the node's own namespaces (the pod's mount namespace has no systemd)
NSENTER = ["nsenter", "--target", "1", "--mount", "--uts", "--ipc", "--net", "--pid", "--"]

Say = Callable[[str], None]


class NodeInstallError(PykataError):
    """A step of installing or uninstalling failed; the message names the path, field or command."""


@dataclass
class Node:
    """Where things go on the node. All paths but `root` are the node's own (absolute)."""

    root: Path = Path("/")
    prefix: Path = Path("/opt/pykata")
    containerd_config: Path = Path("/etc/containerd/config.toml")
    bin_dir: Path = Path("/usr/local/bin")
    container_runtime: str = "containerd"
    crio_dropin: Path = Path("/etc/crio/crio.conf.d/50-pykata.conf")
    restart_command: list[str] | None = None  # None: systemctl restart <runtime> (through nsenter if root != /)
    restart: bool = True
    label: bool = True
    node_name: str | None = field(default_factory=lambda: os.environ.get("NODE_NAME"))

    def __post_init__(self) -> None:
        if self.container_runtime not in CONTAINER_RUNTIMES:
            raise NodeInstallError(f"--container-runtime: {self.container_runtime!r} is not one of "
                                   f"{', '.join(CONTAINER_RUNTIMES)}")
        for what, p in (("--prefix", self.prefix), ("--containerd-config", self.containerd_config),
                        ("--bin-dir", self.bin_dir), ("--crio-dropin", self.crio_dropin)):
            if not p.is_absolute() or ".." in p.parts:
                raise NodeInstallError(f"{what}: {p} must be an absolute node path without '..'")
        if self.prefix == Path("/") or len(self.prefix.parts) < 2:
            raise NodeInstallError(f"--prefix: {self.prefix} is not a directory pykata can own")
        if not self.root.is_dir():
            raise NodeInstallError(f"--root: {self.root} is not a directory (mount the node's / there)")

    def host(self, node_path: Path) -> Path:
        """Where the node's `node_path` is, seen from here: its symlinks resolved as the node resolves them
        (an absolute link target is the node's path, not ours). Raises NodeInstallError on a link loop."""
        return self.root / node_realpath(self.root, node_path).relative_to("/")

    def runtime_config(self) -> Path:
        """The file pykata changes for the container runtime (containerd's config or CRI-O's drop-in), seen
        from here."""
        return self.host(self.crio_dropin if self.container_runtime == "crio" else self.containerd_config)

    def restart_argv(self) -> list[str]:
        if self.restart_command is not None:
            return self.restart_command
        systemctl = ["systemctl", "restart", self.container_runtime]
        return systemctl if self.root == Path("/") else [*NSENTER, *systemctl]


def node_realpath(root: Path, path: Path, _depth: int = 0) -> Path:
    """`path` (a node path) with the symlinks under `root` resolved inside `root`, as a chroot would."""
    if _depth > 40:
        raise NodeInstallError(f"{path}: too many levels of symbolic links under {root}")
    current = Path("/")
    for part in path.relative_to("/").parts:
        here = root / current.relative_to("/") / part
        if here.is_symlink():
            target = Path(os.readlink(here))
            joined = Path(os.path.normpath(target if target.is_absolute() else current / target))
            current = node_realpath(root, joined, _depth + 1)
        else:
            current = Path(os.path.normpath(current / part))
    return current


def default_payload() -> Path:
    """The payload this installer runs from (its venv's parent), else $PYKATA_PAYLOAD. Raises NodeInstallError."""
    if os.environ.get("PYKATA_PAYLOAD"):
        return Path(os.environ["PYKATA_PAYLOAD"])
    here = Path(sys.prefix).parent
    if (here / payload.MANIFEST).exists():
        return here
    raise NodeInstallError("no payload: pass --payload DIR (scripts/build-deploy-image.sh builds one) or run the "
                           "installer from a payload's venv")


def _check_node(node: Node, src: payload.Payload, config_text: str, config_source: str) -> None:
    """The node has what the payload runs on and the configuration names, before anything is changed."""
    try:
        config = parse_toml(payload.configure(config_text, node.prefix), config_source)
    except ConfigError as e:
        raise NodeInstallError(f"{config_source}: {e}") from None
    python = node.host(Path(src.python))
    if not python.exists():
        raise NodeInstallError(f"the node has no {src.python} (looked at {python}): the payload's venv runs on the "
                               "node's Debian 12 python3.11 (apt install python3.11)")
    qemu = node.host(Path(config.qemu.path))
    if not qemu.exists():
        raise NodeInstallError(f"hypervisor.qemu.path: the node has no {config.qemu.path} (looked at {qemu}; "
                               "apt install qemu-system-x86, or set it with --configuration)")
    cfg = node.runtime_config()
    if not cfg.parent.is_dir():
        option = "--crio-dropin" if node.container_runtime == "crio" else "--containerd-config"
        raise NodeInstallError(f"{option}: {cfg.parent} does not exist (is {node.container_runtime} installed, and "
                               "the node's / mounted at --root?)")


def _link(node: Node) -> str:
    link = node.host(node.bin_dir) / SHIM_NAME
    target = node.prefix / payload.SHIM
    if link.is_symlink():
        if Path(os.readlink(link)) == target:
            return f"{link} -> {target} (already)"
        link.unlink()
    elif link.exists():
        raise NodeInstallError(f"{link} exists and is not a link: remove it or pass another --bin-dir")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return f"{link} -> {target}"


def _unlink(node: Node) -> str:
    link = node.host(node.bin_dir) / SHIM_NAME
    if not link.is_symlink():
        return f"{link}: no link; nothing to remove"
    target = Path(os.readlink(link))
    if target != node.prefix / payload.SHIM:
        return f"{link} -> {target}: not pykata's payload at {node.prefix}; left as it is"
    link.unlink()
    return f"{link}: removed"


def _pending(node: Node) -> Path:
    """Exists while the runtime has not been restarted since its configuration changed (a rerun restarts it)."""
    cfg = node.runtime_config()
    return cfg.with_name(f".{cfg.name}.pykata-restart-pending")


def _restart(node: Node, say: Say) -> None:
    if not node.restart:
        _pending(node).unlink(missing_ok=True)
        say(f"{node.container_runtime} not restarted (--no-restart): restart it to load the configuration")
        return
    argv = node.restart_argv()
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=RESTART_TIMEOUT, check=False,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NodeInstallError(f"--restart-command {shlex.join(argv)}: {e}") from None
    if p.returncode != 0:
        raise NodeInstallError(f"--restart-command {shlex.join(argv)} exited {p.returncode}: "
                               f"{(p.stderr or p.stdout).strip()[-500:]}")
    _pending(node).unlink(missing_ok=True)
    say(f"{node.container_runtime} restarted ({shlex.join(argv)})")


def install(node: Node, src_dir: Path, base_config: Path | None = None, say: Say = print) -> None:
    """Install the payload at `src_dir` on `node`. Raises NodeInstallError."""
    try:
        src = payload.load(src_dir)
        if base_config is not None:
            try:
                config_text = base_config.read_text()
            except OSError as e:
                raise NodeInstallError(f"--configuration: {base_config}: {e.strerror}") from None
        else:
            config_text = (src.root / payload.CONFIG_TEMPLATE).read_text()
        _check_node(node, src, config_text, f"--configuration {base_config}" if base_config else "the packaged "
                    "configuration")
        target = node.host(node.prefix)
        copied = payload.copy(src, target)
        say(f"payload {src.key} -> {target}" + ("" if copied else " (already there)"))
        changed = payload.write_node_files(target, node.prefix, config_text)
        say(f"{target}: wrote {', '.join(changed)}" if changed else f"{target}: scripts and configuration up to date")
        say(_link(node))
        cfg, config_path = node.runtime_config(), node.prefix / payload.CONFIG
        if node.container_runtime == "crio":
            text = crio_config.snippet(node.prefix / payload.SHIM, config_path)
            if crio_config.differs(cfg, text):
                _pending(node).touch()
            say(f"{cfg}: " + ("wrote the pykata runtime handler" if crio_config.write(cfg, text) else "already there"))
        else:
            if containerd_config.plan_merge(cfg, str(config_path)).text is not None:
                _pending(node).touch()
            say(containerd_config.merge(cfg, str(config_path)).message)
        if _pending(node).exists():
            _restart(node, say)
        if node.label:
            say(labels.set_label(node.node_name, True))
    except (payload.PayloadError, containerd_config.ContainerdConfigError, crio_config.CrioConfigError,
            labels.LabelError) as e:
        raise NodeInstallError(str(e)) from None
    except OSError as e:
        raise NodeInstallError(f"{e.filename or ''}: {e.strerror or e}") from None


def uninstall(node: Node, say: Say = print) -> None:
    """Take pykata off `node`: label, runtime handler, link, payload. Raises NodeInstallError.

    A label that cannot be removed (the RBAC deleted first, the API unreachable) does not keep the node's
    runtime configured: the other steps run, then the label's error is raised."""
    label_error: labels.LabelError | None = None
    try:
        if node.label:
            try:
                say(labels.set_label(node.node_name, False))
            except labels.LabelError as e:
                label_error = e
        cfg = node.runtime_config()
        if node.container_runtime == "crio":
            if cfg.exists():
                _pending(node).touch()
            say(f"{cfg}: " + ("removed" if crio_config.remove(cfg) else "not there; nothing to remove"))
        else:
            if containerd_config.plan_remove(cfg)[0].text is not None:
                _pending(node).touch()
            say(containerd_config.remove(cfg).message)
        if _pending(node).exists():
            _restart(node, say)
        say(_unlink(node))
        target = node.host(node.prefix)
        say(f"{target}: removed" if payload.remove(target) else f"{target}: no payload; nothing to remove")
        if label_error is not None:
            raise label_error
    except (payload.PayloadError, containerd_config.ContainerdConfigError, crio_config.CrioConfigError,
            labels.LabelError) as e:
        raise NodeInstallError(str(e)) from None
    except OSError as e:
        raise NodeInstallError(f"{e.filename or ''}: {e.strerror or e}") from None
