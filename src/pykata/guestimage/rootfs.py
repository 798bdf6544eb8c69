"""The guest root filesystem: Debian packages + pykata's agent, as an initrd and an ext4 image.

Built without a chroot (Kata's "osbuilder" done with `apt-get download` and `dpkg-deb -x`), cached
under `<cache_dir>/rootfs/<key>/` where the key hashes every input: the .debs' SHA256s, the wheels'
SHA256s, pykata's guest sources (agent, ttrpc, protocols, init, this builder) and the recipe. The
same inputs give the same key and byte-identical artifacts.

    artifact = build_rootfs(Path("/var/cache/pykata"), progress=print)
    artifact.initrd, artifact.image   # rootfs.cpio, rootfs.ext4

Boot forms: `initrd` is an uncompressed newc cpio (`-initrd`); `image` is a read-only ext4 file
system for virtio-blk (`root=/dev/vda ro rootfstype=ext4`). `preferred` says which boots faster.
The kernel has no erofs or squashfs, hence ext4.

Measured (QEMU 7.2 microvm, TCG, 1 vCPU, 512 MiB, on a busy 2-core host, 10 interleaved boots,
medians; QEMU start -> first Health.Check answered):
    initrd, uncompressed   4.35 s  (kernel -> /init 1.30 s, init 0.23 s, agent start 2.57 s)
    ext4 image             4.38 s  (kernel -> /init 1.13 s, init 0.17 s, agent start 3.09 s)
    initrd gzip / zstd     +0.7 s / +1.1 s over uncompressed (8 boots each)
The image saves unpacking 28 MB, but Python then reads ~700 small files through virtio-blk; the
initrd has them in RAM. As the agent grows the initrd gains, so it is the default.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import pykata
from pykata.errors import PykataError
from pykata.fsutil import atomic_write, file_lock
from pykata.guestimage import assemble, crunlib, debs, execstart, fsimage, pycbundle, wheels

Progress = Callable[[str], None]
BootForm = Literal["initrd", "image"]

# Bump when the recipe's meaning changes in a way the hashed sources do not show.
RECIPE_VERSION = 1
# mtime of every file when SOURCE_DATE_EPOCH is not set (2024-01-01T00:00:00Z).
DEFAULT_EPOCH = 1704067200
MANIFEST = "manifest.json"
# Builds kept in the cache (the current one included); older ones are removed after a build. Several
# checkouts building different agents share the cache, so keep enough that they do not evict each other.
KEEP_BUILDS = 16
# ...and never one younger than this: a checkout whose agent has not changed still uses its build.
KEEP_BUILDS_YOUNGER_THAN = 12 * 3600.0
# ...up to these bounds, past which the oldest go however young (never the current build or one in use:
# builds_in_use). The age rule alone let a machine shared by several checkouts keep 108 builds, 6.5 GB.
MAX_BUILDS = 32
MAX_BUILDS_BYTES = 3 << 30
IMAGE_FSTYPE = "ext4"

GUEST_PACKAGES = (
    "busybox-static",
    # Debian's Python: interpreter, core and full standard library, and what they link.
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
    "libc6", "libgcc-s1", "zlib1g", "libexpat1", "libffi8", "liblzma5",
    # protobuf's C extension names libstdc++ but uses none of it (assemble.drop_unused_needed drops the
    # entry, prune_libraries then the library); kept in the recipe for a wheel that really is C++
    "libstdc++6",
    # crun and its libraries (libsystemd0 pulls in the compression and crypto ones).
    "crun", "libcap2", "libseccomp2", "libyajl2", "libsystemd0", "libzstd1", "liblz4-1",
    "libgcrypt20", "libgpg-error0",
    # tini-static: `pykata run --init`'s PID 1 (docker's --init), bound read-only into the container
    "tini",
)
GUEST_WHEELS = ("protobuf", "googleapis-common-protos")
_BUILDER_MODULES = ("assemble.py", "cpio.py", "crunlib.py", "debs.py", "elf.py", "execstart.py", "execstart.c",
                    "fsimage.py", "rootfs.py", "wheels.py", "init", "pycbundle.py")


class RootfsError(PykataError):
    """The root filesystem could not be built or a cached one is unusable."""


@dataclass(frozen=True)
class Recipe:
    """What goes into the image and in which forms it is written."""

    packages: tuple[str, ...] = GUEST_PACKAGES
    wheels: tuple[str, ...] = GUEST_WHEELS
    initrd_compression: fsimage.Compression = "none"
    ext4_image: bool = True
    preferred: BootForm = "initrd"


DEFAULT_RECIPE = Recipe()


@dataclass(frozen=True)
class RootfsInputs:
    """Everything the build reads; `key()` hashes it."""

    recipe: Recipe
    packages: tuple[debs.DebPackage, ...]
    wheel_hashes: tuple[tuple[str, str], ...]  # (file name, sha256)
    sources: str  # sha256 over pykata's guest sources and this builder
    version: str  # pykata's version, shown in the guest by importlib.metadata
    epoch: int
    recipe_version: int = RECIPE_VERSION
    # the host's ldconfig that writes /etc/ld.so.cache (assemble.ld_cache_tool): the file records its
    # glibc's version string, so another ldconfig is another image
    ld_cache_tool: str = ""
    # the host's C compiler that builds crun's libsystemd stand-in (crunlib.tool)
    crun_lib_tool: str = ""
    # the compiler and the static libc (libc6-dev's libc.a) of the agent's exec starter (execstart.tool)
    exec_start_tool: str = ""

    def key(self) -> str:
        return rootfs_key(self)

    def describe(self) -> dict[str, Any]:
        return {
            "recipe_version": self.recipe_version,
            "recipe": asdict(self.recipe),
            "packages": [{"name": p.name, "version": p.version, "sha256": p.sha256} for p in self.packages],
            "wheels": [{"file": f, "sha256": h} for f, h in self.wheel_hashes],
            "sources": self.sources,
            "version": self.version,
            "epoch": self.epoch,
            "ld_cache_tool": self.ld_cache_tool,
            "crun_lib_tool": self.crun_lib_tool,
            "exec_start_tool": self.exec_start_tool,
        }


def rootfs_key(inputs: RootfsInputs) -> str:
    """A 20-hex-digit hash of the inputs (order-independent for packages and wheels)."""
    desc = inputs.describe()
    desc["packages"] = sorted(desc["packages"], key=lambda p: p["name"])
    desc["wheels"] = sorted(desc["wheels"], key=lambda w: w["file"])
    blob = json.dumps(desc, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


@dataclass(frozen=True)
class RootfsArtifact:
    """A built root filesystem in the cache."""

    key: str
    directory: Path
    initrd: Path
    image: Path | None
    preferred: BootForm
    manifest: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def kernel_params(self, form: BootForm | None = None) -> str:
        """Kernel command line words this boot form needs (the image must be the first virtio-blk
        disk, /dev/vda; the initrd needs none: the kernel runs its /init)."""
        if (form or self.preferred) == "image":
            return f"root=/dev/vda ro rootfstype={IMAGE_FSTYPE}"
        return ""


def source_dir() -> Path:
    """The directory of the `pykata` package whose guest parts go into the image."""
    return Path(pykata.__file__).resolve().parent


def sources_hash(source: Path) -> str:
    """SHA256 over pykata's guest files and the builder's own modules (path and content)."""
    h = hashlib.sha256()
    guest = source / "guestimage"
    items = [(rel, source / rel) for rel in assemble.guest_source_files(source)]
    items += [(f"guestimage/{m}", guest / m) for m in _BUILDER_MODULES]
    for rel, path in items:
        data = path.read_bytes()
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def source_epoch() -> int:
    """SOURCE_DATE_EPOCH if set (reproducible-builds convention), else a fixed date.

    Raises RootfsError when SOURCE_DATE_EPOCH is not a non-negative integer.
    """
    raw = os.environ.get("SOURCE_DATE_EPOCH")
    if raw is None:
        return DEFAULT_EPOCH
    if not raw.isdigit():
        raise RootfsError(f"SOURCE_DATE_EPOCH: must be a non-negative integer, got {raw!r}")
    return int(raw)


def resolve_inputs(cache_dir: Path, recipe: Recipe = DEFAULT_RECIPE, *, download: bool = True,
                   progress: Progress | None = None, source: Path | None = None) -> RootfsInputs:
    """Resolve package versions and wheel hashes (downloading wheels only if `download`).

    Raises debs.PackageError, wheels.WheelError (a wheel not cached and `download` false) or
    RootfsError.
    """
    source = source or source_dir()
    packages = tuple(debs.resolve(recipe.packages, cache_dir, progress, refresh=download))
    pins = wheels.host_pins(recipe.wheels)
    if download:
        got = wheels.fetch(pins, cache_dir, progress)
    else:
        got = []
        for project, version in sorted(pins.items()):
            path = cache_dir / "wheels" / wheels._wheel_name(project, version)
            if not path.is_file():
                raise wheels.WheelError(project, f"{path.name} is not in the cache")
            got.append(wheels.Wheel(project, version, path, wheels.sha256_file(path)))
    return RootfsInputs(
        recipe=recipe, packages=packages, wheel_hashes=tuple((w.path.name, w.sha256) for w in got),
        sources=sources_hash(source), version=str(pykata.__version__), epoch=source_epoch(),
        ld_cache_tool=assemble.ld_cache_tool(), crun_lib_tool=crunlib.tool(), exec_start_tool=execstart.tool(),
    )


def load_artifact(directory: Path) -> RootfsArtifact | None:
    """The artifact in `directory`, or None if it is incomplete or not one."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        initrd = directory / manifest["initrd"]["file"]
        image = directory / manifest["image"]["file"] if manifest.get("image") else None
        if not initrd.is_file() or (image is not None and not image.is_file()):
            return None
        return RootfsArtifact(key=manifest["key"], directory=directory, initrd=initrd, image=image,
                              preferred=manifest["preferred"], manifest=manifest)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_rootfs(cache_dir: Path) -> list[RootfsArtifact]:
    """Every complete root filesystem in the cache, newest first."""
    base = cache_dir / "rootfs"
    found = []
    if base.is_dir():
        for d in base.iterdir():
            if d.is_dir() and not d.name.startswith("."):
                art = load_artifact(d)
                if art is not None:
                    found.append(art)
    found.sort(key=lambda a: (a.directory / MANIFEST).stat().st_mtime, reverse=True)
    return found


