"""pykata's layering, checked on the import graph of src/pykata (tests/architecture/importgraph.py reads
it with `ast`, function-local and TYPE_CHECKING imports included, so an import hidden in a function to
dodge a cycle still counts).

Imports point one way (docs: ARCHITECTURE.md, "Layers"):
    shim, cli, sdk  ->  sandbox  ->  factory, resources  ->  hypervisor, network, agentapi
        ->  ttrpc, protocols, config, images, guestimage  ->  errors, fsutil, ids
A package may import any package of a lower tier. Within a tier only the pairs in SAME_TIER may import
each other. Every exception below is named with its reason; nothing is allowed silently.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.architecture.importgraph import ImportGraph, collapse, cycles

SRC = Path(__file__).resolve().parents[2] / "src"

# Higher imports lower. The root package `pykata` sits with errors: eagerly it imports only
# pykata.errors (PykataError) and gives __version__, which the agent and the image builder read.
TIERS: dict[str, int] = {
    "pykata.shim": 6, "pykata.cli": 6, "pykata.sdk": 6, "pykata.monitor": 6, "pykata.deploy": 6,
    "pykata.sandbox": 5,
    "pykata.factory": 4, "pykata.resources": 4,
    "pykata.hypervisor": 3, "pykata.network": 3, "pykata.agentapi": 3,
    "pykata.ttrpc": 2, "pykata.protocols": 2, "pykata.config": 2, "pykata.images": 2, "pykata.guestimage": 2,
    "pykata.errors": 1, "pykata.fsutil": 1, "pykata.ids": 1, "pykata.timing": 1, "pykata.tracing": 1,
    "pykata.record": 1, "pykata": 1,
}
GUEST = "pykata.agent"  # runs inside the VM: its own rule (GUEST_MAY_IMPORT)

SAME_TIER: dict[tuple[str, str], str] = {
    ("pykata", "pykata.errors"): "the root package re-exports PykataError",
    ("pykata.ids", "pykata.errors"): "a bad id is an InvalidArgument naming its field",
    ("pykata.protocols", "pykata.ttrpc"): "protocols are ttrpc service specs over the generated messages",
    ("pykata.images", "pykata.config"): "image size caps are a configuration section ([image])",
    ("pykata.factory", "pykata.resources"): "(not used today) a factory may size VMs with the pod policy",
    ("pykata.cli", "pykata.sdk"): "(not used today) the CLI may drive the SDK",
    ("pykata.cli", "pykata.monitor"): "`pykata monitor` is the CLI face of the monitor daemon",
    ("pykata.cli", "pykata.deploy"): "`pykata install node` is the CLI face of the node installer",
    ("pykata.cli", "pykata.shim"): ("`pykata factory pool fill` has the shims' fork server (shim.forkclient) "
                                    "fork its waiting shims, as a pod's shim refills the pool"),
}

# Import edges (module -> module) left out of every check, each with its reason.
EXEMPT_EDGES: dict[tuple[str, str], str] = {
    ("pykata", "pykata.sdk"): (
        "PEP 562 lazy attribute in pykata/__init__.py: `pykata.Sandbox` loads the SDK on first access, "
        "never on `import pykata`, which every `import pykata.x` (the guest agent's included) runs"),
    ("pykata.sandbox.policy", "pykata.agent.policy"): (
        "the host checks an agent policy document with the very parser the agent enforces it with, "
        "before any VM starts (pure code: stdlib + protobuf)"),
    ("pykata.sandbox.sandbox", "pykata.agent.policy"): "as sandbox.policy -> agent.policy",
}

# What code in the guest may import: no host layer ever loads there (the guest image carries only
# pykata/__init__.py, errors.py, ids.py, record.py, agent/, protocols/, ttrpc/: guestimage.assemble.GUEST_*).
GUEST_MAY_IMPORT = {
    GUEST: "itself",
    "pykata.protocols": "the agent API messages",
    "pykata.ttrpc": "the RPC it serves",
    "pykata.errors": "the one error root, shared with the host",
    "pykata.ids": "the one id rule, shared with the host (guestimage.assemble.GUEST_MODULES ships it)",
    "pykata.record": "value classes without dataclass's import-time exec (GUEST_MODULES ships it)",
    "pykata": "__version__ (the root package eagerly imports pykata.errors only)",
}
GUEST_THIRD_PARTY = {"google": "protobuf, the one library in the guest image"}

# Packages that must never import one another, whatever the tiers say (ARCHITECTURE.md).
FORBIDDEN: dict[tuple[str, str], str] = {
    ("pykata.hypervisor", "pykata.sandbox"): "the hypervisor is below the sandbox",
    ("pykata.hypervisor", "pykata.network"): "taps reach the driver as plain device values (resources)",
    ("pykata.hypervisor", "pykata.factory"): "the factory hands the driver a RestoreSource value",
    ("pykata.hypervisor", "pykata.agentapi"): "readiness probes that talk to the agent come from above",
    ("pykata.network", "pykata.hypervisor"): "resources.network turns a PodNetwork into NetDevices",
    ("pykata.agentapi", "pykata.hypervisor"): "the agent client knows sockets, not VMs",
}
# The shim, the CLI and the SDK reach the agent only through Sandbox; they may name its error types.
AGENT_CLIENT = "pykata.agentapi"
AGENT_CLIENT_ALLOWED = {"pykata.agentapi.errors": "error types the shim maps to containerd's codes"}


def layer(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _graph() -> ImportGraph:
    return ImportGraph.read(SRC, "pykata")


def _where(graph: ImportGraph, source_layer: str, target_layer: str) -> list[str]:
    return sorted({f"{i.source}:{i.line} -> {i.target}" for i in graph.imports
                   if layer(i.source) == source_layer and layer(i.target) == target_layer
                   and (i.source, i.target) not in EXEMPT_EDGES})


def test_every_package_has_a_tier() -> None:
    graph = _graph()
    unknown = sorted({layer(m) for m in graph.modules} - set(TIERS) - {GUEST})
    assert not unknown, f"new top-level package(s) {unknown}: give them a tier in this test"


def test_no_module_cycle() -> None:
    found = cycles(_graph().edges(skip=EXEMPT_EDGES))
    assert not found, "import cycles between modules:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_package_cycle() -> None:
    graph = _graph()
    packages = collapse(graph.edges(skip=EXEMPT_EDGES), {m: layer(m) for m in graph.modules})
    found = cycles(packages)
    detail = [f"{' <-> '.join(c)}: " + "; ".join(
        w for a in c for b in c if a != b for w in _where(graph, a, b)) for c in found]
    assert not found, "import cycles between packages:\n" + "\n".join(detail)


def test_imports_point_down_the_layers() -> None:
    graph = _graph()
    wrong = []
    for imp in graph.imports:
        if (imp.source, imp.target) in EXEMPT_EDGES:
            continue
        src, dst = layer(imp.source), layer(imp.target)
        if src in (dst, GUEST):
            continue
        if dst == GUEST:
            wrong.append(f"{imp.source}:{imp.line} imports the guest agent {imp.target}")
            continue
        reason = FORBIDDEN.get((src, dst))
        if reason is not None:
            wrong.append(f"{imp.source}:{imp.line} -> {imp.target}: forbidden ({reason})")
        elif TIERS[src] < TIERS[dst]:
            wrong.append(f"{imp.source}:{imp.line} -> {imp.target}: upward ({src} is below {dst})")
        elif TIERS[src] == TIERS[dst] and (src, dst) not in SAME_TIER:
            wrong.append(f"{imp.source}:{imp.line} -> {imp.target}: within a tier ({src}, {dst})")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_shim_cli_and_sdk_reach_the_agent_only_through_sandbox() -> None:
    graph = _graph()
    wrong = [f"{i.source}:{i.line} -> {i.target}" for i in graph.imports
             if layer(i.source) in ("pykata.shim", "pykata.cli", "pykata.sdk")
             and layer(i.target) == AGENT_CLIENT and i.target not in AGENT_CLIENT_ALLOWED]
    assert not wrong, "talks to the agent without Sandbox:\n" + "\n".join(sorted(wrong))


def test_guest_agent_imports_only_what_the_guest_has() -> None:
    graph = _graph()
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    wrong = [f"{i.source}:{i.line} -> {i.target}" for i in graph.imports
             if layer(i.source) == GUEST and layer(i.target) not in GUEST_MAY_IMPORT]
    for module, names in graph.external.items():
        if layer(module) == GUEST:
            extra = sorted(names - stdlib - set(GUEST_THIRD_PARTY))
            wrong += [f"{module} -> {name} (not in the guest image)" for name in extra]
    assert not wrong, "the guest agent imports host-only code:\n" + "\n".join(sorted(wrong))


def test_the_checker_sees_hidden_imports(tmp_path: Path) -> None:
    """The reader is not blind to the imports the rules are about (a checker that found nothing
    would pass everything): function-local, TYPE_CHECKING, relative and re-exported ones."""
    pkg = tmp_path / "demo"
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("from demo.low.impl import Thing\n")
    (pkg / "low" / "impl.py").write_text("class Thing: ...\n")
    (pkg / "high.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from demo.low import Thing\n"
        "def f():\n    from . import other\n")
    (pkg / "other.py").write_text("import demo.high\n")
    graph = ImportGraph.read(tmp_path, "demo")
    edges = {(i.source, i.target, i.local) for i in graph.imports}
    assert ("demo.high", "demo.low.impl", False) in edges  # TYPE_CHECKING, followed through the re-export
    assert ("demo.high", "demo.other", True) in edges       # function-local, relative
    assert cycles(graph.edges()) == [["demo.high", "demo.other"]]
