"""Hypothesis strategies and properties over the configuration parser, the annotation overrides and the
cgroup path check: whatever the input, the only exception is the documented one (ConfigError,
CgroupError), naming a field. Shared by tests/security/test_config_fuzz.py (CI) and
bench/fuzz_config.py (longer runs)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import PurePosixPath
from typing import Any

from hypothesis import strategies as st

from pykata.config import Config, apply_annotations, parse_mapping, parse_toml
from pykata.config.schema import ANNOTATABLE_HYPERVISOR_KEYS, NEVER_ANNOTATABLE_HYPERVISOR_KEYS
from pykata.errors import ConfigError
from pykata.resources import cgroups

SECTIONS: dict[str, list[str]] = {
    "hypervisor.qemu": [f.name for f in dataclasses.fields(Config().qemu)],
    "agent.pykata": [f.name for f in dataclasses.fields(Config().agent.pykata)],
    "runtime": [f.name for f in dataclasses.fields(Config().runtime)],
    "factory": [f.name for f in dataclasses.fields(Config().factory)],
}
EDGE_INTS = [0, -1, 1, 63, 64, 255, 256, 1023, 1024, 1 << 20, (1 << 20) + 1, 2**31, 2**63 - 1, -(2**63), 10**100]
EDGE_FLOATS = [0.0, -0.0, 1e-300, 3600.0, 3600.0001, 1e308, math.inf, -math.inf, math.nan]
EDGE_TEXT = ["", "/", "..", "/../../etc/shadow", "a\nb", "\x00", "microvm", "q35", "virtio-fs", "none",
             "/usr/bin/qemu-system-x86_64", "x" * 5000, "🙂", "\u202e", "$(id)", "-o source=/"]

scalars = st.one_of(
    st.booleans(), st.integers(), st.sampled_from(EDGE_INTS), st.floats(), st.sampled_from(EDGE_FLOATS),
    st.text(max_size=20), st.sampled_from(EDGE_TEXT), st.dates(),
)
values = st.one_of(scalars, st.lists(scalars, max_size=4),
                   st.dictionaries(st.text(max_size=8), scalars, max_size=3))


@st.composite
def config_mappings(draw: st.DrawFn) -> dict[str, Any]:
    """What tomllib could hand parse_mapping: the schema's sections and keys (mostly), wrong ones too."""
    data: dict[str, Any] = {}
    for section, keys in SECTIONS.items():
        if not draw(st.booleans()):
            continue
        table = {draw(st.sampled_from(keys) if draw(st.integers(0, 7)) else st.text(max_size=12)): draw(values)
                 for _ in range(draw(st.integers(0, 5)))}
        head, _, tail = section.partition(".")
        if tail:
            data.setdefault(head, {})[tail] = table if draw(st.integers(0, 9)) else draw(values)
        else:
            data[head] = table if draw(st.integers(0, 9)) else draw(values)
    if draw(st.integers(0, 9)) == 0:
        data[draw(st.text(max_size=10))] = draw(values)
    return data


def _lines(draw: st.DrawFn) -> str:
    keys = [k for ks in SECTIONS.values() for k in ks]
    rendered = st.one_of(st.integers().map(str), st.floats().map(lambda f: repr(f).replace("inf", "inf")),
                         st.text(max_size=20).map(json.dumps), st.sampled_from(["true", "[]", '["a", 1]', "{}",
                                                                               "nan", "-inf", "1979-05-27"]))
    out = []
    for _ in range(draw(st.integers(0, 8))):
        if draw(st.integers(0, 3)) == 0:
            out.append(f"[{draw(st.sampled_from([*SECTIONS, 'x', 'hypervisor', 'agent']))}]")
        else:
            out.append(f"{draw(st.sampled_from(keys))} = {draw(rendered)}")
    return "\n".join(out)


toml_texts = st.one_of(st.text(max_size=200), st.composite(_lines)())

annotation_names = st.one_of(
    st.sampled_from([f"io.katacontainers.config.hypervisor.{k}" for k in SECTIONS["hypervisor.qemu"]]),
    st.sampled_from([f"io.katacontainers.config.agent.{k}" for k in SECTIONS["agent.pykata"]]),
    st.sampled_from(["io.katacontainers.config.runtime.sandbox_cgroup_only", "io.katacontainers.config.",
                     "io.katacontainers.config.hypervisor.", "io.kubernetes.cri.sandbox-id"]),
    st.text(max_size=300).map(lambda s: "io.katacontainers.config." + s),
    st.text(max_size=30),
)
annotation_values = st.one_of(
    st.text(max_size=60), st.integers().map(str), st.floats().map(str), st.sampled_from(EDGE_TEXT),
    st.sampled_from(["nan", "inf", "-inf", "1e309", "1_000", "0x10", " 7 ", "9" * 5000, "[" * 4000,
                     '["a"]', '[1]', '{"a": 1}', "null", "TRUE", "1.5"]),
    st.lists(st.text(max_size=20), max_size=4).map(json.dumps),
)
annotation_maps = st.dictionaries(annotation_names, annotation_values, max_size=6)

