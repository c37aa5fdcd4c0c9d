"""No import circle within ``qstar`` or within ``qstar_kernels``, lazy imports inside functions
included. The imports are read with ``ast`` (nothing is imported), and an edge ``a -> b`` is an
explicit import of ``b`` by ``a`` (``from pkg import sub`` is an edge to the submodule ``pkg.sub``
when there is one, else to ``pkg``); a circle is a strongly connected set of modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules(package: str) -> dict[str, Path]:
    """Module name -> file, for every Python file of ``package``."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports (anywhere in the file)."""
    modules = _modules(package)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                # The longest module of the package that the dotted name starts with.
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_qstar_kernels_has_no_import_circle():
    graph = import_graph("qstar_kernels")
    assert "qstar_kernels.dispatch" in graph and graph["qstar_kernels.attention"]
    assert circles(graph) == []


def test_backends_never_import_the_ops_or_the_dispatch():
    """Data flows one way: public op -> dispatch -> custom op -> backend."""
    graph = import_graph("qstar_kernels")
    upstream = {
        "qstar_kernels",
        "qstar_kernels.attention",
        "qstar_kernels.mixing",
        "qstar_kernels.sampling",
        "qstar_kernels.dispatch",
        "qstar_kernels.custom_ops",
        "qstar_kernels.lm_head_tiled",
    }
    for module, imports in graph.items():
        if module.startswith("qstar_kernels.backends"):
            assert not imports & upstream, f"{module} imports {sorted(imports & upstream)}"


def test_qstar_has_no_import_circle():
    assert circles(import_graph("qstar")) == []
