"""The package's shape: no module imports another that imports it back, at module level or inside a function."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "src" / "soda_distill"


def import_graph() -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports anywhere in its source."""
    modules = {".".join(("soda_distill", *f.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): f
               for f in PACKAGE.rglob("*.py")}
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                parts = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(parts + ([node.module] if node.module else []))
                candidates = [target, *(f"{target}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {c for c in candidates if c in modules and c != name}
    return graph


def cycle_from(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path of imports from `start` back to itself, or None."""
    paths, seen = [[start]], set()
    while paths:
        path = paths.pop()
        for nxt in sorted(graph[path[-1]]):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                paths.append(path + [nxt])
    return None


def test_no_import_cycles_lazy_imports_included():
    graph = import_graph()
    assert {"soda_distill.endpoint", "soda_distill.batch", "soda_distill.evaluation.paired"} <= set(graph)
    assert "soda_distill.records" in graph["soda_distill.batch"]  # relative imports are followed
    cycles = [c for c in (cycle_from(graph, m) for m in sorted(graph)) if c]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_a_cycle_is_found():
    assert cycle_from({"a": {"b"}, "b": {"c"}, "c": {"a"}}, "a") == ["a", "b", "c", "a"]
    assert cycle_from({"a": {"b"}, "b": set()}, "a") is None
