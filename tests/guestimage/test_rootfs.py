"""The guest root filesystem: cache keys, reproducible archives and images, and real boots."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykata.agent.boot import parse_bundle_index
from pykata.guestimage import assemble, cpio, crunlib, debs, elf, execstart, fsimage, pycbundle, wheels
from pykata.guestimage.rootfs import (
    DEFAULT_RECIPE,
    Recipe,
    RootfsArtifact,
    RootfsInputs,
    build_rootfs,
    find_rootfs,
    rootfs_key,
)

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = Path("/var/cache/pykata")
QEMU = "/usr/bin/qemu-system-x86_64"

# -- unit: cache key ------------------------------------------------------------------------------


def _inputs(**changes: object) -> RootfsInputs:
    base = RootfsInputs(
        recipe=DEFAULT_RECIPE,
        packages=(debs.DebPackage("libc6", "2.36-9", "amd64", "a" * 64, 100),
                  debs.DebPackage("crun", "1.8.1-1", "amd64", "b" * 64, 200)),
        wheel_hashes=(("protobuf-7.36.2-py3-none-any.whl", "c" * 64),),
        sources="d" * 64, version="0.1.0", epoch=1704067200,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_cache_key_is_stable_for_the_same_inputs() -> None:
    key = rootfs_key(_inputs())
    assert key == rootfs_key(_inputs())
    assert len(key) == 20 and int(key, 16) >= 0
    # Package order does not matter, only the set of packages.
    swapped = _inputs(packages=tuple(reversed(_inputs().packages)))
    assert rootfs_key(swapped) == key


@pytest.mark.parametrize("change", [
    {"packages": (debs.DebPackage("libc6", "2.36-9", "amd64", "e" * 64, 100),)},
    {"wheel_hashes": (("protobuf-7.36.2-py3-none-any.whl", "f" * 64),)},
    {"sources": "0" * 64},
    {"version": "0.2.0"},
    {"epoch": 1},
    {"recipe_version": 999},
    {"ld_cache_tool": "ldconfig sha256:" + "9" * 64},  # another host's ldconfig writes another ld.so.cache
    {"crun_lib_tool": "cc sha256:" + "8" * 64},  # another compiler builds another libsystemd stand-in
    {"exec_start_tool": "libc.a /usr/lib/x86_64-linux-gnu/libc.a size 1 mtime 2"},  # another static libc
    {"recipe": Recipe(initrd_compression="gzip")},
    {"recipe": Recipe(packages=("busybox-static",))},
])
def test_cache_key_changes_with_any_input(change: dict[str, object]) -> None:
    assert rootfs_key(_inputs(**change)) != rootfs_key(_inputs())


def test_sources_hash_follows_guest_code(tmp_path: Path) -> None:
    from pykata.guestimage.rootfs import source_dir, sources_hash

    copy = tmp_path / "pykata"
    shutil.copytree(source_dir(), copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = sources_hash(copy)
    assert before == sources_hash(source_dir())
    (copy / "agent" / "health.py").write_text((copy / "agent" / "health.py").read_text() + "\n# changed\n")
    after = sources_hash(copy)
    assert after != before
    # Host-only code does not go into the guest and does not change the key.
    (copy / "cli" / "image.py").write_text("# changed\n")
    assert sources_hash(copy) == after


def test_the_hash_follows_the_ldconfig_that_writes_the_loader_cache(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """/etc/ld.so.cache is written by the host's ldconfig and records its glibc's version string: that
    ldconfig is an input of the image (it was not: two hosts made different images under one key)."""
    fake = tmp_path / "bin" / "ldconfig"  # a fake ldconfig, never run: only its bytes are hashed
    fake.parent.mkdir()
    fake.write_bytes(b"ldconfig (GLIBC 2.36) 2.36")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ.get('PATH', '')}")
    monkeypatch.setattr(os, "geteuid", lambda: 0)  # as root: no unshare needed
    before = assemble.ld_cache_tool()
    assert before == "ldconfig sha256:" + hashlib.sha256(b"ldconfig (GLIBC 2.36) 2.36").hexdigest()
    fake.write_bytes(b"ldconfig (GLIBC 2.41.9) 2.41")
    after = assemble.ld_cache_tool()
    assert after != before
    assert rootfs_key(_inputs(ld_cache_tool=after)) != rootfs_key(_inputs(ld_cache_tool=before))
    fake.unlink()
    monkeypatch.setenv("PATH", str(fake.parent))
    monkeypatch.setattr(assemble, "LDCONFIG_PATHS", ())
    assert assemble.ld_cache_tool() == "none: no ldconfig on the host"


# -- unit: pieces ---------------------------------------------------------------------------------


def test_trim_drops_modules_that_cannot_import_in_the_guest(tmp_path: Path) -> None:
    """ssl without _ssl (not shipped) only costs asyncio's three failed tries of it at every agent start."""
    stdlib = tmp_path / assemble.STDLIB
    (stdlib / "lib-dynload").mkdir(parents=True)
    for name in ("ssl.py", "os.py", "asyncio/sslproto.py", "lib-dynload/_ssl.cpython-311-x86_64-linux-gnu.so",
                 "lib-dynload/_json.cpython-311-x86_64-linux-gnu.so"):
        (stdlib / name).parent.mkdir(parents=True, exist_ok=True)
        (stdlib / name).write_text("")
    assemble.trim(tmp_path)
    left = sorted(str(p.relative_to(stdlib)) for p in stdlib.rglob("*") if p.is_file())
    assert left == ["asyncio/sslproto.py", "lib-dynload/_json.cpython-311-x86_64-linux-gnu.so", "os.py"]