def find_rootfs(cache_dir: Path, recipe: Recipe = DEFAULT_RECIPE) -> RootfsArtifact | None:
    """The cached root filesystem for the current inputs, without downloading anything.

    If the inputs cannot be resolved offline (no apt lists, a wheel not cached), the last build
    (`<cache_dir>/rootfs/current`) is returned instead; None if there is none.
    """
    try:
        key = resolve_inputs(cache_dir, recipe, download=False).key()
    except PykataError:
        try:
            key = (cache_dir / "rootfs" / "current").read_text().strip()
        except OSError:
            return None
    return load_artifact(cache_dir / "rootfs" / key) if key else None


def build_rootfs(cache_dir: Path, *, progress: Progress | None = None, force: bool = False,
                 recipe: Recipe = DEFAULT_RECIPE, source: Path | None = None,
                 referenced: Iterable[Path] = ()) -> RootfsArtifact:
    """Build (or find in the cache) the root filesystem for the current inputs; after a build, prune
    old ones (prune_rootfs), sparing those in use and those `referenced` paths lie in (templates).

    Raises RootfsError, debs.PackageError, wheels.WheelError, assemble.AssembleError or
    fsimage.ImageError, each naming the step and the thing that failed.
    """
    say = progress or (lambda _msg: None)
    inputs = resolve_inputs(cache_dir, recipe, download=True, progress=progress, source=source)
    key = inputs.key()
    final = cache_dir / "rootfs" / key
    with file_lock(cache_dir / "rootfs" / ".lock"):
        if not force and (art := load_artifact(final)) is not None:
            _write_current(cache_dir / "rootfs", key)
            return art
        # Leftovers of interrupted builds: we hold the lock, so nobody else is using them.
        for stale in (cache_dir / "rootfs").glob(".build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        art = _build(cache_dir, inputs, key, say, source or source_dir())
        _write_current(cache_dir / "rootfs", key)
        for old in prune_rootfs(cache_dir, keep=KEEP_BUILDS, current=key, min_age=KEEP_BUILDS_YOUNGER_THAN,
                                max_builds=MAX_BUILDS, max_bytes=MAX_BUILDS_BYTES,
                                in_use=builds_in_use(cache_dir, referenced)):
            say(f"removed old build {old}")
        return art


def prune_rootfs(cache_dir: Path, *, keep: int, current: str, min_age: float = 0.0,
                 max_builds: int | None = None, max_bytes: int | None = None,
                 in_use: Collection[str] = ()) -> list[str]:
    """Delete all but the `keep` newest builds, keeping any built less than `min_age` seconds ago, then,
    past `max_builds` builds or `max_bytes` bytes in all, the oldest of those too; never `current` nor a
    key in `in_use`. Returns the removed keys, oldest last.

    Every edit of the agent makes a new build of about 70 MB; a VM that already runs keeps its
    open files, so removing an old build does not disturb it.
    """
    arts = list_rootfs(cache_dir)  # newest first
    spared = {current, *in_use}
    others = [a for a in arts if a.key not in spared]
    now = time.time()
    doomed: list[RootfsArtifact] = []
    kept: list[RootfsArtifact] = []
    for i, art in enumerate(others):
        old = now - _built_at(art) >= min_age
        (doomed if i >= max(keep - 1, 0) and old else kept).append(art)
    sizes = {a.key: _tree_bytes(a.directory) for a in arts}
    count = len(arts) - len(doomed)
    total = sum(sizes.values()) - sum(sizes[a.key] for a in doomed)
    while kept and ((max_builds is not None and count > max_builds) or (max_bytes is not None and total > max_bytes)):
        art = kept.pop()  # the oldest left
        doomed.append(art)
        count -= 1
        total -= sizes[art.key]
    removed = []
    for art in doomed:
        trash = art.directory.with_name(f".build-old-{art.key}")
        try:
            os.rename(art.directory, trash)
        except OSError:
            continue
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(art.key)
    return removed


def builds_in_use(cache_dir: Path, referenced: Iterable[Path] = ()) -> set[str]:
    """Keys of the cache's builds a process holds open or names on its command line (a QEMU booting its
    initrd or image), or that `referenced` paths (templates' initrd/image) lie in. Reads /proc; a process
    it may not look at is skipped. Never raises."""
    base = (cache_dir / "rootfs").resolve()
    prefix = f"{base}/"
    used: set[str] = set()

    def note(path: str) -> None:
        if path.startswith(prefix):
            used.add(path[len(prefix):].split("/", 1)[0])

    for path in referenced:
        with contextlib.suppress(OSError):
            note(str(Path(path).resolve()))
    try:
        pids = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        pids = []
    for pid in pids:
        with contextlib.suppress(OSError):
            for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                for part in arg.decode(errors="replace").split(","):  # -drive file=...,readonly=on
                    note(part.partition("=")[2] if part.startswith(("file=", "path=")) else part)
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    note(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return used


def _built_at(art: RootfsArtifact) -> float:
    try:
        return (art.directory / MANIFEST).stat().st_mtime
    except OSError:
        return 0.0


def _tree_bytes(directory: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def _write_current(base: Path, key: str) -> None:
    # `current` lets find_rootfs answer on hosts that cannot resolve the inputs (no apt lists).
    atomic_write(base / "current", key + "\n")


def _build(cache_dir: Path, inputs: RootfsInputs, key: str, say: Progress, source: Path) -> RootfsArtifact:
    started = time.monotonic()
    recipe = inputs.recipe
    say(f"rootfs {key}: {len(inputs.packages)} packages, {len(inputs.wheel_hashes)} wheels")
    deb_paths = debs.fetch(inputs.packages, cache_dir, say)
    base = cache_dir / "rootfs"
    work = Path(tempfile.mkdtemp(dir=base, prefix=f".build-{key}-"))
    try:
        root = work / "root"
        root.mkdir()
        say(f"unpacking {len(deb_paths)} packages")
        for deb in deb_paths:
            debs.extract(deb, root)
        assemble.trim(root)
        links = assemble.busybox_links(root) if (root / "bin/busybox").is_file() else 0
        agent_lib = root / assemble.AGENT_LIB
        agent_lib.mkdir(parents=True, exist_ok=True)
        for name, _sha in inputs.wheel_hashes:
            wheels.unpack(cache_dir / "wheels" / name, agent_lib)
        assemble.drop_unused_wheel_parts(agent_lib)
        for stub in agent_lib.rglob("*.pyi"):
            stub.unlink()
        assemble.install_agent_packages(root, source, inputs.version)
        assemble.install_base(root, (source / "guestimage" / "init").read_bytes())
        for entry in assemble.drop_unused_needed(root):
            say(f"unused DT_NEEDED dropped: {entry}")
        if (why := crunlib.install(root)) is not None:
            say(f"crun loads the real libsystemd (no stand-in): {why}")
        else:
            crunlib.replace_real(root)
        if (no_starter := execstart.install(root)) is not None:
            say(f"WARNING: no exec starter in the image, {execstart.WHY_NONE}: {no_starter}")
        else:
            say(f"exec starter built: /{execstart.PATH}")
        removed = assemble.prune_libraries(root)
        say(f"trimmed: {links} busybox applets, {len(removed)} unused libraries dropped")
        if (why := assemble.write_ld_cache(root)) is not None:
            say(f"no /etc/ld.so.cache (every dynamic program then searches the library directories): {why}")
        if (root / "usr/bin" / assemble.PY).is_file():
            say("compiling Python bytecode")
            assemble.compile_python(root, sourceless=[assemble.STDLIB, *_wheel_tops(agent_lib)],
                                    with_source=[f"{assemble.AGENT_LIB}/pykata"])
            count = pycbundle.write_bundle(root, root / "usr/bin" / assemble.PY,
                                           [assemble.AGENT_LIB, assemble.STDLIB, f"{assemble.STDLIB}/lib-dynload"])
            say(f"boot bundle: {count} modules' bytecode in /{pycbundle.BUNDLE}")
        assemble.normalize(root, inputs.epoch)
        tree_bytes, tree_entries = assemble.tree_size(root)
        out = work / "out"
        out.mkdir()
        initrd_name = "rootfs.cpio" + fsimage.INITRD_SUFFIX[recipe.initrd_compression]
        say(f"writing {initrd_name} ({tree_entries} entries, {tree_bytes / 1e6:.1f} MB)")
        initrd_size = fsimage.write_initrd(root, out / initrd_name, epoch=inputs.epoch,
                                           compression=recipe.initrd_compression)
        manifest: dict[str, Any] = {
            "key": key,
            "inputs": inputs.describe(),
            "initrd": {"file": initrd_name, "size": initrd_size, "compression": recipe.initrd_compression},
            "image": None,
            "tree": {"bytes": tree_bytes, "entries": tree_entries},
            # read by `pykata check` (hypervisor.check.guest_assets)
            "exec_starter": {"built": no_starter is None, "why": no_starter or ""},
        }
        if recipe.ext4_image:
            if os.geteuid() != 0:
                say("skipping rootfs.ext4: mkfs.ext4 -d copies file owners, so it needs root")
            else:
                say("writing rootfs.ext4")
                size = fsimage.write_ext4(root, out / "rootfs.ext4", epoch=inputs.epoch, key=key)
                manifest["image"] = {"file": "rootfs.ext4", "size": size, "fstype": "ext4",
                                     "uuid": fsimage.image_uuid(key)}
        preferred = recipe.preferred if manifest["image"] else "initrd"
        manifest["preferred"] = preferred
        manifest["build_seconds"] = round(time.monotonic() - started, 1)
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        final = base / key
        if final.exists():  # forced, or an incomplete entry: move it aside, then swap in the new one
            old = work / "old"
            os.rename(final, old)
        os.rename(out, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    art = load_artifact(final)
    if art is None:
        raise RootfsError(f"{final}: build finished but the artifact is incomplete")
    say(f"rootfs ready in {manifest['build_seconds']} s: {final}")
    return art


def _wheel_tops(agent_lib: Path) -> list[str]:
    """The wheel-installed top-level directories under the agent's library (compiled sourceless)."""
    return sorted(f"{assemble.AGENT_LIB}/{p.name}" for p in agent_lib.iterdir()
                  if p.is_dir() and p.name != "pykata" and not p.name.endswith(".dist-info"))
