"""`pykata install containerd`: register pykata's runtime with containerd.

Shows (and with --write applies) two things: the containerd configuration that names the runtime
`io.containerd.pykata.v2` for CRI (ctr needs none: containerd turns the runtime name into the
binary name `containerd-shim-pykata-v2` and looks it up on its PATH), and a link to the shim
executable in a directory on containerd's PATH.
"""

from __future__ import annotations

import os
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Any

import click

from pykata.deploy.containerd_config import RUNTIME_TYPE, RUNTIMES_TABLE, snippet
from pykata.deploy.crio_config import snippet as crio_snippet
from pykata.errors import PykataError
from pykata.fsutil import KEEP_MODE, atomic_write

SHIM_BINARY = "containerd-shim-pykata-v2"
DEFAULT_CONFIG = Path("/etc/containerd/config.toml")
DEFAULT_BIN_DIR = Path("/usr/local/bin")


class InstallError(PykataError):
    """The containerd configuration or the shim link cannot be written; the message names the file."""


def _read_config(path: Path) -> tuple[str, dict[str, Any]]:
    """The file's text and table; ("", {}) when it does not exist yet in a directory that does (a
    containerd that runs on its defaults). Raises InstallError naming --config and the path."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise InstallError(f"--config {path}: {path.parent} does not exist (a mistyped path? is containerd "
                               "installed?); a new configuration file is made only in an existing directory") from None
        return "", {}
    except OSError as e:
        raise InstallError(f"--config {path}: cannot read it: {e.strerror}") from None
    except UnicodeDecodeError:
        raise InstallError(f"--config {path}: not a text file") from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InstallError(f"--config {path}: not valid TOML ({e}); fix it first") from None


def _runtimes(data: dict[str, Any], version: int) -> dict[str, Any]:
    node: Any = data
    for part in RUNTIMES_TABLE[version]:
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def plan_config(path: Path) -> tuple[str | None, str]:
    """(new file text or None when nothing is to change, the snippet). Raises InstallError."""
    text, data = _read_config(path)
    version = data.get("version", 2 if not text else 1)
    if version not in RUNTIMES_TABLE:
        raise InstallError(f"--config {path}: version = {version!r}: pykata knows containerd configuration "
                           "versions 1, 2 and 3")
    block = snippet(version)
    runtimes = _runtimes(data, version)
    if any(isinstance(r, dict) and r.get("runtime_type") == RUNTIME_TYPE for r in runtimes.values()):
        return None, block
    if "pykata" in runtimes:
        raise InstallError(f"--config {path}: a runtime named pykata exists with another runtime_type; edit it by hand")
    new = text if text else "version = 2\n"
    if not new.endswith("\n"):
        new += "\n"
    new += "\n" + block
    try:
        tomllib.loads(new)
    except tomllib.TOMLDecodeError as e:  # appending must never leave containerd an unreadable file
        raise InstallError(f"--config {path}: adding the runtime would make it invalid ({e})") from None
    return new, block



def shim_executable() -> Path:
    """The shim script installed next to this Python (the venv's bin). Raises InstallError."""
    candidate = Path(sys.executable).parent / SHIM_BINARY
    if not candidate.exists():
        raise InstallError(f"{candidate} does not exist: install pykata (pip install -e .) first")
    return candidate


def link_shim(bin_dir: Path, target: Path) -> str:
    """Make bin_dir/containerd-shim-pykata-v2 point at `target`; says what it did. Raises InstallError
    naming --bin-dir."""
    link = bin_dir / SHIM_BINARY
    try:
        if link.is_symlink():
            if Path(os.readlink(link)) == target:
                return f"{link} -> {target} (already)"
            link.unlink()
        elif link.exists():
            raise InstallError(f"--bin-dir {bin_dir}: {link} exists and is not a link; remove it or pass --bin-dir")
        bin_dir.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)
    except OSError as e:
        raise InstallError(f"--bin-dir {bin_dir}: cannot link {link}: {e.strerror}") from None
    return f"{link} -> {target}"


@click.group()
def install() -> None:
    """Register pykata with a container manager."""


@install.command()
@click.option("--write", is_flag=True, help="Change the configuration and make the link (else only show them).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=DEFAULT_CONFIG,
              show_default=True, help="containerd's configuration file.")
@click.option("--bin-dir", type=click.Path(path_type=Path), default=DEFAULT_BIN_DIR, show_default=True,
              help="A directory on containerd's PATH for the shim link.")
def containerd(write: bool, config_path: Path, bin_dir: Path) -> None:
    """Register the runtime io.containerd.pykata.v2 with containerd."""
    try:
        new_text, block = plan_config(config_path)
        target = shim_executable()
        if not write:
            click.echo(f"# add to {config_path} (for CRI; `ctr --runtime {RUNTIME_TYPE}` needs only the link):")
            click.echo(block if new_text is not None else f"# already present:\n{block}")
            click.echo(f"# link: {bin_dir / SHIM_BINARY} -> {target}")
            click.echo("# run again with --write to apply, then restart containerd")
            return
        if new_text is not None:
            try:
                atomic_write(config_path, new_text, mode=KEEP_MODE, make_parents=False)
            except OSError as e:
                raise InstallError(f"--config {config_path}: cannot write it: {e.strerror}") from None
            click.echo(f"added the pykata runtime to {config_path}")
        else:
            click.echo(f"{config_path} already registers {RUNTIME_TYPE}")
        click.echo(link_shim(bin_dir, target))
        click.echo("restart containerd to load the configuration (systemctl restart containerd)")
    except (InstallError, OSError) as e:
        click.echo(f"pykata: {e}", err=True)
        sys.exit(1)


DEFAULT_CRIO_DROPIN = Path("/etc/crio/crio.conf.d/50-pykata.conf")


