"""The tree's shape, held by a test: who may import whom, no import circle, no module past its size.

Read from the source (every ``import``, also those inside functions), so a violation fails here
before it is a bug: the agent importing the viewer would put Textual in training environments; a
command importing another is how the old import circle of four commands began.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"icsmon": ROOT / "icsmon", "icsmon_agent": ROOT / "agent" / "icsmon_agent"}
#: A module past this many lines holds more than one idea (STYLE.md).
MAX_LINES = 450
#: Only the app draws: the rest of the viewer, and the agent above all, never import these.
UI_LIBRARIES = ("textual", "rich")


def modules(packages: dict[str, Path]) -> dict[str, Path]:
    """Every module of the packages by its dotted name (a package by its own name)."""
    found: dict[str, Path] = {}
    for top, root in packages.items():
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = [top, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """The modules ``name`` imports, anywhere in it: ``from pkg import sub`` is ``pkg.sub`` when
    that is a module (the package itself runs first, as it does for every import below it)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in _executed(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            subs = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
            yield from subs or [base]


def _executed(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node but those under ``if TYPE_CHECKING:`` (imports for the type checker only)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_executed(child)])
            continue
        yield node
        yield from _executed(node)


def import_graph(packages: dict[str, Path]) -> dict[str, set[str]]:
    found = modules(packages)
    # A compiled module (the agent's C kernel) is known by its stub: importing it is not
    # importing its package.
    compiled = {
        ".".join([top, *path.relative_to(root).with_suffix("").parts])
        for top, root in packages.items()
        for path in root.rglob("*.pyi")
    }
    known = set(found) | compiled
    return {name: set(imports_of(name, path, known)) for name, path in found.items()}


def _top(module: str) -> str:
    return module.split(".")[0]


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Each broken rule of the layout, said in a line."""
    found = []
    for module, imported in sorted(graph.items()):
        for target in sorted(imported):
            if _top(module) == "icsmon_agent" and _top(target) == "icsmon":
                found.append(f"{module} imports {target}: the agent never imports the viewer")
            if _top(target) in UI_LIBRARIES and not _within(module, "icsmon.tui"):
                found.append(f"{module} imports {target}: only icsmon.tui imports Textual or Rich")
            if (
                _within(module, "icsmon.commands")
                and _within(target, "icsmon.commands")
                and target not in ("icsmon.commands", "icsmon.commands.common", module)
            ):
                found.append(f"{module} imports {target}: no command imports another command")
            callers = ("icsmon.cli", "icsmon.commands")
            if _within(target, "icsmon.commands") and not any(_within(module, c) for c in callers):
                found.append(f"{module} imports {target}: only the command line imports commands")
            starters = ("icsmon.tui", "icsmon.commands")  # the commands start the app
            if _within(target, "icsmon.tui") and not any(_within(module, s) for s in starters):
                found.append(f"{module} imports {target}: the viewer's logic never imports the app")
    found += [f"import circle: {' -> '.join(cycle)}" for cycle in circles(graph)]
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each in a stable order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue  # outside the tree: the standard library, torch, zmq...
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_the_tree_keeps_its_import_contract() -> None:
    assert violations(import_graph(PACKAGES)) == []


def test_no_module_holds_more_than_one_idea_by_its_size() -> None:
    long = {
        name: n
        for name, path in modules(PACKAGES).items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"split these (over {MAX_LINES} lines): {long}"


def test_a_planted_violation_of_each_rule_is_reported(tmp_path: Path) -> None:
    """The checker itself can fail: each rule, broken once in a small tree, is named."""
    files = {
        "icsmon/__init__.py": "",
        "icsmon/feed.py": "from icsmon.store import Store\n",
        "icsmon/store.py": "def f():\n    from icsmon import feed\n",  # a circle, through a function
        "icsmon/render.py": "import rich.text\n",
        "icsmon/commands/__init__.py": "",
        "icsmon/commands/common.py": "",
        "icsmon/commands/tail.py": "from icsmon.commands import common\nfrom . import attach\n",
        "icsmon/commands/attach.py": "from icsmon.tui import app\n",
        "icsmon/tui/__init__.py": "",
        "icsmon/tui/app.py": "import textual\n",
        "icsmon/printing.py": "from icsmon.commands.tail import x\n",
        "icsmon_agent/__init__.py": "",
        "icsmon_agent/monitor.py": "import icsmon.wire\n",
        "icsmon/wire.py": "",
    }
    for relative, text in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    found = violations(
        import_graph({"icsmon": tmp_path / "icsmon", "icsmon_agent": tmp_path / "icsmon_agent"})
    )
    assert found == [
        "icsmon.commands.tail imports icsmon.commands.attach: no command imports another command",
        "icsmon.printing imports icsmon.commands.tail: only the command line imports commands",
        "icsmon.render imports rich.text: only icsmon.tui imports Textual or Rich",
        "icsmon_agent.monitor imports icsmon.wire: the agent never imports the viewer",
        "import circle: icsmon.feed -> icsmon.store",
    ], found
