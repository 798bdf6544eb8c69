"""`pykata collect`: one tarball with what a bug report needs (Kata's kata-collect-data.sh).

Parts: versions, `pykata check --json`, the effective configuration and the configuration file (secrets
redacted), the sandbox list, recent VM logs (QEMU, guest console with the agent's lines, virtiofsd / 9p
helper; the tail of each, a bounded number of sandboxes), the pykata part of containerd's configuration
(redacted), kernel and cgroup facts. Workload output (`pykata run`'s stdout/stderr logs) is never taken.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import click

from pykata import __version__
from pykata.config import Config, load_config
from pykata.config.load import find_config_path
from pykata.errors import PykataError
from pykata.sandbox import sandboxes_dir, status

LOG_TAIL_BYTES = 256 << 10       # of each log file
MAX_SANDBOXES_LOGGED = 16        # the most recently active ones
REDACTED = "<redacted>"
# A key whose value is a credential: containerd registry auth, OTLP headers, tokens, keys.
_SECRET_KEY = re.compile(r"(pass(word|wd)?|secret|token|auth|credential|private|api_?key|headers?)$|"
                         r"^(identitytoken|registrytoken)$", re.IGNORECASE)
_TOML_ASSIGN = re.compile(r"""^(\s*)("?)([A-Za-z0-9_.-]+)\2(\s*=\s*)(.*)$""")
_VERSION_COMMANDS = {
    "qemu": ["qemu-system-x86_64", "--version"], "containerd": ["containerd", "--version"],
    "crun": ["crun", "--version"], "runc": ["runc", "--version"],
    "virtiofsd": ["/usr/lib/qemu/virtiofsd", "--version"],
}


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key.rsplit(".", 1)[-1]))


def redact_toml(text: str) -> str:
    """TOML text with the value of every secret-looking key replaced (line-based: keeps comments and
    layout, so a reader sees the file as the admin wrote it)."""
    out = []
    for line in text.splitlines():
        m = _TOML_ASSIGN.match(line)
        if m and is_secret_key(m.group(3)):
            line = f'{m.group(1)}{m.group(2)}{m.group(3)}{m.group(2)}{m.group(4)}"{REDACTED}"'
        out.append(line)
    return "\n".join(out) + "\n"


def redact_mapping(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: REDACTED if is_secret_key(str(k)) and v not in ("", None, (), [], {}) else redact_mapping(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_mapping(v) for v in value]
    return value


def containerd_snippet(text: str) -> str:
    """The tables of a containerd config.toml that mention pykata, redacted."""
    out: list[str] = []
    keep = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            keep = "pykata" in stripped
        if keep:
            out.append(line)
    return redact_toml("\n".join(out)) if out else "# no pykata runtime in this containerd configuration\n"


def _run(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, timeout=10, text=True)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable: {e}"
    return (p.stdout or p.stderr).strip().splitlines()[0] if (p.stdout or p.stderr).strip() else f"exit {p.returncode}"


def versions() -> dict[str, str]:
    out = {"pykata": __version__, "python": sys.version.split()[0], "kernel": platform.release()}
    out.update({name: _run(argv) for name, argv in _VERSION_COMMANDS.items()})
    return out


def _read(path: str, limit: int = 64 << 10) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode(errors="replace")
    except OSError as e:
        return f"unavailable: {e}"


def host_facts(config: Config) -> dict[str, Any]:
    cgroup_root = config.runtime.cgroup_root
    return {
        "uname": " ".join(platform.uname()),
        "cmdline": _read("/proc/cmdline").strip(),
        "meminfo": _read("/proc/meminfo").splitlines()[:5],
        "cpus": os.cpu_count(),
        "devices": {d: os.path.exists(d) for d in ("/dev/kvm", "/dev/vhost-vsock", "/dev/vhost-net", "/dev/net/tun")},
        "cgroup_controllers": _read(f"{cgroup_root}/cgroup.controllers").strip(),
        "cgroup_mounts": [line for line in _read("/proc/self/mounts").splitlines() if "cgroup" in line],
    }


def _tail(path: Path, limit: int = LOG_TAIL_BYTES) -> bytes:
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - limit))
        return f.read(limit)


