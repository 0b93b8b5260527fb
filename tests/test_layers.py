"""The package's layering, read from the source (no import runs): no module imports, even
lazily inside a function, a module that imports it back; the library never imports the command
line; and the modules a command's ``--help`` needs import no torch (bench/cli_help.py times it)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.offline

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "deepcount"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every deepcount module -> the deepcount modules it imports anywhere in its source (the
    package itself only counts its top level: its PEP 562 ``__getattr__`` loads ``predict`` on
    first use of ``Counter``, which is not a dependency of its submodules)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        nodes = tree.body if name == "deepcount" else ast.walk(tree)
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" for a in node.names] if node.module is None else [base]
                deps |= {t if t in files else t.rsplit(".", 1)[0] for t in targets}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deepcount"):
                deps.add(node.module if node.module in files else node.module.rsplit(".", 1)[0])
        graph[name] = deps - {name}
    return graph


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    cycles = []
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m == start:
                cycles.append(start)
                break
            if m not in seen:
                seen.add(m)
                todo.extend(graph.get(m, ()))
    assert not cycles, f"modules on an import cycle: {sorted(cycles)}"


def test_the_library_never_imports_the_command_line():
    upward = {m: sorted(d for d in deps if d.startswith("deepcount.cli"))
              for m, deps in import_graph().items() if not m.startswith("deepcount.cli")}
    assert not any(upward.values()), {m: d for m, d in upward.items() if d}


def test_config_datasets_and_the_command_modules_import_no_torch():
    code = ("import sys\nimport deepcount.config, deepcount.datasets, deepcount.evaluation, deepcount.report\n"
            "import deepcount.cli.train, deepcount.cli.export, deepcount.cli.evaluate, deepcount.cli.report\n"
            "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(PACKAGE.parent), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
