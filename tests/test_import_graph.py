"""Each package's modules import one another without cycles, and without hidden imports.

The graph is read from the source (ast), nothing is imported. An edge ``a -> b`` is a
module-level import in ``a`` of ``b``, a module of the same package: absolute or relative,
``from x import y`` counting as an import of ``x.y`` when ``y`` is a submodule; importing a
submodule also imports the packages above it. Imports under ``if TYPE_CHECKING:`` never run
and are no edges.

An import of the same package inside a function hides an edge from this check (the usual way
to dodge a cycle), so one is refused unless its line says why it is there with ``# lazy:``
(for instance command-line start-up time).

Symlinked folders are skipped: ``blender_addon/wire`` is ``engine/wire``, which is checked as
part of ``engine``.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass, field

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Module:
    name: str
    path: str
    is_package: bool
    imports: set[str] = field(default_factory=set)
    """Modules of the same package imported at module level."""
    hidden: list[str] = field(default_factory=list)
    """``path:line: import`` of same-package imports inside functions without ``# lazy:``."""


def package_modules(package: str) -> dict[str, Module]:
    """Every module of ``package`` (a folder under the repository root), by dotted name."""
    modules = {}
    top = os.path.join(ROOT, package)
    for folder, dirs, files in os.walk(top):
        dirs[:] = sorted(
            d
            for d in dirs
            if not os.path.islink(os.path.join(folder, d))
            and os.path.isfile(os.path.join(folder, d, "__init__.py"))
        )
        parts = os.path.relpath(folder, ROOT).split(os.sep)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            stem = name[:-3]
            dotted = ".".join(parts if stem == "__init__" else [*parts, stem])
            path = os.path.join(folder, name)
            modules[dotted] = Module(dotted, path, stem == "__init__")
    return modules


def _resolve(module: Module, node: ast.ImportFrom) -> str:
    """The absolute module name a ``from ... import`` statement starts from."""
    if not node.level:
        return node.module or ""
    base = module.name.split(".")
    if not module.is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _targets(module: Module, node: ast.Import | ast.ImportFrom, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``node`` imports, with the packages above them."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        source = _resolve(module, node)
        names = []
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            names.append(submodule if submodule in known else source)
    targets = set()
    for name in names:
        parts = name.split(".")
        for end in range(1, len(parts) + 1):
            target = ".".join(parts[:end])
            # Packages above the importing module are already imported before it runs.
            if target in known and not module.name.startswith(target + "."):
                targets.add(target)
    targets.discard(module.name)
    return targets


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def read_imports(modules: dict[str, Module]) -> None:
    """Fill every module's ``imports`` and ``hidden`` from its source."""
    known = set(modules)
    for module in modules.values():
        with open(module.path, encoding="utf-8") as handle:
            source = handle.read()
        lines = source.splitlines()
        tree = ast.parse(source, module.path)

        def visit(
            node: ast.AST, in_function: bool, module: Module = module, lines: list[str] = lines
        ) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _is_type_checking(child):
                    for other in child.orelse:
                        visit(other, in_function)
                    continue
                if isinstance(child, ast.Import | ast.ImportFrom):
                    targets = _targets(module, child, known)
                    if not in_function:
                        module.imports |= targets
                    elif targets:
                        text = lines[child.lineno - 1 : child.end_lineno]
                        if not any("# lazy:" in line for line in text):
                            where = os.path.relpath(module.path, ROOT)
                            module.hidden.append(f"{where}:{child.lineno}: {text[0].strip()}")
                    continue
                nested = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                visit(child, in_function or nested)

        visit(tree, False)


def find_cycles(modules: dict[str, Module]) -> list[list[str]]:
    """One cycle per strongly connected group of modules (Tarjan), each as a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        on_stack.add(name)
        for target in sorted(modules[name].imports):
            if target not in index:
                connect(target)
                low[name] = min(low[name], low[target])
            elif target in on_stack:
                low[name] = min(low[name], index[target])
        if low[name] == index[name]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == name:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for name in sorted(modules):
        if name not in index:
            connect(name)
    return [_cycle_in(group, modules) for group in groups]


def _cycle_in(group: list[str], modules: dict[str, Module]) -> list[str]:
    """A closed path through the first module of a strongly connected group."""
    members = set(group)
    start = group[0]
    path = [start]
    seen = {start}
    while True:
        for target in sorted(modules[path[-1]].imports & members):
            if target == start and len(path) > 1:
                return [*path, start]
        unvisited = sorted((modules[path[-1]].imports & members) - seen)
        if not unvisited:
            # Every member reaches start; fall back to a breadth-first path back to it.
            return [*path, *_path_to(path[-1], start, modules, members)]
        path.append(unvisited[0])
        seen.add(unvisited[0])


def _path_to(origin: str, goal: str, modules: dict[str, Module], members: set[str]) -> list[str]:
    previous: dict[str, str] = {}
    queue = [origin]
    while queue:
        current = queue.pop(0)
        for target in sorted(modules[current].imports & members):
            if target not in previous and target != origin:
                previous[target] = current
                if target == goal:
                    steps = [goal]
                    while steps[-1] in previous and previous[steps[-1]] != origin:
                        steps.append(previous[steps[-1]])
                    return steps[::-1]
                queue.append(target)
    return [goal]


PACKAGES = ["engine", "blender_addon"]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(package):
    modules = package_modules(package)
    assert len(modules) > 1
    read_imports(modules)
    cycles = find_cycles(modules)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_hidden_imports_of_the_same_package(package):
    modules = package_modules(package)
    read_imports(modules)
    hidden = [line for module in modules.values() for line in module.hidden]
    assert not hidden, (
        "imports of the same package inside functions (move them to the top, or say why "
        "with a '# lazy:' comment):\n" + "\n".join(hidden)
    )


def test_the_graph_sees_cycles_and_hidden_imports(tmp_path, monkeypatch):
    package = tmp_path / "demo"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "b.py").write_text("from demo import c\n")
    (package / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from demo import d\n"
        "def f():\n    from . import a\n"
        "def g():\n    from . import a  # lazy: start-up time\n"
    )
    (package / "d.py").write_text("import demo.a\n")
    monkeypatch.setattr(f"{__name__}.ROOT", str(tmp_path))
    modules = package_modules("demo")
    read_imports(modules)
    assert modules["demo.a"].imports == {"demo.sub", "demo.sub.b"}
    assert modules["demo.sub.b"].imports == {"demo.c"}
    assert modules["demo.c"].imports == set()
    assert modules["demo.d"].imports == {"demo.a"}
    assert len(modules["demo.c"].hidden) == 1
    assert find_cycles(modules) == []
    (package / "c.py").write_text("from .d import *\n")
    modules = package_modules("demo")
    read_imports(modules)
    assert find_cycles(modules) == [["demo.a", "demo.sub.b", "demo.c", "demo.d", "demo.a"]]
