"""braze's modules form an acyclic import graph: every import counts, including the ones inside functions and
under TYPE_CHECKING (a lazy import only hides a cycle from the interpreter, not from a reader)."""

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent / "braze"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> nx.DiGraph:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import: climb level - 1 packages
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name and t != "braze":
                    graph.add_edge(name, t)
    return graph


def test_braze_has_no_import_cycles():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + [c[0]]) for c in cycles[:10])


def test_runtime_and_kernels_do_not_import_the_compiler():
    """Packages run on braze.runtime + braze.kernels alone."""
    graph = import_graph()
    lean = [m for m in graph if m.startswith(("braze.runtime", "braze.kernels"))]
    reach = set().union(*(nx.descendants(graph, m) for m in lean))
    assert not {m for m in reach if m.startswith(("braze.compiler", "braze.passes", "braze.codegen"))}
