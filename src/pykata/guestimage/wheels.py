"""Wheels for the guest: the same protobuf versions the host pins.

The pins are read from pykata's own metadata (`Requires-Dist`, i.e. pyproject.toml's dependencies),
so host and guest can never disagree about the protobuf runtime. Wheels are cached under
`<cache_dir>/wheels`; a CPython 3.11 x86_64 build is preferred (the guest runs Debian's python3.11 and
glibc; protobuf's C extension names libstdc++ without using it, see assemble.drop_unused_needed), else the
universal one.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path, PurePosixPath

from pykata.errors import PykataError

Progress = Callable[[str], None]

_PIN = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([A-Za-z0-9_.+!-]+)\s*(;.*)?$")


class WheelError(PykataError):
    """A pinned wheel is missing, cannot be downloaded or is not pure Python; names the project."""

    def __init__(self, project: str, message: str) -> None:
        super().__init__(f"wheel {project}: {message}")
        self.project = project


@dataclass(frozen=True)
class Wheel:
    """A cached wheel file and its SHA256."""

    project: str
    version: str
    path: Path
    sha256: str


def normalize(name: str) -> str:
    """PEP 503 name normalization (`googleapis_common_protos` == `googleapis-common-protos`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def host_pins(projects: Sequence[str], pyproject: Path | None = None) -> dict[str, str]:
    """Return `{project: version}` for each project, from pykata's metadata or a pyproject.toml.

    Raises WheelError when a project is not pinned with `==`.
    """
    lines: list[str] = []
    if pyproject is not None:
        lines = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    else:
        try:
            lines = requires("pykata") or []
        except PackageNotFoundError:
            source_tree = Path(__file__).resolve().parents[3] / "pyproject.toml"
            if source_tree.is_file():
                lines = tomllib.loads(source_tree.read_text())["project"]["dependencies"]
    pins: dict[str, str] = {}
    for line in lines:
        m = _PIN.match(line)
        if m and not (m.group(3) and "extra" in m.group(3)):
            pins[normalize(m.group(1))] = m.group(2)
    out = {}
    for project in projects:
        version = pins.get(normalize(project))
        if version is None:
            raise WheelError(project, "not pinned with == in pykata's dependencies (pyproject.toml)")
        out[project] = version
    return out


def _wheel_name(project: str, version: str) -> str:
    # the name pykata caches the wheel under (pip's file may be pure or binary, see _download)
    return f"{project.replace('-', '_').lower()}-{version}-guest.whl"


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(pins: dict[str, str], cache_dir: Path, progress: Progress | None = None) -> list[Wheel]:
    """Make sure each pinned project's universal wheel is in `<cache_dir>/wheels`; return them.

    Raises WheelError when pip cannot download a pure-Python wheel for the pin.
    """
    wheels_dir = cache_dir / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    wheels = []
    for project, version in sorted(pins.items()):
        path = wheels_dir / _wheel_name(project, version)
        if not path.is_file():
            if progress:
                progress(f"downloading wheel {project}=={version}")
            _download(project, version, wheels_dir, path)
        wheels.append(Wheel(project, version, path, sha256_file(path)))
    return wheels


def _download(project: str, version: str, wheels_dir: Path, target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=wheels_dir, prefix=".download-") as tmp:
        # A CPython 3.11 x86_64 build when the project has one (protobuf's C implementation starts
        # ~15x faster than its pure-Python one under TCG, and start-up is most of a VM's boot),
        # else the universal wheel. The guest's glibc comes from Debian 12, so manylinux2014 fits.
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
               "--no-deps", "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
               "--abi", "cp311", "--abi", "abi3", "--abi", "none",
               "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64", "--platform", "any",
               "-d", tmp, f"{project}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        found = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(found) != 1:
            raise WheelError(project, f"pip download of {version} for the guest failed: "
                             f"{proc.stderr.strip()[-500:]}")
        got = found[0]
        os.chmod(got, 0o644)
        os.replace(got, target)


def unpack(wheel: Path, dest: Path) -> list[str]:
    """Unpack a wheel's importable files into `dest` (no .dist-info, RECORD or scripts).

    Returns the top-level names it installed. Raises WheelError for a member that would escape
    `dest`.
    """
    tops: set[str] = set()
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            member = PurePosixPath(info.filename)
            if info.is_dir() or member.parts[0].endswith((".dist-info", ".data")):
                continue
            if member.is_absolute() or ".." in member.parts:
                raise WheelError(wheel.name, f"member {info.filename!r} escapes the target directory")
            target = dest.joinpath(*member.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(info))
            target.chmod(0o644)
            tops.add(member.parts[0])
    return sorted(tops)
