"""The import graph of a source tree, read with `ast` (nothing is imported): every `import` and
`from ... import` of every module, including those inside functions and `if TYPE_CHECKING:` blocks.

`from pkg import name` is followed to the module that defines `name` when `pkg/__init__.py` only
re-exports it, so an edge names the module really depended on, not the package's front door.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the module imported (resolved as described above)
    line: int
    local: bool  # inside a function (runs on call, not on import)


@dataclass
class ImportGraph:
    modules: dict[str, Path] = field(default_factory=dict)
    imports: list[Import] = field(default_factory=list)
    external: dict[str, set[str]] = field(default_factory=dict)  # module -> top-level non-package names

    @classmethod
    def read(cls, src: Path, package: str) -> ImportGraph:
        graph = cls()
        for path in sorted((src / package).rglob("*.py")):
            parts = list(path.relative_to(src).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            graph.modules[".".join(parts)] = path
        trees = {name: ast.parse(path.read_text(), str(path)) for name, path in graph.modules.items()}
        reexports = {name: _reexports(name, graph.modules[name], tree) for name, tree in trees.items()
                     if graph.modules[name].name == "__init__.py"}
        for name, tree in trees.items():
            is_pkg = graph.modules[name].name == "__init__.py"
            for node, local in _walk(tree):
                for target in _targets(node, name, is_pkg):
                    top = target.split(".")[0]
                    if top != package:
                        graph.external.setdefault(name, set()).add(top)
                        continue
                    resolved = graph._resolve(target, reexports)
                    if resolved is not None and resolved != name:
                        graph.imports.append(Import(name, resolved, node.lineno, local))
        return graph

    def _resolve(self, target: str, reexports: dict[str, dict[str, str]]) -> str | None:
        for _ in range(5):  # follow re-exports a few packages deep
            if target in self.modules:
                return target
            owner, _, attr = target.rpartition(".")
            if owner in reexports and attr in reexports[owner]:
                target = reexports[owner][attr]
                continue
            while owner and owner not in self.modules:
                owner = owner.rpartition(".")[0]
            return owner or None
        return target if target in self.modules else None

    def edges(self, *, skip: Iterable[tuple[str, str]] = ()) -> dict[str, set[str]]:
        skipped = set(skip)
        out: dict[str, set[str]] = {m: set() for m in self.modules}
        for imp in self.imports:
            if (imp.source, imp.target) not in skipped:
                out[imp.source].add(imp.target)
        return out


def _walk(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    def visit(node: ast.AST, local: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, local
            inner = local or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            yield from visit(child, inner)
    return visit(tree, False)


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_pkg: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_pkg else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    return [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"] or [base]


def _reexports(name: str, path: Path, tree: ast.Module) -> dict[str, str]:
    """Names a package's __init__ binds with module-level `from X import name` (X absolute)."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                out[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan, iterative), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


def collapse(edges: dict[str, set[str]], group: dict[str, str]) -> dict[str, set[str]]:
    """The graph between groups (`group` maps each module to its group); edges within a group dropped."""
    out: dict[str, set[str]] = {g: set() for g in group.values()}
    for source, targets in edges.items():
        for target in targets:
            if group[source] != group[target]:
                out[group[source]].add(group[target])
    return out