# an admin who allows every key that may be allowed, so that the values themselves get checked
PERMISSIVE = parse_toml("[hypervisor.qemu]\nenable_annotations = [" +
                        ", ".join(f'"{k}"' for k in ANNOTATABLE_HYPERVISOR_KEYS) + "]\ndefault_maxvcpus = 8\n")

cgroup_components = st.sampled_from(["..", ".", "", "a", "kubepods", "pod1", "x.slice", "-.slice", ":", "a:b",
                                     "\n", "\x7f", "a" * 300, "cri-containerd", "../x"])
cgroup_paths = st.one_of(
    st.text(max_size=80),
    st.lists(cgroup_components, max_size=8).map("/".join),
    st.lists(cgroup_components, max_size=8).map(lambda p: "/" + "/".join(p)),
    st.tuples(cgroup_components, cgroup_components, cgroup_components).map(":".join),
    st.integers(), st.none(), st.lists(st.text(max_size=5), max_size=3),
)


def check_mapping(data: dict[str, Any]) -> str | None:
    """parse_mapping(data): a Config, or a ConfigError naming a field (returned)."""
    try:
        config = parse_mapping(data)
    except ConfigError as e:
        assert e.field, e
        return e.field
    assert isinstance(config, Config)
    return None


def check_text(text: str) -> str | None:
    try:
        config = parse_toml(text, source="<fuzz>")
    except ConfigError as e:
        assert e.field, e
        return e.field
    assert isinstance(config, Config)
    return None


def check_annotations(annotations: dict[str, str]) -> str | None:
    """apply_annotations: a valid Config, never a host-choosing key changed, or ConfigError naming
    an annotation."""
    try:
        config = apply_annotations(PERMISSIVE, annotations)
    except ConfigError as e:
        assert e.field.startswith("io.katacontainers.config."), e
        return e.field
    for key in NEVER_ANNOTATABLE_HYPERVISOR_KEYS:
        if hasattr(config.qemu, key):
            assert getattr(config.qemu, key) == getattr(PERMISSIVE.qemu, key), key
    assert config.runtime == PERMISSIVE.runtime and config.factory == PERMISSIVE.factory
    return None


def check_cgroup_path(value: object) -> str | None:
    """cgroup_path: a relative path with no `.`/`..` part, or CgroupError naming linux.cgroupsPath."""
    try:
        path = cgroups.cgroup_path(value, "sandbox1", pod_only=True)
    except cgroups.CgroupError as e:
        assert e.field == cgroups.FIELD, e
        return e.field
    assert isinstance(path, PurePosixPath) and not path.is_absolute()
    assert path.parts and not {".", ".."} & set(path.parts) and len(path.parts) <= cgroups.MAX_DEPTH
    return None


SECRET = "Zq9sEcReT"


@st.composite
def secret_files(draw: st.DrawFn) -> str:
    """A would-be configuration file holding SECRET somewhere: as a key, a value, a table, garbage."""
    text = draw(toml_texts)
    where = draw(st.sampled_from(["key", "value", "table", "garbage", "enum", "list"]))
    line = {"key": f"{SECRET} = 1", "value": f'kernel = "{SECRET}"', "table": f"[{SECRET}]",
            "garbage": f"{SECRET}: {SECRET}:::", "enum": f'machine_type = "{SECRET}"',
            "list": f'kernel_modules = ["{SECRET}", 1]'}[where]
    lines = text.splitlines()
    lines.insert(draw(st.integers(0, len(lines))), line)
    if where in ("value", "enum") and draw(st.booleans()):
        lines.insert(0, "[hypervisor.qemu]")
    if where == "list":
        lines.insert(0, "[agent.pykata]")
    return "\n".join(lines)


def check_secret_file(directory: str, text: str) -> str | None:
    """load_pod_config_file of a file holding SECRET: accepted, or refused without a trace of SECRET."""
    import os

    from pykata.config import load_pod_config_file

    path = os.path.join(directory, "pod.toml")
    with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(text)
    try:
        load_pod_config_file(path, (directory,))
    except ConfigError as e:
        assert e.field == "io.katacontainers.config_path", e
        assert SECRET.lower() not in str(e).lower(), e
        return e.field
    return None