def test_parse_apt_show() -> None:
    text = (
        "Package: crun\nVersion: 1.8.1-1+deb12u1\nArchitecture: amd64\nSize: 289288\n"
        "Description: OCI runtime\n continued line: with colon\nSHA256: " + "ab" * 32 + "\n\n"
        "Package: zlib1g\nVersion: 1:1.2.13.dfsg-1\nArchitecture: amd64\nSize: 1\nSHA256: " + "cd" * 32 + "\n"
    )
    found = debs.parse_apt_show(text)
    assert found["crun"].version == "1.8.1-1+deb12u1"
    assert found["zlib1g"].filename == "zlib1g_1%3a1.2.13.dfsg-1_amd64.deb"


def test_parse_apt_show_names_a_broken_stanza() -> None:
    with pytest.raises(debs.PackageError, match="package crun"):
        debs.parse_apt_show("Package: crun\nVersion: 1\nArchitecture: amd64\n")


def test_wheel_pins_come_from_pyproject() -> None:
    pins = wheels.host_pins(["protobuf", "googleapis_common_protos"], ROOT / "pyproject.toml")
    text = (ROOT / "pyproject.toml").read_text()
    for project, version in pins.items():
        assert f'"{project.replace("_", "-")}=={version}"' in text
    with pytest.raises(wheels.WheelError, match="wheel not-a-dependency"):
        wheels.host_pins(["not-a-dependency"], ROOT / "pyproject.toml")


def test_elf_needed_of_a_real_binary() -> None:
    needed, interp = elf.dynamic_info(Path("/usr/bin/python3.11").read_bytes())
    assert "libc.so.6" in needed
    assert interp == "/lib64/ld-linux-x86-64.so.2"
    static_needed, static_interp = elf.dynamic_info(Path("/bin/busybox").read_bytes())
    assert (static_needed, static_interp) == ([], None)


def test_an_unused_needed_library_is_dropped_and_the_module_still_loads(tmp_path: Path) -> None:
    """protobuf's C extension names libstdc++ but uses none of its symbols: drop_unused_needed removes
    that DT_NEEDED entry (and only that), and the edited module imports and works without libstdc++
    being loaded. A program that calls into libstdc++ (apt) keeps it."""
    import google

    src = Path(next(iter(google.__path__)))
    root = tmp_path / "root"
    lib = root / "usr/lib/x86_64-linux-gnu"
    lib.mkdir(parents=True)
    shutil.copy("/usr/lib/x86_64-linux-gnu/libstdc++.so.6", lib / "libstdc++.so.6")
    shutil.copytree(src, root / "usr/lib/pykata/google", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "usr/bin").mkdir()
    shutil.copy("/usr/bin/apt", root / "usr/bin/apt")
    module = root / "usr/lib/pykata/google/_upb/_message.abi3.so"
    before, _ = elf.dynamic_info(module.read_bytes())
    assert "libstdc++.so.6" in before
    assert assemble.drop_unused_needed(root) == ["/usr/lib/pykata/google/_upb/_message.abi3.so: libstdc++.so.6"]
    after, _ = elf.dynamic_info(module.read_bytes())
    assert after == [n for n in before if n != "libstdc++.so.6"]
    assert "libstdc++.so.6" in elf.dynamic_info((root / "usr/bin/apt").read_bytes())[0]
    assert assemble.drop_unused_needed(root) == []  # nothing left to drop
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from google.protobuf.internal import api_implementation as a; "
            "from google.protobuf import descriptor_pb2; "
            "m = descriptor_pb2.FileDescriptorProto(name='x'); "
            "assert descriptor_pb2.FileDescriptorProto.FromString(m.SerializeToString()).name == 'x'; "
            "print(a.Type(), 'libstdc++' in open('/proc/self/maps').read())")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(root / "usr/lib/pykata")],
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["upb", "False"], out
    with pytest.raises(elf.ElfError, match="no DT_NEEDED entry for libstdc"):
        elf.remove_needed(module.read_bytes(), "libstdc++.so.6")


def test_missing_shared_library_is_reported(tmp_path: Path) -> None:
    (tmp_path / "usr/bin").mkdir(parents=True)
    shutil.copy("/usr/bin/crun", tmp_path / "usr/bin/crun")
    with pytest.raises(assemble.AssembleError, match=r"/usr/bin/crun: needs libyajl\.so\.2"):
        assemble.prune_libraries(tmp_path)