@install.command()
@click.option("--write", is_flag=True, help="Write the drop-in file (else only show it).")
@click.option("--dropin", type=click.Path(path_type=Path, dir_okay=False), default=DEFAULT_CRIO_DROPIN,
              show_default=True, help="CRI-O drop-in configuration file to write.")
def crio(write: bool, dropin: Path) -> None:
    """Register pykata with CRI-O as the runtime handler `pykata` (runtime_type "vm")."""
    try:
        text = crio_snippet(shim_executable())
        if not write:
            click.echo(f"# {dropin} (then restart CRI-O):")
            click.echo(text, nl=False)
            return
        try:
            atomic_write(dropin, text, mode=KEEP_MODE)  # crio.conf.d may not exist yet
        except OSError as e:
            raise InstallError(f"--dropin {dropin}: cannot write it: {e.strerror}") from None
        click.echo(f"wrote {dropin}; restart CRI-O to load it (systemctl restart crio)")
    except (InstallError, OSError) as e:
        click.echo(f"pykata: {e}", err=True)
        sys.exit(1)


@install.command()
@click.option("--uninstall", is_flag=True, help="Take pykata off the node again (label, handler, link, payload).")
@click.option("--root", type=click.Path(path_type=Path), default=Path("/"), show_default=True,
              help="Where the node's / is mounted (the DaemonSet mounts it at /host).")
@click.option("--prefix", type=click.Path(path_type=Path), default=Path("/opt/pykata"), show_default=True,
              help="Node path for the payload.")
@click.option("--payload", "payload_dir", type=click.Path(path_type=Path), default=None,
              help="The payload to install (default: the one this pykata runs from, or $PYKATA_PAYLOAD).")
@click.option("--configuration", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="pykata configuration to install (default: the packaged one); empty kernel/initrd keys "
                   "are pointed at the payload's.")
@click.option("--containerd-config", type=click.Path(path_type=Path), default=Path("/etc/containerd/config.toml"),
              show_default=True, help="Node path of containerd's configuration.")
@click.option("--bin-dir", type=click.Path(path_type=Path), default=Path("/usr/local/bin"), show_default=True,
              help="Node directory on containerd's PATH for the shim link.")
@click.option("--container-runtime", type=click.Choice(["containerd", "crio"]), default="containerd",
              show_default=True, help="The node's CRI runtime: containerd's config gets the handler, or CRI-O "
                                      "a drop-in file.")
@click.option("--crio-dropin", type=click.Path(path_type=Path), default=DEFAULT_CRIO_DROPIN, show_default=True,
              help="Node path of CRI-O's drop-in for pykata (--container-runtime crio).")
@click.option("--restart-command", default=None,
              help="Command that restarts the runtime (default: systemctl restart containerd|crio, through "
                   "nsenter into the node's namespaces when --root is not /).")
@click.option("--no-restart", is_flag=True, help="Do not restart containerd.")
@click.option("--no-label", is_flag=True, help="Do not label the node.")
@click.option("--node-name", envvar="NODE_NAME", default=None,
              help="The node to label (default: $NODE_NAME, from the downward API).")
def node(uninstall: bool, root: Path, prefix: Path, payload_dir: Path | None, configuration: Path | None,
         containerd_config: Path, bin_dir: Path, container_runtime: str, crio_dropin: Path,
         restart_command: str | None, no_restart: bool, no_label: bool, node_name: str | None) -> None:
    """Install pykata on this Kubernetes node (kata-deploy's job): payload, shim link, the runtime handler
    `pykata` (containerd's config or a CRI-O drop-in), runtime restart, node label
    katacontainers.io/pykata-runtime=true."""
    from pykata.deploy.node import Node, NodeInstallError, default_payload
    from pykata.deploy.node import install as install_node
    from pykata.deploy.node import uninstall as uninstall_node

    try:
        target = Node(root=root, prefix=prefix, containerd_config=containerd_config, bin_dir=bin_dir,
                      container_runtime=container_runtime, crio_dropin=crio_dropin,
                      restart_command=shlex.split(restart_command) if restart_command else None,
                      restart=not no_restart, label=not no_label, node_name=node_name)
        if uninstall:
            uninstall_node(target, say=click.echo)
        else:
            install_node(target, payload_dir or default_payload(), configuration, say=click.echo)
    except NodeInstallError as e:
        click.echo(f"pykata: {e}", err=True)
        sys.exit(1)


@install.command()
@click.option("--accelerator", type=click.Choice(["auto", "kvm", "tcg"]), default="auto", show_default=True,
              help="The accelerator the node's VMs run with (auto: this host's, as pykata decides it).")
@click.option("--handler", default="pykata", show_default=True, help="containerd's runtime handler name.")
def runtimeclass(accelerator: str, handler: str) -> None:
    """Print the Kubernetes RuntimeClass for pykata with overhead.podFixed from the configuration and
    the measured per-pod overhead (pykata.resources.sizing.pod_fixed_overhead)."""
    import asyncio

    from pykata.config import load_config
    from pykata.hypervisor.accel import resolve_accelerator
    from pykata.hypervisor.qemu.assets import resolve_assets
    from pykata.resources import sizing

    try:
        config = load_config()
        if accelerator == "auto":
            kernel, _, _ = resolve_assets(config, None, None, None)
            accelerator = asyncio.run(resolve_accelerator(config.qemu, kernel, config.runtime.cache_path)).accel
        memory_mib, cpu_milli = sizing.pod_fixed_overhead(config, tcg=accelerator == "tcg")
    except PykataError as e:
        click.echo(f"pykata: {e}", err=True)
        sys.exit(1)
    click.echo(sizing.runtimeclass_yaml(handler, memory_mib, cpu_milli, accelerator), nl=False)
