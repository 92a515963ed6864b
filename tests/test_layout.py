"""The house rules: the library imports without Ray, Ray stays in jobs/ and the CLI's edge, and no
two modules import each other (directly or round a longer loop)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "twostream"
EDGE = ("twostream.cli", "twostream.commands")  # the CLI: the one place besides jobs/ that may start Ray


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_modules() -> dict[str, Path]:
    modules = {module_name(p): p for p in LIBRARY.rglob("*.py")}
    return {m: p for m, p in sorted(modules.items()) if not m.startswith(EDGE)}


def imported_names(path: Path) -> set[str]:
    """What each ``import`` anywhere in the file (inside functions too) names: ``import a.b`` gives
    ``a.b``, ``from a import b`` gives ``a.b`` (a submodule, or the name ``b`` of module ``a``)."""
    names: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.update(f"{base}.{alias.name}" for alias in node.names)  # a submodule, or a name in `base`
    return names


def test_no_library_module_names_ray_or_jobs() -> None:
    offenders = {
        module: sorted(n for n in imported_names(path) if n.split(".")[0] in ("ray", "jobs"))
        for module, path in library_modules().items()
    }
    assert {m: n for m, n in offenders.items() if n} == {}


def test_jobs_do_not_import_the_cli() -> None:
    offenders = {
        path.name: sorted(n for n in imported_names(path) if n.startswith(EDGE))
        for path in (REPO / "jobs").glob("*.py")
    }
    assert {m: n for m, n in offenders.items() if n} == {}


def test_every_library_module_imports_with_ray_unimportable() -> None:
    modules = list(library_modules())
    assert len(modules) > 30  # the walk found the packages
    code = (
        "import importlib, sys\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('ray', 'jobs'):\n"
        "            raise ImportError(f'{name} is not importable in this test')\n"
        "sys.meta_path.insert(0, Refuse())\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "assert not any(m.split('.')[0] in ('ray', 'jobs') for m in sys.modules), 'ray or jobs got imported'\n"
        "print('imported', len(sys.modules) and " + str(len(modules)) + ")\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"imported {len(modules)}" in result.stdout


def test_no_import_cycles_between_modules() -> None:
    modules = {module_name(p): p for p in LIBRARY.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        for name in imported_names(path):
            # `from pkg import sub` names pkg.sub; keep the longest existing module it names
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets

    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert cycles == []
