"""Modules over 300 lines and the ten longest functions of ``twostream/`` and ``jobs/`` at a git
revision: ``python tools/module_sizes.py [REV]`` (default HEAD). Used for the redesign's before/after."""

from __future__ import annotations

import ast
import subprocess
import sys


def main(rev: str = "HEAD") -> None:
    names = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev], capture_output=True, text=True,
                           check=True).stdout.split()
    modules, functions = [], []
    for name in names:
        if not name.endswith(".py") or not name.startswith(("twostream/", "jobs/")):
            continue
        source = subprocess.run(["git", "show", f"{rev}:{name}"], capture_output=True, text=True, check=True).stdout
        if source.count("\n") > 300:
            modules.append((source.count("\n"), name))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, name, node.name))
    print("modules over 300 lines:")
    for lines, name in sorted(modules, reverse=True):
        print(f"  {name}: {lines}")
    print("ten longest functions:")
    for lines, name, func in sorted(functions, reverse=True)[:10]:
        print(f"  {name}::{func}: {lines}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
