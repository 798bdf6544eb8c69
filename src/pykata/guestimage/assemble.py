"""Assemble the guest root tree in a staging directory, without a chroot and without root's help.

Steps, each a function so tests and the builder can call them one by one: unpack .debs, trim what a
VM that only runs the agent and crun never reads (docs, locales, most of the standard library's
tooling), add busybox applet links, pykata's guest code and its wheels, the init script and a few
/etc files, drop DT_NEEDED entries of libraries a file uses nothing of and then the shared libraries
nothing links, prove every ELF file finds its libraries, write the
loader's cache (/etc/ld.so.cache), compile Python to bytecode, and finally give every file the same
mtime and sane permissions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pykata.errors import PykataError
from pykata.guestimage import elf

PY = "python3.11"
STDLIB = f"usr/lib/{PY}"
AGENT_LIB = "usr/lib/pykata"  # pykata's guest packages and the protobuf wheels (the agent's PYTHONPATH)
LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib", "usr/lib")

# Whole trees nobody in the guest reads.
DROP_TREES = (
    "usr/share", "usr/include", "usr/lib/x86_64-linux-gnu/gconv", "etc/ld.so.conf.d", "etc/python3.11",
    f"{STDLIB}/sitecustomize.py", "usr/lib/python3",
    "usr/bin/tini",  # tini's dynamic build: containers get tini-static (`pykata run --init`), which needs no libc
)
# Standard library parts the agent never imports: tests, GUIs, packaging and developer tooling,
# modules whose C extension or shared library the image leaves out.
STDLIB_DROP = (
    "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data", "distutils",
    "unittest", "venv", "sqlite3", "curses", "dbm", "wsgiref", "xmlrpc", "__phello__", "msilib",
    "config-3.11-x86_64-linux-gnu", "site-packages", "dist-packages",
    "__hello__.py", "antigravity.py", "this.py", "turtle.py", "pydoc.py", "doctest.py", "pdb.py",
    "idle.py", "_pydecimal.py", "_pyio.py", "_osx_support.py", "_aix_support.py", "imaplib.py",
    "nntplib.py", "poplib.py", "smtpd.py", "smtplib.py", "ftplib.py", "telnetlib.py", "mailbox.py",
    "cgi.py", "cgitb.py", "webbrowser.py", "tabnanny.py", "pyclbr.py", "sndhdr.py", "imghdr.py",
    "aifc.py", "sunau.py", "wave.py", "chunk.py", "audioop.py", "xdrlib.py", "nturl2path.py",
    "crypt.py", "asynchat.py", "asyncore.py", "_bootsubprocess.py", "_distutils_system_mod.py",
    "EXTERNALLY-MANAGED", "LICENSE.txt",
    # _ssl and libssl are not shipped, so ssl can never import; yet asyncio's base_events,
    # selector_events and sslproto each try it (a failed import is retried): with ssl.pyc there, each
    # try unmarshalled its 72 KiB and ran its first imports before _ssl failed (~1.4 ms on the host)
    "ssl.py",
    # likewise lzma and bz2 (no _lzma, _bz2): shutil and tarfile try them
    "lzma.py", "bz2.py",
    # Packages and modules neither the agent, protobuf nor the stdlib modules they import ever import
    # (mail, XML, HTTP clients and servers, archives, process pools, profilers, REPL tooling; the build
    # itself runs the image's compileall, which needs filecmp): every MB
    # of the initramfs costs each cold boot ~12 ms of unpacking under TCG (here ~3 MB).
    "email", "xml", "html", "http", "multiprocessing", "tomllib", "zoneinfo", "_markupbase.py",
    "tarfile.py", "zipfile.py", "gzip.py", "zipapp.py", "decimal.py", "fractions.py", "statistics.py",
    "pickletools.py", "difflib.py", "optparse.py", "configparser.py", "csv.py", "uuid.py", "mailcap.py",
    "mimetypes.py", "plistlib.py", "socketserver.py", "shelve.py", "netrc.py", "profile.py", "cProfile.py",
    "pstats.py", "trace.py", "timeit.py", "bdb.py", "cmd.py", "code.py", "codeop.py", "symtable.py",
    "modulefinder.py", "fileinput.py", "sched.py", "quopri.py", "uu.py", "graphlib.py",
    "colorsys.py", "rlcompleter.py", "imp.py", "_py_abc.py", "urllib/request.py", "urllib/response.py",
    "urllib/robotparser.py", "urllib/error.py",
)
# Codecs that need the CJK extension modules, which are not shipped.
CJK_CODECS = (
    "big5", "big5hkscs", "cp932", "cp949", "cp950", "euc_jis_2004", "euc_jisx0213", "euc_jp",
    "euc_kr", "gb18030", "gb2312", "gbk", "hz", "iso2022_jp", "iso2022_jp_1", "iso2022_jp_2",
    "iso2022_jp_2004", "iso2022_jp_3", "iso2022_jp_ext", "iso2022_kr", "johab", "shift_jis",
    "shift_jis_2004", "shift_jisx0213",
)
# Extension modules the guest keeps (the rest need libraries the image leaves out, are tests, or serve
# modules STDLIB_DROP leaves out: _decimal, _zoneinfo, _multiprocessing, _posixshmem).
# Not _lzma: nothing in the guest decompresses xz, yet shutil (which the agent imports) loads lzma
# and _lzma, with liblzma, whenever it can: ~1 ms of the agent's imports on the host, more under TCG.
DYNLOAD_KEEP = (
    "_asyncio", "_contextvars", "_ctypes", "_json", "_queue", "_typing", "mmap", "resource", "termios",
)
# Libraries loaded with dlopen (no DT_NEEDED points at them) that glibc or Python need at run time.
DLOPEN_KEEP = ("libnss_files.so.2", "libnss_dns.so.2", "libresolv.so.2", "libgcc_s.so.1")
# Busybox applets that must not be links: /sbin/init is pykata's init.
APPLET_SKIP = frozenset({"sbin/init", "linuxrc", "init"})


class AssembleError(PykataError):
    """The staged tree is incomplete (a missing library, interpreter or a failed compile step)."""


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def trim(root: Path) -> None:
    """Remove docs, man pages, locales, static libraries and the unused parts of the stdlib."""
    for rel in DROP_TREES:
        _remove(root / rel)
    for lib in ("lib", "usr/lib"):
        for static in (root / lib).glob("x86_64-linux-gnu/*.a"):
            static.unlink()
    stdlib = root / STDLIB
    if not stdlib.is_dir():
        return
    for name in STDLIB_DROP:
        _remove(stdlib / name)
    for codec in CJK_CODECS:
        _remove(stdlib / "encodings" / f"{codec}.py")
    for tests in sorted(stdlib.glob("**/test*")):
        # Package-internal test suites (ctypes/test, ...) — but not modules like `textwrap`.
        if tests.is_dir() and tests.name in ("test", "tests"):
            _remove(tests)
    for so in (stdlib / "lib-dynload").glob("*.so"):
        if so.name.split(".", 1)[0] not in DYNLOAD_KEEP:
            so.unlink()


def busybox_links(root: Path) -> int:
    """Link every busybox applet to /bin/busybox where no real file exists; return how many.

    Raises AssembleError when the staged busybox cannot list its applets.
    """
    busybox = root / "bin/busybox"
    proc = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AssembleError(f"{busybox} --list-full failed: {proc.stderr.strip()}")
    count = 0
    for applet in sorted(set(proc.stdout.split())):
        if applet in APPLET_SKIP or applet.startswith("/") or ".." in applet:
            continue
        link = root / applet
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(busybox, link.parent))
        count += 1
    return count


GUEST_INIT_PY = '''"""pykata in the guest: the subset of the package the agent imports.

