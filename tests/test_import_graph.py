"""The static import graph of the four rooms (DESIGN.md): layered, and free of cycles between files.

Every import statement counts, a function-level (lazy) one included: a lazy import that closes a
circle hides the circle without removing it.
"""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# room -> the rooms it may import (DESIGN.md, "Rooms"); nothing imports jobs/
MAY_IMPORT = {"kernels": set(), "cluster": set(), "serve_apps": {"kernels", "cluster"},
              "jobs": {"kernels", "cluster", "serve_apps"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for room in MAY_IMPORT for path in (REPO / room).rglob("*.py")}


def imported_names(tree: ast.AST, package: str) -> set[str]:
    """Dotted names of what a file imports; `from a import b` names a.b (a module, or a name in a)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.update(f"{base}.{alias.name}" for alias in node.names)
            names.add(base)
    return names


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest project module a dotted name starts with."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = {resolve(n, modules) for n in imported_names(ast.parse(path.read_text()), package)}
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layering_breaches(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{module} imports {target}" for module, targets in graph.items() for target in targets
                  if target.split(".")[0] not in MAY_IMPORT[module.split(".")[0]] | {module.split(".")[0]})


def test_no_two_files_import_each_other_even_through_others():
    assert cycles(import_graph()) == []


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same graph between folders: jobs/qat.py is in `jobs`, jobs/compress/gptq.py in `jobs.compress`."""
    packages = {name for name, path in project_modules().items() if path.name == "__init__.py"}
    folder = {name: name if name in packages else name.rpartition(".")[0] for name in graph}
    collapsed: dict[str, set[str]] = {package: set() for package in folder.values()}
    for module, targets in graph.items():
        collapsed[folder[module]] |= {folder[t] for t in targets} - {folder[module]}
    return collapsed


def test_no_two_folders_import_each_other():
    """A library folder never reaches back into an entry module or a folder that uses it."""
    assert cycles(package_graph(import_graph())) == []


def test_each_room_imports_only_the_rooms_below_it():
    assert layering_breaches(import_graph()) == []


def test_the_checks_find_a_planted_cycle_and_breach():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layering_breaches({"cluster.cli": {"jobs.qat", "cluster.store"}}) == ["cluster.cli imports jobs.qat"]
    graph = import_graph()  # and the graph is the real one: a known edge, a lazy import included
    assert "kernels.quant" in graph["kernels.quant_linear"]
    assert "kernels.cpu_ops" in graph["kernels.paged_attention"]
