"""The boot bundle (pykata.guestimage.pycbundle writes it, pykata.agent.boot.use_bundle reads it in the
guest): modules are served from it with the file loader's own attributes, anything else falls back
to the path finder, and a bundle that is not right for the interpreter is ignored."""

from __future__ import annotations

import importlib.util
import json
import marshal
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

from pykata.agent.boot import BUNDLE_MAGIC, parse_bundle_index
from pykata.guestimage import pycbundle


def test_the_index_round_trips() -> None:
    data = pycbundle.pack([("a", "/x/a.pyc", False, b"one"), ("pkg.sub", "/x/pkg/sub/__init__.py", True, b"twotwo")],
                          importlib.util.MAGIC_NUMBER)
    assert data[:8] == BUNDLE_MAGIC == pycbundle.BUNDLE_MAGIC
    size = int.from_bytes(data[12:16], "little")
    index = parse_bundle_index(data[16:16 + size])
    assert index == {"a": ("/x/a.pyc", False, 16 + size, 3), "pkg.sub": ("/x/pkg/sub/__init__.py", True, 19 + size, 6)}
    assert data[16 + size:] == b"onetwotwo"
    with pytest.raises(ValueError, match="cut short"):
        parse_bundle_index(data[16:16 + size - 3])


def _tree(tmp_path: Path) -> Path:
    lib = tmp_path / "lib"
    (lib / "bpkg").mkdir(parents=True)
    (lib / "bpkg/__init__.py").write_text("WHERE = 'file'\n")
    (lib / "bpkg/mod.py").write_text("def boom():\n    raise ValueError('from mod')\nWHERE = 'file'\n")
    (lib / "bpkg/other.py").write_text("WHERE = 'file'\n")
    return lib


def _bundle(tmp_path: Path, lib: Path, magic: bytes = importlib.util.MAGIC_NUMBER) -> Path:
    # The bundle's bytecode says WHERE = 'bundle': which of the two a module ran is then plain.
    mods = []
    for name, rel, pkg in (("bpkg", "bpkg/__init__.py", True), ("bpkg.mod", "bpkg/mod.py", False)):
        src = (lib / rel).read_text().replace("'file'", "'bundle'")
        code = compile(src, str(lib / rel), "exec")
        mods.append((name, str(lib / rel), pkg, marshal.dumps(code)))
    out = tmp_path / "boot.pycs"
    out.write_bytes(pycbundle.pack(mods, magic))
    return out


def _run(lib: Path, bundle: Path, code: str) -> dict[str, object]:
    prelude = (f"import sys, json; sys.path.insert(0, {str(lib)!r}); "
               f"from pykata.agent.boot import use_bundle; finder = use_bundle({str(bundle)!r}); ")
    proc = subprocess.run([sys.executable, "-B", "-c", prelude + code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, object] = json.loads(proc.stdout)
    return out


def test_bundled_modules_come_from_the_bundle_with_the_file_loaders_attributes(tmp_path: Path) -> None:
    lib = _tree(tmp_path)
    bundle = _bundle(tmp_path, lib)
    out = _run(lib, bundle, (
        "import traceback, bpkg, bpkg.mod, bpkg.other\n"
        "try:\n    bpkg.mod.boom()\nexcept ValueError:\n    tb = traceback.format_exc()\n"
        "print(json.dumps({'used': finder is not None, 'where': [bpkg.WHERE, bpkg.mod.WHERE, bpkg.other.WHERE],"
        " 'file': bpkg.mod.__file__, 'cached': bpkg.mod.__cached__, 'path': bpkg.__path__,"
        " 'loader': type(bpkg.mod.__loader__).__name__, 'source': bpkg.mod.__loader__.get_source('bpkg.mod'),"
        " 'line': \"raise ValueError('from mod')\" in tb}))"))
    assert out["used"] is True
    # bpkg.other is not in the bundle: the path finder finds its file, inside the bundled package
    assert out["where"] == ["bundle", "bundle", "file"]
    assert out["file"] == str(lib / "bpkg/mod.py")
    assert out["cached"] == importlib.util.cache_from_source(str(lib / "bpkg/mod.py"))
    assert out["path"] == [str(lib / "bpkg")]
    assert out["loader"] == "_BundledSource"
    assert out["source"] == (lib / "bpkg/mod.py").read_text()
    assert out["line"] is True  # tracebacks show the source line from the file


def test_a_bundle_for_another_interpreter_or_cut_short_is_ignored(tmp_path: Path) -> None:
    lib = _tree(tmp_path)
    code = "import bpkg.mod; print(json.dumps({'used': finder is not None, 'where': bpkg.mod.WHERE}))"
    other = _bundle(tmp_path, lib, magic=b"\x00\x00\r\n")
    assert _run(lib, other, code) == {"used": False, "where": "file"}
    cut = tmp_path / "cut.pycs"
    good = _bundle(tmp_path, lib).read_bytes()
    cut.write_bytes(good[:16 + int.from_bytes(good[12:16], "little") - 5])
    assert _run(lib, cut, code) == {"used": False, "where": "file"}
    assert _run(lib, tmp_path / "missing.pycs", code) == {"used": False, "where": "file"}


def test_write_bundle_refuses_a_pyc_that_checks_its_source(tmp_path: Path) -> None:
    """Only unchecked-hash pycs go into the bundle: their bytecode cannot go stale against a source."""
    lib = _tree(tmp_path)
    py_compile.compile(str(lib / "bpkg/mod.py"), invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    fake = tmp_path / "python"
    listing = [["bpkg.mod", "/bpkg/mod.py", False, importlib.util.cache_from_source(str(lib / "bpkg/mod.py"))]]
    fake.write_text(f"#!/bin/sh\necho '{json.dumps(listing)}'\n")  # a fake interpreter: only its listing matters
    fake.chmod(0o755)
    with pytest.raises(pycbundle.BundleError, match="not an unchecked-hash pyc"):
        pycbundle.write_bundle(tmp_path, fake, [])


def test_write_bundle_names_the_interpreters_failure(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named pykata' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(pycbundle.BundleError, match="No module named pykata"):
        pycbundle.write_bundle(tmp_path, fake, [])
