"""The package's imports flow one way: hf, cli -> api -> ops -> backends (registry -> each backend)
-> _core, jit. Read from the source (every import statement, lazy ones inside functions included),
so a cycle hidden behind a lazy import fails here as much as one at the top of a module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "prefix_kernels"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def import_graph() -> dict:
    """{module: set of package modules it imports}, a `from X import y` counting as an import of
    X.y when that is a module, else of X."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module) if node.level else (node.module or "")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # prefix_kernels.x.attr -> prefix_kernels.x
                    target = target.rpartition(".")[0]
                if target.startswith("prefix_kernels") and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def _cycle(graph: dict):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_graph_sees_lazy_imports():
    graph = import_graph()
    assert "prefix_kernels.hf" in graph["prefix_kernels"]  # apply_prefix_kernels imports it in its body
    assert "prefix_kernels.backends.triton.train" in graph["prefix_kernels.backends.triton"]


def test_no_import_cycle():
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


LAYERS = {  # a module under the key may import only package modules under the listed prefixes
    "prefix_kernels._core": ("prefix_kernels._core",),
    "prefix_kernels.jit": ("prefix_kernels._core", "prefix_kernels.jit"),
    "prefix_kernels.backends": ("prefix_kernels.backends", "prefix_kernels._core", "prefix_kernels.jit"),
    "prefix_kernels.ops": ("prefix_kernels.backends", "prefix_kernels._core"),
    "prefix_kernels.api": ("prefix_kernels.ops", "prefix_kernels.backends", "prefix_kernels._core"),
    # the HF layer knows nothing of Triton or of any backend: it calls the public functions
    "prefix_kernels.hf": ("prefix_kernels.hf", "prefix_kernels.api", "prefix_kernels._core"),
}


def _allowed(module: str, target: str) -> bool:
    for layer, allowed in LAYERS.items():
        if module == layer or module.startswith(layer + "."):
            return any(target == a or target.startswith(a + ".") for a in allowed)
    return True


def test_layers():
    wrong = [(m, t) for m, targets in import_graph().items() for t in targets if not _allowed(m, t)]
    assert not wrong, f"imports against the layering (module -> import): {wrong}"


def test_backends_import_no_other_backend():
    """Each backend folder stands alone; only the registry (and decode_choice's user) sees them all."""
    graph = import_graph()
    names = ("triton", "composed", "cpu_kernel", "torch_split", "cuda", "reference")
    wrong = []
    for module, targets in graph.items():
        for own in names:
            if module.startswith(f"prefix_kernels.backends.{own}"):
                wrong += [(module, t) for t in targets for other in names
                          if other != own and t.startswith(f"prefix_kernels.backends.{other}")]
    assert not wrong, wrong
