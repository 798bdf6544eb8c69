"""pykata's node payload: what a node needs to run pod VMs, in one directory that can move.

Layout (kata-deploy's /opt/kata, for pykata):

    payload.json                     format, pykata version, content key, the interpreter the venv needs
    venv/                            a venv with pykata and its runtime dependencies (no pip, no editable
                                     install); its `python` links to the node's Debian python3.11
    share/pykata/vmlinux             the guest kernel (`pykata image build`), without its symbol table
    share/pykata/rootfs.cpio         the guest root filesystem (initrd)
    etc/configuration.toml.in        the packaged default configuration

A venv moves as long as nothing in it names its own path: pykata is installed from a wheel and the
venv's console scripts (which do name it) are not used. Installing on a node writes, with the node's
prefix: bin/containerd-shim-pykata-v2 and bin/pykata (scripts whose first line names the venv's
python), and etc/configuration.toml (the packaged default or the admin's, with kernel and initrd
pointed at share/pykata when they are empty).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pykata
from pykata.errors import PykataError
from pykata.fsutil import atomic_write

FORMAT = 1
MANIFEST = "payload.json"
KERNEL = Path("share/pykata/vmlinux")
INITRD = Path("share/pykata/rootfs.cpio")
CONFIG_TEMPLATE = Path("etc/configuration.toml.in")
CONFIG = Path("etc/configuration.toml")
SHIM = Path("bin/containerd-shim-pykata-v2")
CLI = Path("bin/pykata")
PYTHON = "/usr/bin/python3.11"  # Debian 12's: the venv links to it, so the node must have it
ENTRY_POINTS = {SHIM: "pykata.shim.main", CLI: "pykata.cli.main"}


class PayloadError(PykataError):
    """The payload cannot be built, read or installed; the message names the path."""


@dataclass(frozen=True)
class Payload:
    """A payload directory and its manifest."""

    root: Path
    manifest: dict[str, Any]

    @property
    def key(self) -> str:
        return str(self.manifest["key"])

    @property
    def python(self) -> str:
        return str(self.manifest["python"])


def load(root: Path) -> Payload:
    """The payload in `root`. Raises PayloadError when it is missing or incomplete."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        raise PayloadError(f"{root / MANIFEST}: no payload here (scripts/build-deploy-image.sh builds one)") from None
    except (OSError, ValueError) as e:
        raise PayloadError(f"{root / MANIFEST}: unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("key"), str):
        raise PayloadError(f"{root / MANIFEST}: format {manifest.get('format') if isinstance(manifest, dict) else '?'}"
                           f" is not payload format {FORMAT}")
    for part in (KERNEL, INITRD, CONFIG_TEMPLATE, Path("venv/bin/python")):
        if not (root / part).exists() and not (root / part).is_symlink():
            raise PayloadError(f"{root / part}: missing from the payload")
    return Payload(root, manifest)


def find_installed(root: Path) -> Payload | None:
    """The payload installed at `root`, None when there is none or it is incomplete (never raises)."""
    try:
        return load(root)
    except PayloadError:
        return None


def source_root() -> Path:
    """The checkout pykata runs from (where pyproject.toml is). Raises PayloadError."""
    root = Path(pykata.__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise PayloadError(f"{root}: not a pykata checkout (no pyproject.toml): build the payload from one")
    return root


def _hash_tree(h: Any, base: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            p = Path(dirpath) / name
            h.update(str(p.relative_to(base)).encode() + b"\0" + p.read_bytes())


def input_key(source: Path, kernel: Path, initrd: Path) -> str:
    """A hash of everything a payload is made of: pykata's sources, its pins, the kernel and initrd."""
    h = hashlib.sha256(f"payload {FORMAT} {sys.version_info[:2]}\n".encode())
    h.update((source / "pyproject.toml").read_bytes())
    _hash_tree(h, source / "src" / "pykata")
    for f in (kernel, initrd):
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def build(out: Path, kernel: Path, initrd: Path, *, progress: Any = print) -> Payload:
    """Make (or find, when its inputs did not change) the payload in `out`. Raises PayloadError."""
    source = source_root()
    key = input_key(source, kernel, initrd)
    existing = find_installed(out)
    if existing is not None and existing.key == key:
        progress(f"payload {key} at {out} (cached)")
        return existing
    if not Path(PYTHON).exists():
        raise PayloadError(f"{PYTHON} does not exist: the payload's venv is made with Debian's python3.11")
    stage = out.with_name(out.name + ".build")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    progress(f"payload: venv with pykata {pykata.__version__} from {source}")
    _run([PYTHON, "-m", "venv", "--without-pip", str(stage / "venv")])
    # the pip of the Python running this, aimed at the new venv: no pip inside the payload
    _run([sys.executable, "-m", "pip", "--python", str(stage / "venv/bin/python"), "install", "-q",
          "--no-warn-script-location", str(source)])
    for entry in (stage / "venv/bin").iterdir():
        if entry.is_file() and not entry.is_symlink() and not entry.name.startswith("python"):
            entry.unlink()  # console scripts and activate scripts name the build path
    (stage / KERNEL).parent.mkdir(parents=True)
    shutil.copy2(kernel, stage / KERNEL)
    shutil.copy2(initrd, stage / INITRD)
    (stage / CONFIG_TEMPLATE).parent.mkdir(parents=True)
    (stage / CONFIG_TEMPLATE).write_text((source / "src/pykata/config/configuration.toml").read_text())
    manifest = {"format": FORMAT, "key": key, "version": pykata.__version__, "python": PYTHON}
    (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    stage.rename(out)
    progress(f"payload {key} at {out}")
    return load(out)


def _run(argv: list[str]) -> None:
    p = subprocess.run(argv, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise PayloadError(f"{' '.join(argv[:4])} ... failed ({p.returncode}): {p.stderr.strip()[-800:]}")


def configure(base: str, prefix: Path) -> str:
    """The node's configuration: `base` with empty kernel/initrd set to the payload's (node paths)."""
    text = base
    for key, rel in (("kernel", KERNEL), ("initrd", INITRD)):
        text = re.sub(rf'(?m)^{key} = ""\s*$', f'{key} = "{prefix / rel}"', text, count=1)
    return text


def entry_script(prefix: Path, module: str) -> str:
    return (f"#!{prefix / 'venv/bin/python'}\n"
            f"# written by `pykata install node`\n"
            f"import sys\nfrom {module} import main\nsys.exit(main())\n")


def write_node_files(target: Path, prefix: Path, base_config: str) -> list[str]:
    """Write bin/ and etc/configuration.toml into the installed payload at `target` (which the node
    sees as `prefix`); only files whose content differs are written. Returns what changed."""
    changed = []
    wanted = {CONFIG: (configure(base_config, prefix), 0o644)}
    wanted |= {rel: (entry_script(prefix, module), 0o755) for rel, module in ENTRY_POINTS.items()}
    for rel, (text, mode) in wanted.items():
        path = target / rel
        try:
            same = path.read_text() == text and (path.stat().st_mode & 0o7777) == mode
        except OSError:
            same = False
        if not same:
            atomic_write(path, text, mode=mode)
            changed.append(str(rel))
    return changed


def copy(src: Payload, target: Path) -> bool:
    """Put the payload `src` at `target`: False when the same payload is there already.

    The copy goes to `<target>.new` and replaces `target` by two renames, so a node never runs half a
    payload, and an install stopped halfway leaves only `.new`/`.old` directories the next run removes.
    Raises OSError."""
    installed = find_installed(target)
    new, old = target.with_name(target.name + ".new"), target.with_name(target.name + ".old")
    for leftover in (new, old):
        shutil.rmtree(leftover, ignore_errors=True)
    if installed is not None and installed.key == src.key:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src.root, new, symlinks=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return True


def remove(target: Path) -> bool:
    """Remove the payload at `target` (and leftovers of a stopped install). False when none was there.

    Refuses (PayloadError) a directory that holds no payload manifest: never remove what pykata did not put."""
    found = False
    for path in (target, target.with_name(target.name + ".new"), target.with_name(target.name + ".old")):
        if not path.exists():
            continue
        if not (path / MANIFEST).exists() and path == target:
            raise PayloadError(f"{target}: not a pykata payload (no {MANIFEST}); not removing it")
        shutil.rmtree(path)
        found = True
    return found