def _parse_newc(data: bytes) -> list[tuple[str, int, int, int, int]]:
    """(name, mode, uid, gid, mtime) of each member of a newc archive."""
    out, pos = [], 0
    while True:
        assert data[pos:pos + 6] == cpio.MAGIC
        f = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = data[pos + 110: pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        pos += filesize + (-filesize % 4)
        if name == cpio.TRAILER:
            return out
        out.append((name, f[1], f[2], f[3], f[5]))


def test_cpio_is_sorted_root_owned_and_independent_of_host_metadata(tmp_path: Path) -> None:
    for n, tree in enumerate(("a", "b")):
        root = tmp_path / tree
        (root / "usr/bin").mkdir(parents=True)
        (root / "usr/bin/tool").write_bytes(b"#!/bin/sh\n")
        (root / "usr/bin/tool").chmod(0o755)
        (root / "etc").mkdir()
        (root / "etc/hosts").write_text("127.0.0.1 localhost\n")
        (root / "bin").symlink_to("usr/bin")
        os.utime(root / "etc/hosts", (n * 1000, n * 1000))
    archives = []
    for tree in ("a", "b"):
        out = tmp_path / f"{tree}.cpio"
        fsimage.write_initrd(tmp_path / tree, out, epoch=42, compression="none")
        archives.append(out.read_bytes())
    assert archives[0] == archives[1]
    members = _parse_newc(archives[0])
    names = [m[0] for m in members]
    assert names == sorted(names)
    assert "dev/console" in names
    assert all(uid == 0 and gid == 0 and mtime == 42 for _n, _m, uid, gid, mtime in members)
    console = next(m for m in members if m[0] == "dev/console")
    assert stat.S_ISCHR(console[1])


def test_gzip_initrd_is_reproducible(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "root/file").write_text("x" * 1000)
    first = fsimage.write_initrd(tmp_path / "root", tmp_path / "1.gz", epoch=0, compression="gzip")
    time.sleep(1.1)  # gzip headers carry a time unless told otherwise
    fsimage.write_initrd(tmp_path / "root", tmp_path / "2.gz", epoch=0, compression="gzip")
    assert first > 0
    assert (tmp_path / "1.gz").read_bytes() == (tmp_path / "2.gz").read_bytes()


def test_bad_source_date_epoch_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from pykata.guestimage.rootfs import RootfsError, source_epoch

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(RootfsError, match="SOURCE_DATE_EPOCH"):
        source_epoch()


# -- reproducibility: real builds -----------------------------------------------------------------


@pytest.fixture(scope="session")
def deb_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache seeded with the .debs and wheels already downloaded (default cache), to save time."""
    cache = tmp_path_factory.mktemp("rootfs-cache")
    for sub in ("debs", "wheels"):
        if (DEFAULT_CACHE / sub).is_dir():
            shutil.copytree(DEFAULT_CACHE / sub, cache / sub)
    return cache


def _seeded(deb_cache: Path, target: Path) -> Path:
    for sub in ("debs", "wheels"):
        if (deb_cache / sub).is_dir():
            shutil.copytree(deb_cache / sub, target / sub, dirs_exist_ok=True)
    return target


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build_twice(deb_cache: Path, tmp_path: Path, recipe: Recipe) -> tuple[RootfsArtifact, RootfsArtifact]:
    # A snapshot of the sources: others may be editing the working tree while the test runs.
    from pykata.guestimage.rootfs import source_dir

    source = tmp_path / "src" / "pykata"
    shutil.copytree(source_dir(), source, ignore=shutil.ignore_patterns("__pycache__"))
    first = build_rootfs(_seeded(deb_cache, tmp_path / "one"), recipe=recipe, source=source)
    # Seed the shared cache with what the first build downloaded, for later tests.
    _seeded(tmp_path / "one", deb_cache)
    second = build_rootfs(_seeded(deb_cache, tmp_path / "two"), recipe=recipe, source=source)
    return first, second


@pytest.mark.slow
def test_reduced_rootfs_is_reproducible(deb_cache: Path, tmp_path: Path) -> None:
    recipe = Recipe(packages=("busybox-static",), wheels=())
    first, second = _build_twice(deb_cache, tmp_path, recipe)
    assert first.key == second.key
    assert _digest(first.initrd) == _digest(second.initrd)
    assert first.image is not None and second.image is not None
    assert _digest(first.image) == _digest(second.image)
    # A second call finds the cached build at once.
    started = time.monotonic()
    again = build_rootfs(tmp_path / "one", recipe=recipe, source=tmp_path / "src" / "pykata")
    assert again.directory == first.directory
    assert time.monotonic() - started < 1.0


@pytest.mark.slow
def test_full_rootfs_is_reproducible_and_complete(deb_cache: Path, tmp_path: Path) -> None:
    first, second = _build_twice(deb_cache, tmp_path, DEFAULT_RECIPE)
    assert first.key == second.key
    assert _digest(first.initrd) == _digest(second.initrd)
    assert first.image is not None and second.image is not None
    assert _digest(first.image) == _digest(second.image)
    names = {m[0] for m in _parse_newc(first.initrd.read_bytes())}
    for needed in ("init", "sbin/init", "bin/sh", "bin/busybox", "usr/bin/python3.11", "usr/bin/crun",
                   "usr/lib/python3.11/os.pyc", "usr/lib/python3.11/asyncio/__init__.pyc",
                   "usr/lib/pykata/pykata/agent/__main__.py", "usr/lib/pykata/google/protobuf/__init__.pyc",
                   "lib64/ld-linux-x86-64.so.2", "dev/console"):
        assert needed in names, needed
    for dropped in ("usr/share/doc", "usr/lib/python3.11/test", "usr/lib/python3.11/idlelib",
                    "usr/lib/python3.11/os.py", "usr/lib/python3.11/lib2to3", "usr/lib/python3.11/ensurepip",
                    "usr/lib/x86_64-linux-gnu/gconv",
                    # no _ssl, _lzma, _bz2 in the image: these could only fail to import (assemble.STDLIB_DROP)
                    "usr/lib/python3.11/ssl.pyc", "usr/lib/python3.11/lzma.pyc", "usr/lib/python3.11/bz2.pyc"):
        assert dropped not in names, dropped


def test_every_module_the_guest_code_imports_is_in_the_image(guest: RootfsArtifact, tmp_path: Path) -> None:
    """The image leaves out most of the standard library (assemble.STDLIB_DROP): in a chroot of the
    unpacked initrd, the image's own Python imports every module an import statement of pykata's guest
    sources names (at the top or inside a function, as the agent's start-up does with its deferrals),
    and the agent's late modules (pykata.agent.main.LATE_MODULES)."""
    import ast
    import json

    from pykata.agent.main import LATE_MODULES

    tree = tmp_path / "tree"
    tree.mkdir()
    with guest.initrd.open("rb") as f:
        subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], stdin=f, cwd=tree, check=True)
    names = set(LATE_MODULES)
    for py in (tree / "usr/lib/pykata/pykata").rglob("*.py"):
        for node in ast.walk(ast.parse(py.read_bytes())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
    # __main__ runs the agent; the host-only protocols are imported only by the host (pykata.protocols'
    # lazy attributes)
    names -= {"__future__", "pykata.agent.__main__", "pykata.protocols.containerd"}
    code = ("import sys, importlib, json; sys.path.insert(0, '/usr/lib/pykata'); "
            "from pykata.agent.boot import defer_imports; defer_imports(); missing = []\n"
            "for n in json.loads(sys.argv[1]):\n"
            "    try:\n        importlib.import_module(n)\n"
            "    except ImportError as e:\n        missing.append(f'{n}: {e}')\n"
            "print(json.dumps(missing))")
    chroot = ["chroot"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "chroot"]
    proc = subprocess.run([*chroot, str(tree), "/usr/bin/python3.11", "-I", "-S", "-c", code,
                           json.dumps(sorted(names))], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == [], proc.stdout
    assert len(names) > 80


# -- VM: boot the image and talk to the agent -----------------------------------------------------


@pytest.fixture(scope="session")
def kernel() -> Path:
    from pykata.guestimage.kernel import find_kernel
    from pykata.hypervisor.qemu.assets import without_symbols

    art = find_kernel(DEFAULT_CACHE)
    if art is None:
        pytest.fail("no guest kernel in /var/cache/pykata (scripts/install.sh runs `pykata image build`)")
    return without_symbols(art.vmlinux)


@pytest.fixture(scope="session")
def guest(deb_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> RootfsArtifact:
    """The root filesystem of the current sources (the default cache's if it is up to date)."""
    cached = find_rootfs(DEFAULT_CACHE)
    if cached is not None:
        return cached
    return build_rootfs(_seeded(deb_cache, tmp_path_factory.mktemp("guest-cache")))


def _newc_files(data: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, content) of each member of a newc archive (a symlink's content is its target)."""
    out, pos = {}, 0
    while True:
        f = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = data[pos + 110: pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        if name == cpio.TRAILER:
            return out
        out[name] = (f[1], data[pos:pos + filesize])
        pos += filesize + (-filesize % 4)


def _resolve(files: dict[str, tuple[int, bytes]], path: str) -> str | None:
    """`path` (absolute, as the guest sees it) with its symlinks followed inside the archive."""
    for _ in range(40):
        rel = os.path.normpath(path).lstrip("/")
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):  # a symlink anywhere along the path
            head = "/".join(parts[:i])
            mode, content = files.get(head, (0, b""))
            if stat.S_ISLNK(mode):
                target = content.decode()
                base = "/" if target.startswith("/") else "/" + os.path.dirname(head)
                path = os.path.join(base, target, *parts[i:])
                break
        else:
            return rel if rel in files else None
    return None


def test_the_image_has_a_loader_cache_for_crun_and_python(guest: RootfsArtifact, tmp_path: Path) -> None:
    # Without /etc/ld.so.cache every dynamic program searches hwcaps subdirectories and each library
    # directory for each of its libraries (assemble.write_ld_cache). The loader must find every library
    # crun and Python link, directly or through another library, in the cache, at a path in the image.
    files = _newc_files(guest.initrd.read_bytes())
    assert "etc/ld.so.cache" in files, "the image has no /etc/ld.so.cache"
    assert "var/cache/ldconfig/aux-cache" not in files
    (tmp_path / "ld.so.cache").write_bytes(files["etc/ld.so.cache"][1])
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    printed = subprocess.run([ldconfig, "-p", "-C", str(tmp_path / "ld.so.cache")], capture_output=True,
                             text=True, check=True).stdout
    cached = {}
    for line in printed.splitlines()[1:]:
        if "=>" in line and "x86-64" in line:
            soname, target = line.split(" (", 1)[0].strip(), line.split("=>", 1)[1].strip()
            cached[soname] = target
    queue, seen = ["/usr/bin/crun", "/usr/bin/python3.11"], set()
    while queue:
        path = queue.pop()
        real = _resolve(files, path)
        assert real is not None, f"{path} is not in the image"
        if real in seen:
            continue
        seen.add(real)
        needed, _interp = elf.dynamic_info(files[real][1])
        for soname in needed:
            assert soname in cached, f"{soname} ({path} needs it) is not in the image's ld.so.cache"
            queue.append(cached[soname])
    sonames = {n for p in seen for n in elf.dynamic_info(files[p][1])[0]}
    assert {"libc.so.6", "libseccomp.so.2", "libcap.so.2", "libyajl.so.2", "libsystemd.so.0",
            "libm.so.6", "libz.so.1", "libexpat.so.1"} <= sonames


def test_crun_gets_a_libsystemd_stand_in_without_systemds_libraries(tmp_path: Path) -> None:
    """crunlib builds a libsystemd with every symbol (and version) the host's crun imports from it and
    no library of its own: crun starts with it (its --version works), and loads 6 libraries fewer."""
    if shutil.which("cc") is None or shutil.which("crun") is None:
        pytest.fail("scripts/install.sh installs cc (build-essential) and crun")
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    shutil.copy(shutil.which("crun") or "", root / "usr/bin/crun")
    assert crunlib.install(root) is None
    lib = root / crunlib.LIB_DIR / crunlib.SONAME
    defined, _undefined = elf.dynamic_symbols(lib.read_bytes())
    _, crun_undefined = elf.dynamic_symbols((root / "usr/bin/crun").read_bytes())
    assert {s for s in crun_undefined if s.startswith("sd_")} <= defined
    assert elf.dynamic_info(lib.read_bytes())[0] == []  # needs nothing, not even libc
    env = {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": str(lib.parent)}
    out = subprocess.run([str(root / "usr/bin/crun"), "--version"], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("crun version"), out
    ldd = subprocess.run(["ldd", str(root / "usr/bin/crun")], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert str(lib) in ldd and "libgcrypt" not in ldd and "libzstd" not in ldd, ldd
    again = tmp_path / "again"
    (again / "usr/bin").mkdir(parents=True)
    shutil.copy(root / "usr/bin/crun", again / "usr/bin/crun")
    assert crunlib.install(again) is None
    assert (again / crunlib.LIB_DIR / crunlib.SONAME).read_bytes() == lib.read_bytes()  # reproducible
    # a binary whose libsystemd imports it does not cover gets none (crun then loads the real library)
    other = tmp_path / "other"
    (other / "usr/bin").mkdir(parents=True)
    shutil.copy("/bin/true", other / "usr/bin/crun")
    assert "does not have" in (crunlib.install(other) or "")
    assert not (other / crunlib.LIB_DIR).exists()


def test_the_exec_starter_s_key_follows_its_static_libc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The starter links libc.a statically: a changed libc6-dev must change the image's key (it did not: only the
    compiler driver's bytes and the source were in it). A host without a static libc or a compiler builds an
    image without the starter, and says why."""
    libc = tmp_path / "libc.a"  # a fake libc.a, never linked: only its size and time count
    libc.write_bytes(b"!<arch>\nglibc 2.36-9")
    os.utime(libc, ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))
    monkeypatch.setattr(execstart, "static_libc", lambda cc: libc)
    before = execstart.tool()
    assert before == f"libc.a {libc} size {libc.stat().st_size} mtime {1_700_000_000 * 10**9}"
    libc.write_bytes(b"!<arch>\nglibc 2.36-9+deb12u9")  # libc6-dev upgraded (dpkg sets the archive's time)
    os.utime(libc, ns=(1_730_000_000 * 10**9, 1_730_000_000 * 10**9))
    after = execstart.tool()
    assert after != before
    assert rootfs_key(_inputs(exec_start_tool=after)) != rootfs_key(_inputs(exec_start_tool=before))
    monkeypatch.setattr(execstart, "static_libc", lambda cc: None)
    assert "none: no static C library" in execstart.tool()
    assert "install libc6-dev" in (execstart.install(tmp_path / "root") or "")
    assert not (tmp_path / "root" / execstart.PATH).exists()
    monkeypatch.setattr(crunlib, "compiler", lambda: None)
    assert execstart.tool() == "none: no cc on the host"
    assert "install build-essential" in (execstart.install(tmp_path / "root") or "")


def test_the_image_has_the_exec_starter(guest: RootfsArtifact) -> None:
    files = _newc_files(guest.initrd.read_bytes())
    assert execstart.PATH in files, "the image has no exec starter (no cc or libc.a at build time?)"
    assert guest.manifest.get("exec_starter") == {"built": True, "why": ""}


def test_the_image_has_crun_s_libsystemd_stand_in(guest: RootfsArtifact) -> None:
    files = _newc_files(guest.initrd.read_bytes())
    stub = f"{crunlib.LIB_DIR}/{crunlib.SONAME}"
    assert stub in files, "the image has no libsystemd stand-in for crun (cc missing at build time?)"
    defined, _ = elf.dynamic_symbols(files[stub][1])
    crun = _resolve(files, "/usr/bin/crun")
    assert crun is not None
    _, wanted = elf.dynamic_symbols(files[crun][1])
    assert {s for s in wanted if s.startswith("sd_")} <= defined
    # the library directories' name is the stand-in too (crunlib.replace_real): the real library and
    # what only it needs are not in the image
    assert _resolve(files, f"/usr/lib/x86_64-linux-gnu/{crunlib.SONAME}") == stub
    for gone in ("libgcrypt.so.20", "libgpg-error.so.0", "liblzma.so.5", "libzstd.so.1", "liblz4.so.1"):
        assert _resolve(files, f"/usr/lib/x86_64-linux-gnu/{gone}") is None, gone
        assert _resolve(files, f"/lib/x86_64-linux-gnu/{gone}") is None, gone


def test_the_agent_starts_from_the_boot_bundle(guest: RootfsArtifact, tmp_path: Path) -> None:
    """The image's boot bundle (pycbundle) holds the modules the agent imports until its ready line and
    in LateAgent's load, each the bytecode of its pyc file in the image: in a chroot of the initrd the
    image's Python imports them as /init does, every one from the bundle, and nothing else of the image's
    library directories but extension modules."""
    import json

    tree = tmp_path / "tree"
    tree.mkdir()
    with guest.initrd.open("rb") as f:
        subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], stdin=f, cwd=tree, check=True)
    data = (tree / pycbundle.BUNDLE).read_bytes()
    size = int.from_bytes(data[12:16], "little")
    index = parse_bundle_index(data[16:16 + size])
    for name, (origin, _pkg, offset, length) in index.items():
        pyc = importlib.util.cache_from_source(origin) if origin.endswith(".py") else origin
        assert (tree / pyc.lstrip("/")).read_bytes()[16:] == data[offset:offset + length], name
    code = ("import sys, json, importlib; sys.path.insert(0, '/usr/lib/pykata')\n"
            "from pykata.agent.boot import defer_imports, use_bundle, LATE_STDLIB, load_deferred\n"
            "before = set(sys.modules); finder = use_bundle(); defer_imports()\n"
            "import pykata.agent.pid1, pykata.agent.rtnl, pykata.agent.main\n"
            "for n in LATE_STDLIB:\n    load_deferred(n)\n"
            "for n in pykata.agent.main.LATE_MODULES:\n    importlib.import_module(n)\n"
            "new = {n: getattr(m.__spec__.loader, '__name__', type(m.__spec__.loader).__name__)\n"
            "       for n, m in sys.modules.items() if n not in before}\n"
            "print(json.dumps([finder is not None, new]))")
    chroot = ["chroot"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "chroot"]
    proc = subprocess.run([*chroot, str(tree), "/usr/bin/python3.11", "-I", "-S", "-B", "-c", code],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    used, loaded = json.loads(proc.stdout)
    assert used
    others = {n: kind for n, kind in loaded.items() if kind not in ("_BundledSource", "_BundledSourceless")
              and kind not in ("ExtensionFileLoader", "BuiltinImporter", "FrozenImporter", "NamespaceLoader")}
    assert others == {}, others
    assert {n for n, kind in loaded.items() if kind.startswith("_Bundled")} >= {
        "asyncio", "pykata.agent.main", "google.protobuf.descriptor_pool", "pykata.agent.service"}


def tcg_kernel_params() -> str:
    """Under TCG the guest's TSC runs at the host's rate, but calibrating it against the emulated
    PIT fails now and then on a busy host, and then the guest kernel hangs before init: tell it."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return f"tsc_early_khz={int(float(line.split(':')[1]) * 1000)}"
    return ""


@contextlib.contextmanager
def booted(kernel: Path, rootfs: RootfsArtifact, form: str, tmp_path: Path,
           cmdline: str = "") -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    """Start QEMU (microvm, TCG) on the image; yield (process, agent socket, console log); kill it."""
    sock, log = tmp_path / "agent.sock", tmp_path / "console.log"
    params = rootfs.kernel_params(form)  # type: ignore[arg-type]
    append = f"console=ttyS0 panic=-1 {tcg_kernel_params()} {params} {cmdline}".strip()
    args = [
        QEMU, "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on", "-accel", "tcg,thread=multi",
        "-cpu", "max", "-m", "512", "-smp", "1", "-nodefaults", "-no-user-config", "-nographic",
        "-serial", f"file:{log}", "-kernel", str(kernel), "-no-reboot",
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=agent,path={sock},server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=agent.channel.0",
    ]
    if form == "image":
        assert rootfs.image is not None
        args += ["-drive", f"file={rootfs.image},format=raw,if=none,id=root,readonly=on",
                 "-device", "virtio-blk-device,drive=root"]
    else:
        args += ["-initrd", str(rootfs.initrd)]
    args += ["-append", append]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
    try:
        yield proc, sock, log
    finally:
        proc.kill()
        proc.wait()


async def _health(sock: Path, timeout: float) -> tuple[int, str]:
    from pykata.protocols.agent import HEALTH_SERVICE, agent_pb2
    from pykata.ttrpc import connect_unix

    deadline = time.monotonic() + timeout
    while True:  # QEMU binds the socket a moment before it listens on it
        try:
            client = await connect_unix(str(sock))
            break
        except (FileNotFoundError, ConnectionRefusedError):
            assert time.monotonic() < deadline, "QEMU never listened on the agent socket"
            await asyncio.sleep(0.01)
    try:
        stub = client.stub(HEALTH_SERVICE)
        check = await stub.Check(agent_pb2.CheckRequest(), timeout=deadline - time.monotonic())
        version = await stub.Version(agent_pb2.CheckRequest(), timeout=10)
        return check.status, version.agent_version
    finally:
        await client.close()


@pytest.mark.vm
@pytest.mark.parametrize("form", ["initrd", "image"])
async def test_agent_answers_health_check(kernel: Path, guest: RootfsArtifact, form: str,
                                          tmp_path: Path) -> None:
    import pykata
    from pykata.protocols.agent import agent_pb2

    if form == "image" and guest.image is None:
        pytest.fail("this rootfs has no ext4 image (built without root)")
    with booted(kernel, guest, form, tmp_path) as (proc, sock, log):
        started = time.monotonic()
        status, version = await _health(sock, timeout=60)
        elapsed = time.monotonic() - started
        assert status == agent_pb2.HealthCheckResponse.SERVING
        assert version == pykata.__version__
        assert "PYKATA_AGENT_READY" in log.read_text(errors="replace")
        assert proc.poll() is None
    print(f"{form}: QEMU start -> Health.Check answered in {elapsed:.2f} s")


@pytest.mark.vm
async def test_debug_boot_runs_python_and_crun_then_powers_off(kernel: Path, guest: RootfsArtifact,
                                                               tmp_path: Path) -> None:
    with booted(kernel, guest, "initrd", tmp_path, "pykata.agent=0 pykata.hostname=probe") as (proc, _s, log):
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        text = log.read_text(errors="replace")
        assert proc.poll() is not None, f"guest did not power off:\n{text[-3000:]}"
    assert "pykata-init: python: 3.11." in text
    assert "pykata-init: crun: crun version 1.8.1" in text
    controllers = next(ln for ln in text.splitlines() if "cgroup controllers:" in ln).split()
    assert {"cpu", "memory", "pids"} <= set(controllers)
    assert "cgroup2 /sys/fs/cgroup cgroup2" in text
    assert "FATAL" not in text
    # / is a bind mount of the initramfs (mount ID != parent ID), so crun can pivot_root.
    root_line = next(ln for ln in text.splitlines() if "pykata-init: root mount:" in ln).split()
    mount_id, parent_id = root_line[3], root_line[4]
    assert mount_id != parent_id, root_line
    assert "could not make / a movable mount" not in text


# -- the `pykata image` command -------------------------------------------------------------------


def test_image_info_on_an_empty_cache(tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from pykata.cli.main import cli

    result = CliRunner().invoke(cli, ["image", "info", "--json", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data == {"cache_dir": str(tmp_path), "kernel": None, "rootfs": None, "other_kernels": [],
                    "other_rootfs": []}
    human = CliRunner().invoke(cli, ["image", "info", "--cache-dir", str(tmp_path)])
    assert "kernel:  not built (pykata image build)" in human.output


def test_image_build_rejects_a_file_as_cache_dir(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pykata.cli.main import cli

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    result = CliRunner().invoke(cli, ["image", "build", "--cache-dir", str(not_a_dir)])
    assert result.exit_code == 2
    assert "--cache-dir" in result.output
    assert "Traceback" not in result.output


def test_old_builds_are_pruned_newest_and_current_kept(tmp_path: Path) -> None:
    import json

    from pykata.guestimage.rootfs import list_rootfs, prune_rootfs

    for age, key in enumerate(["k0", "k1", "k2", "k3", "k4"]):
        d = tmp_path / "rootfs" / key
        d.mkdir(parents=True)
        (d / "rootfs.cpio").write_bytes(b"x")
        manifest = {"key": key, "initrd": {"file": "rootfs.cpio"}, "image": None, "preferred": "initrd"}
        (d / "manifest.json").write_text(json.dumps(manifest))
        os.utime(d / "manifest.json", (1000 - age, 1000 - age))  # k0 newest, k4 oldest
    removed = prune_rootfs(tmp_path, keep=3, current="k4")
    assert sorted(removed) == ["k2", "k3"]
    assert [a.key for a in list_rootfs(tmp_path)] == ["k0", "k1", "k4"]


def test_recent_builds_outlive_the_count(tmp_path: Path) -> None:
    """Checkouts sharing the cache each use their own build: one made minutes ago is kept beyond `keep`."""
    import json
    import time

    from pykata.guestimage.rootfs import list_rootfs, prune_rootfs

    now = time.time()
    for key, age in (("new", 0), ("recent", 60), ("old", 7200)):
        d = tmp_path / "rootfs" / key
        d.mkdir(parents=True)
        (d / "rootfs.cpio").write_bytes(b"x")
        manifest = {"key": key, "initrd": {"file": "rootfs.cpio"}, "image": None, "preferred": "initrd"}
        (d / "manifest.json").write_text(json.dumps(manifest))
        os.utime(d / "manifest.json", (now - age, now - age))
    assert prune_rootfs(tmp_path, keep=1, current="new", min_age=3600) == ["old"]
    assert [a.key for a in list_rootfs(tmp_path)] == ["new", "recent"]


def _fake_builds(cache: Path, builds: list[tuple[str, float, int]]) -> None:
    """Fake cache entries (never a real build): (key, age in seconds, bytes of its initrd)."""
    import json

    now = time.time()
    for key, age, size in builds:
        d = cache / "rootfs" / key
        d.mkdir(parents=True)
        (d / "rootfs.cpio").write_bytes(b"x" * size)
        manifest = {"key": key, "initrd": {"file": "rootfs.cpio"}, "image": None, "preferred": "initrd"}
        (d / "manifest.json").write_text(json.dumps(manifest))
        os.utime(d / "manifest.json", (now - age, now - age))


def test_young_builds_are_bounded_by_count_and_size_sparing_current_and_in_use(tmp_path: Path) -> None:
    """The 12-hour rule alone kept 108 builds (6.5 GB) on a shared machine: past max_builds or max_bytes the
    oldest go however young, but never the current build nor one in use."""
    from pykata.guestimage.rootfs import list_rootfs, prune_rootfs

    mib = 1 << 20
    _fake_builds(tmp_path, [(f"k{i}", 60 * i, mib) for i in range(8)])  # k0 newest .. k7 oldest, all young
    assert prune_rootfs(tmp_path, keep=2, current="k7", min_age=3600) == []  # the age rule alone: all kept
    removed = prune_rootfs(tmp_path, keep=2, current="k7", min_age=3600, max_builds=5, in_use={"k6"})
    assert removed == ["k5", "k4", "k3"]  # oldest first; k7 (current) and k6 (in use) spared
    assert [a.key for a in list_rootfs(tmp_path)] == ["k0", "k1", "k2", "k6", "k7"]
    # by size: 5 builds of >= 1 MiB each, at most 3.5 MiB: the two oldest not spared go
    removed = prune_rootfs(tmp_path, keep=2, current="k7", min_age=3600, max_bytes=int(3.5 * mib), in_use={"k6"})
    assert removed == ["k2", "k1"]
    assert [a.key for a in list_rootfs(tmp_path)] == ["k0", "k6", "k7"]
    # spared builds alone over the bounds: they stay
    assert prune_rootfs(tmp_path, keep=1, current="k7", max_builds=1, in_use={"k6", "k0"}) == []


def test_builds_in_use_are_those_a_process_holds_or_a_template_names(tmp_path: Path) -> None:
    from pykata.guestimage.rootfs import builds_in_use

    _fake_builds(tmp_path, [("held", 0, 10), ("named", 0, 10), ("free", 0, 10)])
    with open(tmp_path / "rootfs" / "held" / "rootfs.cpio", "rb"):
        used = builds_in_use(tmp_path, [tmp_path / "rootfs" / "named" / "rootfs.cpio"])
    assert used == {"held", "named"}


def test_image_prune_removes_old_builds_beyond_keep_whatever_their_age(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pykata.cli.main import cli

    _fake_builds(tmp_path, [("a", 0, 10), ("b", 10, 10), ("c", 20, 10), ("d", 30, 10)])
    (tmp_path / "rootfs" / "current").write_text("d\n")
    result = CliRunner().invoke(cli, ["image", "prune", "--keep", "2", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "removed rootfs build c" in result.output and "removed rootfs build b" in result.output
    assert sorted(p.name for p in (tmp_path / "rootfs").iterdir() if p.is_dir()) == ["a", "d"]
    bad = CliRunner().invoke(cli, ["image", "prune", "--max-size", "lots", "--cache-dir", str(tmp_path)])
    assert bad.exit_code == 2 and "--max-size" in bad.output and "Traceback" not in bad.output


def test_the_guest_gets_every_package_root_module_the_agent_imports() -> None:
    """The agent runs from the guest's copy of pykata (guest_source_files), not the host's: a module
    it imports that is missing there kills the guest's init at boot."""
    import ast

    from pykata.guestimage.assemble import guest_source_files

    source = Path(__file__).resolve().parents[2] / "src" / "pykata"
    shipped = set(guest_source_files(source))
    for path in (source / "agent").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "pykata":
                for alias in node.names:
                    assert f"{alias.name}.py" in shipped or f"{alias.name}/__init__.py" in shipped, (path, alias.name)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pykata."):
                top = node.module.split(".")[1]
                assert f"{top}.py" in shipped or f"{top}/__init__.py" in shipped, (path, node.module)


def test_every_pykata_module_the_shipped_code_imports_is_shipped() -> None:
    """guest_source_files leaves host-only protocol modules out (GUEST_HOST_ONLY): no module the
    guest's own copy imports, at any depth, may be one of them."""
    import ast

    from pykata.guestimage.assemble import guest_source_files

    source = Path(__file__).resolve().parents[2] / "src" / "pykata"
    shipped = set(guest_source_files(source))
    assert "protocols/gen/agent/agent_pb2.py" in shipped and "protocols/containerd.py" not in shipped
    for rel in shipped:
        tree = ast.parse((source / rel).read_text())
        typing_only = {id(n) for top in ast.walk(tree) if isinstance(top, ast.If)
                       and ast.unparse(top.test).endswith("TYPE_CHECKING") for n in ast.walk(top)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.startswith("pykata."):
                    mod = name.split(".", 1)[1].replace(".", "/")
                    assert f"{mod}.py" in shipped or f"{mod}/__init__.py" in shipped, (rel, name)
