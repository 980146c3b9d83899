"""The package's shape, read from its source with `ast`: no import cycle, the core never imports the lab,
no module grows past 400 lines without a stated reason.

Every import counts, at module level or inside a function (a function-level import is still a dependency;
hiding a cycle there only moves the failure to run time). Importing `zerokit.a.b` also runs
`zerokit/a/__init__.py`, so that edge is in the graph too.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "zerokit"
MAX_LINES = 400
# module -> why it may be longer than MAX_LINES (keep this short: split instead).
LONG_MODULES: dict[str, str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The zerokit modules `name` imports anywhere in its body (each one's nearest known module)."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, name, path.name == "__init__.py")
            for alias in node.names:  # `from zerokit.lab import memory` imports the submodule
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in known else base)
    found = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target.startswith("zerokit"):
            found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> modules whose code runs when it is imported (direct imports and their parent packages)."""
    mods = modules()
    known = set(mods)
    graph = {}
    for name, path in mods.items():
        edges = set()
        for target in imported_modules(name, path, known):
            parts = target.split(".")
            # importing a.b.c runs a/__init__, a/b/__init__, then a/b/c; the importer's own parent packages
            # already ran before it, so only an explicit import of one of them is an edge
            edges.update(p for i in range(1, len(parts)) if not name.startswith((p := ".".join(parts[:i])) + "."))
            edges.add(target)
        graph[name] = {t for t in edges if t in known and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    colour = dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == 1:
                return stack[stack.index(nxt):] + [nxt]
            if colour[nxt] == 0 and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        colour[node] = 2
        return None

    for node in sorted(graph):
        if colour[node] == 0 and (cycle := visit(node)):
            return cycle
    return None


def test_graph_reader_sees_every_kind_of_import(tmp_path):
    """The reader itself: function-level, relative and `from package import submodule` imports all count."""
    code = ("from . import b\n"
            "def f():\n    from .c import x\n    import zerokit.d.e\n"
            "from zerokit.lab import memory\n")
    path = tmp_path / "a.py"
    path.write_text(code)
    known = {"zerokit", "zerokit.pkg", "zerokit.pkg.b", "zerokit.pkg.c", "zerokit.d", "zerokit.d.e",
             "zerokit.lab", "zerokit.lab.memory"}
    assert imported_modules("zerokit.pkg.a", path, known) == {
        "zerokit.pkg.b", "zerokit.pkg.c", "zerokit.d.e", "zerokit.lab.memory"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_core_never_imports_the_lab():
    bad = sorted(f"{m} imports {t}" for m, targets in import_graph().items() if not m.startswith("zerokit.lab")
                 for t in targets if t == "zerokit.lab" or t.startswith("zerokit.lab."))
    assert not bad, "the core must not depend on the lab: " + "; ".join(bad)


def test_modules_stay_small():
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES and name not in LONG_MODULES}
    assert not long, f"modules over {MAX_LINES} lines (split them, or list one in LONG_MODULES with its reason): {long}"
    stale = [name for name in LONG_MODULES if name in modules()
             and len(modules()[name].read_text().splitlines()) <= MAX_LINES]
    assert not stale, f"LONG_MODULES lists modules that are no longer long; drop them: {stale}"
