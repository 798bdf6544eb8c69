"""Debian packages for the guest: resolve versions, download .debs, unpack them without a chroot.

Versions come from the host's apt lists (`apt-cache show`), which is slow (~1 s), so a resolution is
remembered under the cache keyed by a fingerprint of the apt lists: until `apt-get update` changes
them, the answer is read back in microseconds. Downloads are checked against the SHA256 that apt's
signed index gives, so a .deb in the cache is exactly the one the version names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pykata.errors import PykataError
from pykata.fsutil import atomic_copy, atomic_write

APT_LISTS = Path("/var/lib/apt/lists")
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"), Path("/etc/apt/preferences.d"))
APT_ARCHIVES = Path("/var/cache/apt/archives")

Progress = Callable[[str], None]


class PackageError(PykataError):
    """A Debian package could not be resolved, downloaded, verified or unpacked; names the package."""

    def __init__(self, package: str, message: str) -> None:
        super().__init__(f"package {package}: {message}")
        self.package = package


@dataclass(frozen=True)
class DebPackage:
    """One resolved binary package: what apt would download for `name`."""

    name: str
    version: str
    arch: str
    sha256: str
    size: int

    @property
    def filename(self) -> str:
        # apt's own naming in /var/cache/apt/archives: the epoch colon is escaped.
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


def parse_apt_show(text: str) -> dict[str, DebPackage]:
    """Parse `apt-cache show --no-all-versions` output (RFC 822 stanzas) into packages by name."""
    found: dict[str, DebPackage] = {}
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        name = fields.get("Package")
        if not name or name in found:
            continue
        try:
            found[name] = DebPackage(
                name=name, version=fields["Version"], arch=fields["Architecture"],
                sha256=fields["SHA256"], size=int(fields["Size"]),
            )
        except (KeyError, ValueError) as exc:
            raise PackageError(name, f"apt-cache show gave no usable {exc} field") from exc
    return found


def apt_fingerprint() -> str:
    """A hash of what decides apt's candidate versions: the package lists and sources' metadata."""
    h = hashlib.sha256()
    paths: list[Path] = []
    for p in (APT_LISTS, *APT_SOURCES):
        if p.is_dir():
            # In the lists only the indexes matter (not the lock file apt touches on every run).
            paths.extend(sorted(c for c in p.iterdir() if c.is_file() and (
                p != APT_LISTS or "_Packages" in c.name or c.name.endswith("Release"))))
        elif p.is_file():
            paths.append(p)
    for p in paths:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def resolve(names: Sequence[str], cache_dir: Path, progress: Progress | None = None, *,
            refresh: bool = False) -> list[DebPackage]:
    """Resolve each name to apt's candidate version, in the order given.

    With `refresh`, when apt does not know a package and we are root, the lists are refreshed
    once (`apt-get update`: a machine whose lists were cleaned still builds).
    Raises PackageError when apt still does not know a package.
    """
    memo = cache_dir / "debs" / "resolved.json"
    want = sorted(set(names))
    fingerprint = apt_fingerprint()
    try:
        saved = json.loads(memo.read_text())
        if saved["fingerprint"] == fingerprint and saved["names"] == want:
            by_name = {p["name"]: DebPackage(**p) for p in saved["packages"]}
            return [by_name[n] for n in names]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    by_name, stderr = _apt_show(want)
    if refresh and any(n not in by_name for n in want) and os.geteuid() == 0:
        if progress:
            progress("apt does not know every guest package: running apt-get update")
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=False)
        fingerprint = apt_fingerprint()
        by_name, stderr = _apt_show(want)
    for n in want:
        if n not in by_name:
            detail = stderr.strip().splitlines()[-1:] or ["not in the apt lists (apt-get update?)"]
            raise PackageError(n, detail[0])
    record = {"fingerprint": fingerprint, "names": want, "packages": [asdict(by_name[n]) for n in want]}
    with contextlib.suppress(OSError):  # only a shortcut: a read-only cache still resolves
        atomic_write(memo, json.dumps(record, indent=1).encode())
    return [by_name[n] for n in names]


def _apt_show(names: Sequence[str]) -> tuple[dict[str, DebPackage], str]:
    proc = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", *names], capture_output=True, text=True, check=False,
        env={**os.environ, "LC_ALL": "C"},
    )
    return parse_apt_show(proc.stdout), proc.stderr


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fetch(packages: Sequence[DebPackage], cache_dir: Path, progress: Progress | None = None) -> list[Path]:
    """Make sure each package's .deb is in `<cache_dir>/debs`, verified; return their paths.

    A .deb apt already has in /var/cache/apt/archives is copied instead of downloaded.
    Raises PackageError when a download fails or a file does not match apt's SHA256.
    """
    debs = cache_dir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    missing: list[DebPackage] = []
    for pkg in packages:
        target = debs / pkg.filename
        if target.exists():
            continue
        local = APT_ARCHIVES / pkg.filename
        if local.is_file() and sha256_file(local) == pkg.sha256:
            atomic_copy(local, target)
        else:
            missing.append(pkg)
    if missing:
        if progress:
            total = sum(p.size for p in missing) / 1e6
            progress(f"downloading {len(missing)} Debian packages ({total:.1f} MB): "
                     + " ".join(p.name for p in missing))
        with tempfile.TemporaryDirectory(dir=debs, prefix=".download-") as tmp:
            # Running as root, apt would try to drop to _apt, which cannot write into our cache.
            cmd = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
                   *(f"{p.name}={p.version}" for p in missing)]
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise PackageError(" ".join(p.name for p in missing),
                                   f"apt-get download failed: {proc.stderr.strip()[-500:]}")
            for pkg in missing:
                got = Path(tmp) / pkg.filename
                if not got.is_file():
                    raise PackageError(pkg.name, f"apt-get download produced no {pkg.filename}")
                os.chmod(got, 0o644)
                os.replace(got, debs / pkg.filename)
    paths = []
    for pkg in packages:
        path = debs / pkg.filename
        if sha256_file(path) != pkg.sha256:
            path.unlink()
            raise PackageError(pkg.name, f"{path} does not match apt's SHA256 {pkg.sha256}; removed it")
        paths.append(path)
    return paths




def extract(deb: Path, dest: Path) -> None:
    """Unpack a .deb's data into `dest` (no maintainer scripts run: nothing needs them here).

    Raises PackageError when dpkg-deb fails.
    """
    proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise PackageError(deb.name, f"dpkg-deb -x failed: {proc.stderr.strip()[-500:]}")