Generated by pykata.guestimage.assemble instead of copying the host's __init__.py, whose version lookup
(importlib.metadata) costs a large part of the agent's start-up under TCG.
"""

from pykata.errors import PykataError

__version__ = {version!r}
__all__ = ["PykataError", "__version__"]
'''


def install_agent_packages(root: Path, source: Path, version: str) -> None:
    """Copy pykata's guest packages from `source` (the installed `pykata` package directory).

    Only what the agent imports: `errors`, `ttrpc`, `protocols`, `agent`, and a generated
    `__init__` that carries the host's `__version__` as a constant.
    """
    dest = root / AGENT_LIB / "pykata"
    dest.mkdir(parents=True, exist_ok=True)
    for rel in guest_source_files(source):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / rel, target)
        target.chmod(0o644)
    (dest / "__init__.py").write_text(GUEST_INIT_PY.format(version=version))
    (dest / "__init__.py").chmod(0o644)


GUEST_MODULES = ("__init__.py", "errors.py", "ids.py", "record.py")  # what the agent imports from the package root
GUEST_PACKAGES = ("ttrpc", "protocols", "agent")
# Host-only parts of those packages (containerd's and the monitor's protocols): the agent serves only
# its own API. Every MB of the initramfs costs the guest kernel ~12 ms of unpacking under TCG.
GUEST_HOST_ONLY = ("protocols/containerd.py", "protocols/owner.py", "protocols/typeurl.py",
                   "protocols/gen/containerd/", "protocols/gen/cgroups/", "protocols/gen/owner/")
# googleapis-common-protos parts the agent never imports: it uses google.rpc (Status) only.
WHEEL_DROP = ("google/api", "google/type", "google/longrunning", "google/cloud", "google/logging",
              "google/gapic")


def guest_source_files(source: Path) -> list[str]:
    """The relative paths of pykata's files that go into the guest, sorted.

    Python sources only (no stubs, caches or tests); `source` is the `pykata` package directory.
    """
    out = [m for m in GUEST_MODULES if (source / m).is_file()]
    for pkg in GUEST_PACKAGES:
        base = source / pkg
        if base.is_dir():
            out.extend(rel for p in base.rglob("*.py") if "__pycache__" not in p.parts
                       and not (rel := p.relative_to(source).as_posix()).startswith(GUEST_HOST_ONLY))
    return sorted(out)


def drop_unused_wheel_parts(agent_lib: Path) -> None:
    """Remove the wheels' packages the agent never imports (WHEEL_DROP) from the agent's library."""
    for rel in WHEEL_DROP:
        _remove(agent_lib / rel)


ETC_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    "etc/group": "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
}
# Mount points and directories init expects; /etc/resolv.conf points into /run so a read-only root
# can still get one.
EMPTY_DIRS = ("proc", "sys", "dev", "run", "tmp", "mnt", "root", "var", "etc", "sbin")


def install_base(root: Path, init_script: bytes) -> None:
    """Write /init (and /sbin/init pointing at it), /etc files and the empty mount points."""
    for d in EMPTY_DIRS:
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "var/tmp").mkdir(exist_ok=True)
    init = root / "init"
    init.write_bytes(init_script)
    init.chmod(0o755)
    sbin_init = root / "sbin/init"
    _remove(sbin_init)
    sbin_init.symlink_to("../init")
    for rel, text in ETC_FILES.items():
        (root / rel).write_text(text)
        (root / rel).chmod(0o644)
    resolv = root / "etc/resolv.conf"
    _remove(resolv)
    resolv.symlink_to("../run/resolv.conf")


def _in_root(root: Path, path: str) -> Path | None:
    """Resolve `path` (absolute, as the guest sees it) inside `root`, following symlinks there."""
    current = path
    for _ in range(40):
        candidate = root / current.lstrip("/")
        if candidate.is_symlink():
            target = os.readlink(candidate)
            current = target if target.startswith("/") else os.path.join(os.path.dirname(current), target)
            current = os.path.normpath(current)
            continue
        return candidate if candidate.exists() else None
    return None


def _real(root: Path, p: Path) -> Path | None:
    """`p` (inside `root`) with every symlink followed the way the guest would follow it."""
    return _in_root(root, "/" + p.relative_to(root).as_posix())


def _elf_files(root: Path) -> Iterator[Path]:
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            p = Path(dirpath) / name
            if not p.is_symlink() and p.is_file() and elf.is_elf(p):
                yield p


def _lib_dirs(root: Path) -> list[Path]:
    return [root / d for d in LIB_DIRS if (root / d).is_dir()]


def _find_lib(root: Path, name: str) -> Path | None:
    for d in LIB_DIRS:
        found = _in_root(root, f"/{d}/{name}")
        if found is not None:
            return found
    return None


# Libraries a file may name in DT_NEEDED without using any of their symbols (linked without
# --as-needed): protobuf's C extension (google/_upb/_message.abi3.so) names libstdc++ and calls only
# libc. Loading it anyway cost each cold boot the 2.2 MB library's relocations and constructors inside
# the agent's imports, and 2.2 MB of initramfs to unpack (~12 ms per MB under TCG).
AS_NEEDED = ("libstdc++.so.6",)


def drop_unused_needed(root: Path, libraries: Iterable[str] = AS_NEEDED) -> list[str]:
    """Remove each of `libraries` from the DT_NEEDED entries of every ELF file in the tree that uses
    none of its symbols and has no symbol version requirement naming it; return "FILE: LIBRARY" for
    each entry removed. A library the tree does not hold is left alone (prune_libraries reports it).
    """
    wanted = set(libraries)
    defined: dict[str, set[str] | None] = {}
    removed = []
    for p in _elf_files(root):
        data = p.read_bytes()
        needed, _interp = elf.dynamic_info(data)
        candidates = [lib for lib in needed if lib in wanted]
        if not candidates:
            continue
        _own, undefined = elf.dynamic_symbols(data)
        versioned = elf.version_needs(data)
        edited = data
        for lib in candidates:
            if lib not in defined:
                found = _find_lib(root, lib)
                defined[lib] = elf.dynamic_symbols(found.read_bytes())[0] if found is not None else None
            provides = defined[lib]
            if provides is None or undefined & provides or lib in versioned:
                continue
            edited = elf.remove_needed(edited, lib)
            removed.append(f"/{p.relative_to(root)}: {lib}")
        if edited is not data:
            p.write_bytes(edited)  # same file, same mode
    return removed


def prune_libraries(root: Path) -> list[str]:
    """Delete shared libraries that no executable or extension module needs; return their names.

    Raises AssembleError listing every file whose interpreter or DT_NEEDED library is missing.
    """
    lib_dirs = _lib_dirs(root)

    def in_lib_dir(p: Path) -> bool:
        return any(p.parent == d for d in lib_dirs)

    problems: list[str] = []
    queue: list[Path] = []
    for p in _elf_files(root):
        if not in_lib_dir(p):
            queue.append(p)
    for name in DLOPEN_KEEP:
        found = _find_lib(root, name)
        if found is not None:
            queue.append(found)
    keep: set[Path] = set()
    while queue:
        p = queue.pop()
        real = _real(root, p)
        if real is None or real in keep:
            continue
        keep.add(real)
        needed, interp = elf.dynamic_info(real.read_bytes())
        if interp is not None:
            found = _in_root(root, interp)
            if found is None:
                problems.append(f"/{p.relative_to(root)}: interpreter {interp} missing")
            else:
                queue.append(found)
        for lib in needed:
            found = _find_lib(root, lib)
            if found is None:
                problems.append(f"/{p.relative_to(root)}: needs {lib}, not in the image")
            else:
                queue.append(found)
    if problems:
        raise AssembleError("shared libraries missing (add their packages to the recipe): "
                            + "; ".join(sorted(set(problems))))
    removed = []
    for d in lib_dirs:
        for p in sorted(d.iterdir()):
            if ".so" not in p.name or p.is_dir():
                continue
            if _real(root, p) not in keep:
                removed.append(p.name)
                p.unlink()
    return removed


LD_CACHE = "etc/ld.so.cache"
LDCONFIG_AUX_CACHE = "var/cache/ldconfig"
LDCONFIG_PATHS = ("/sbin/ldconfig", "/usr/sbin/ldconfig")


def _ldconfig_argv() -> tuple[list[str] | None, str]:
    """The command that writes a tree's loader cache (its root last, left out), or None and why not."""
    ldconfig = shutil.which("ldconfig") or next((p for p in LDCONFIG_PATHS if os.access(p, os.X_OK)), None)
    if ldconfig is None:
        return None, "no ldconfig on the host"
    argv = [ldconfig, "-X", "-r"]
    if os.geteuid() != 0:
        unshare = shutil.which("unshare")
        if unshare is None:
            return None, "ldconfig -r needs root or unshare (util-linux) for a user namespace"
        argv = [unshare, "--user", "--map-root-user", *argv]
    return argv, ""