def recent_logs(config: Config) -> dict[str, bytes]:
    """Tails of each VM log (qemu, console, helpers) of the most recently active sandboxes."""
    root = sandboxes_dir(config)
    if not root.is_dir():
        return {}
    dirs = sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime, reverse=True)
    out = {}
    for d in dirs[:MAX_SANDBOXES_LOGGED]:
        vm = d / "vm"
        if not vm.is_dir():
            continue
        for f in sorted(vm.glob("*.log*")):
            with contextlib.suppress(OSError):
                if f.is_file() and not f.is_symlink():
                    out[f"logs/{d.name}/{f.name}"] = _tail(f)
    return out


def _check_json(config_file: Path | None) -> dict[str, Any]:
    from pykata.config import load_config_file
    from pykata.hypervisor.check import can_run, run_checks_sync

    def loader() -> Config:
        return load_config_file(config_file) if config_file else load_config()

    try:
        results = run_checks_sync(loader, use_cache=True)
    except PykataError as e:
        return {"error": str(e)}
    return {"ok": can_run(results), "checks": [r.to_json() for r in results]}


def build(config: Config, containerd_config: Path) -> dict[str, bytes]:
    """Every part of the bundle, by its name in the tarball."""
    parts: dict[str, bytes] = {}

    def add_json(name: str, value: Any) -> None:
        parts[name] = (json.dumps(value, indent=1, default=str) + "\n").encode()

    cfg_file = find_config_path()
    add_json("versions.json", versions())
    add_json("check.json", _check_json(cfg_file))
    add_json("config/effective.json", redact_mapping(dataclasses.asdict(config)))
    parts["config/configuration.toml"] = (
        redact_toml(cfg_file.read_text(errors="replace")) if cfg_file else "# the packaged default\n").encode()
    add_json("sandboxes.json", [i.to_json() for i in status.list_running(config)])
    try:
        parts["containerd/pykata.toml"] = containerd_snippet(containerd_config.read_text(errors="replace")).encode()
    except OSError as e:
        parts["containerd/pykata.toml"] = f"# {containerd_config}: {e}\n".encode()
    add_json("host.json", host_facts(config))
    parts.update(recent_logs(config))
    return parts


def write_tarball(parts: dict[str, bytes], output: Path) -> None:
    prefix = output.name.split(".")[0] or "pykata-collect"
    now = time.time()
    with tarfile.open(output, "w:gz") as tar:
        for name, data in parts.items():
            info = tarfile.TarInfo(f"{prefix}/{name}")
            info.size, info.mtime, info.mode = len(data), now, 0o600
            tar.addfile(info, io.BytesIO(data))


@click.command("collect")
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Tarball to write (default: ./pykata-collect-<time>.tar.gz).")
@click.option("--containerd-config", type=click.Path(path_type=Path, dir_okay=False),
              default=Path("/etc/containerd/config.toml"), show_default=True)
def collect(output: Path | None, containerd_config: Path) -> None:
    """Write one tarball with what a bug report needs: versions, check, configuration (secrets redacted),
    sandboxes, recent VM logs, containerd's pykata configuration, kernel and cgroup facts."""
    output = output or Path(f"pykata-collect-{time.strftime('%Y%m%d-%H%M%S')}.tar.gz")
    try:
        parts = build(load_config(), containerd_config)
    except (PykataError, OSError) as e:
        click.echo(f"pykata: collect: {e}", err=True)
        sys.exit(1)
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # logs may be sensitive
        os.close(fd)
        write_tarball(parts, output)
    except OSError as e:
        click.echo(f"pykata: collect: --output: cannot write {output}: {e.strerror or e}", err=True)
        sys.exit(1)
    click.echo(str(output))
