"""The layers import downward only, and no module imports back into a module that imports it.

    thanos/  <  exporters/  <  runtime_bench/  <  cli.py

Every import counts, including those inside functions (lazy imports of optional backends too):
a lazy import is still a dependency. Read with `ast`, so nothing is executed.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"thanos": 0, "exporters": 1, "runtime_bench": 2, "cli": 3}


def project_modules() -> dict[str, Path]:
    found = {"cli": ROOT / "cli.py"}
    for package in ("thanos", "exporters", "runtime_bench"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imported_modules(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules that `name` imports: `from pkg import sub` counts as `pkg.sub` when that is a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return {m for m in out if m.split(".")[0] in LAYERS and m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    known = project_modules()
    return {name: imported_modules(name, path, known) for name, path in known.items()}


def test_every_import_points_down_or_sideways():
    upward = [f"{name} imports {target}" for name, targets in import_graph().items() for target in sorted(targets)
              if LAYERS[target.split(".")[0]] > LAYERS[name.split(".")[0]]]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_graph_is_read_correctly():
    graph = import_graph()  # a check on the checker: known edges are found, lazy ones included
    assert "thanos.api" in graph["thanos.driver"]
    assert "exporters.tensorrt_engine" in graph["exporters"]  # imported inside a function
    assert "thanos.config" in graph["cli"]


def test_click_lives_in_the_cli_only():
    users = []
    for name, path in project_modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] == "click" for n in names):
                users.append(name)
    assert set(users) == {"cli"}, f"click imported outside cli.py: {sorted(set(users) - {'cli'})}"