def ld_cache_tool() -> str:
    """What decides /etc/ld.so.cache's bytes beside the tree (write_ld_cache), for the image's hash: the
    host's ldconfig, by the sha256 of its executable (the cache records that ldconfig's version string,
    "ldconfig (Debian GLIBC 2.36-9+deb12u13) 2.36", and its format follows that glibc), or why no cache
    is written (the image then has none). Another host's ldconfig thus makes another build, not an image
    whose hash hides a different file. Raises nothing."""
    argv, why = _ldconfig_argv()
    if argv is None:
        return f"none: {why}"
    ldconfig = argv[-3]
    try:
        real = os.path.realpath(ldconfig)
        st = os.stat(real)
        seen = (real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if _LDCONFIG_DIGEST.get("file") != seen:  # every VM start resolves the image's key: hash once
            _LDCONFIG_DIGEST.clear()
            _LDCONFIG_DIGEST.update(file=seen, digest=hashlib.sha256(Path(real).read_bytes()).hexdigest())
    except OSError as exc:
        return f"none: cannot read {ldconfig}: {exc.strerror}"
    return f"ldconfig sha256:{_LDCONFIG_DIGEST['digest']}"


_LDCONFIG_DIGEST: dict[str, Any] = {}


def write_ld_cache(root: Path) -> str | None:
    """Write the dynamic loader's cache, /etc/ld.so.cache, for the staged tree; None when written,
    else why not (the image still works, only slower).

    Without a cache the loader looks for each library of every dynamic program (crun's ten, Python's)
    in the hwcaps subdirectories and then each library directory in turn: crun --version tries 36
    files instead of 10, and each failed open costs under TCG. The host's `ldconfig -r ROOT -X`
    (same format since glibc 2.32; -X: leave the tree's links alone) chroots into the tree, so an
    unprivileged builder runs it as root of a user namespace (`unshare -r`). Its output depends only on
    the tree (sorted entries, no timestamps) and on that ldconfig (its version string is in the file:
    ld_cache_tool, part of the image's hash); the auxiliary cache it may leave (inode numbers, mtimes)
    is removed.
    """
    argv, why = _ldconfig_argv()
    if argv is None:
        return why
    argv = [*argv, str(root)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin",
                              "LC_ALL": "C"}, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{argv[0]} failed: {exc}"
    finally:
        _remove(root / LDCONFIG_AUX_CACHE)
    if proc.returncode != 0 or not (root / LD_CACHE).is_file():
        _remove(root / LD_CACHE)
        return f"{' '.join(argv[:-1])} ROOT failed (status {proc.returncode}): {proc.stderr.strip()[-500:]}"
    return None


_COMPILE_DRIVER = r"""
import compileall, json, py_compile, sys
spec = json.loads(sys.stdin.read())
ok = True
for directory, legacy in spec["dirs"]:
    ok = compileall.compile_dir(
        directory, quiet=1, legacy=legacy, stripdir=spec["root"], prependdir="/", workers=1,
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH) and ok
sys.exit(0 if ok else 1)
"""


def compile_python(root: Path, *, sourceless: Iterable[str], with_source: Iterable[str]) -> None:
    """Compile Python files to bytecode with the image's own interpreter.

    `sourceless` directories get `foo.pyc` next to `foo.py` and lose the .py (smaller, and the
    guest never needs the source); `with_source` ones get `__pycache__` files and keep the .py
    (tracebacks of pykata's own code show source lines). Unchecked-hash pycs carry no mtime, so the
    bytes depend only on the sources; PYTHONHASHSEED=0 fixes the order of set constants.
    Raises AssembleError when compiling fails.
    """
    python = root / "usr/bin" / PY
    dirs = [(str(root / d), True) for d in sourceless] + [(str(root / d), False) for d in with_source]
    dirs = [(d, legacy) for d, legacy in dirs if Path(d).is_dir()]
    env = {"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "LC_ALL": "C"}
    proc = subprocess.run([str(python), "-I", "-S", "-c", _COMPILE_DRIVER],
                          input=json.dumps({"root": str(root), "dirs": dirs}), capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode != 0:
        raise AssembleError(f"compiling Python in the image failed: {(proc.stdout + proc.stderr)[-2000:]}")
    for d in sourceless:
        for py in (root / d).rglob("*.py"):
            if py.with_suffix(".pyc").is_file():
                py.unlink()
        for cache in sorted((root / d).rglob("__pycache__"), reverse=True):
            shutil.rmtree(cache)


def normalize(root: Path, epoch: int) -> None:
    """Give every entry the mtime `epoch` and permissions independent of the builder's umask."""
    for dirpath, dirs, names in os.walk(root, topdown=False):
        for name in names + dirs:
            p = Path(dirpath) / name
            st = p.lstat()
            if stat.S_ISDIR(st.st_mode):
                p.chmod(0o1777 if p.relative_to(root).as_posix() in ("tmp", "var/tmp") else 0o755)
            elif stat.S_ISREG(st.st_mode):
                p.chmod(stat.S_IMODE(st.st_mode) & ~0o022)
            os.utime(p, (epoch, epoch), follow_symlinks=False)
    root.chmod(0o755)
    os.utime(root, (epoch, epoch))


def tree_size(root: Path) -> tuple[int, int]:
    """(bytes in regular files, number of entries) of the tree under `root`."""
    total, count = 0, 0
    for dirpath, dirs, names in os.walk(root):
        for name in names + dirs:
            count += 1
            st = (Path(dirpath) / name).lstat()
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total, count
