"""The import rules of qjax, checked on the source (no imports run): ``python scripts/check_imports.py``.

1. **No private names across modules.** ``from M import _x`` and ``M._x`` (``M`` a module of
   ``qjax``, ``experiments`` or ``tests``) are refused outside ``M`` itself: what two modules share
   is public in the module where it belongs.
2. **Layers.** A package imports only the packages below it (``docs/ARCHITECTURE.md``), so
   ``qjax.numerics`` never imports ``qjax.nn`` and ``qjax`` never imports ``experiments``;
   ``examples`` (plug-ins) import ``qjax`` and ``experiments.tasks`` only.
   ``qjax.kernels.experimental`` is reached by name only: no module outside it imports it at module
   level (a caller that names an experimental path imports it inside the function that needs it).

Prints ``path:line: problem`` for each finding and exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys
from collections.abc import Iterator, Sequence

ROOTS = ("qjax", "experiments", "examples", "tests")
FIRST_PARTY = ("qjax", "experiments", "examples", "tests")

# package -> the first-party packages it may import (besides itself). A module belongs to the
# longest package prefix listed here; tests may import anything.
LAYERS: dict[str, tuple[str, ...]] = {
    "qjax.numerics": (),
    "qjax.ste": ("qjax.numerics",),
    "qjax.kernels": ("qjax.numerics",),
    "qjax.nn": ("qjax.numerics", "qjax.ste", "qjax.kernels"),
    "qjax.models": ("qjax.numerics", "qjax.ste", "qjax.kernels", "qjax.nn"),
    "qjax.training": ("qjax.numerics", "qjax.ste", "qjax.kernels", "qjax.nn"),
    "qjax.methods": ("qjax.numerics", "qjax.ste", "qjax.kernels", "qjax.nn", "qjax.models"),
    "qjax": ("qjax",),  # the top-level re-exports
    "experiments.records": ("qjax",),
    "experiments.tasks": ("qjax",),
    "experiments.sweep": ("qjax", "experiments.records", "experiments.tasks"),
    "experiments.kernels": ("qjax", "experiments.records"),
    "experiments.scripts": ("qjax", "experiments.records", "experiments.tasks", "experiments.sweep"),
    "experiments": ("experiments",),
    "examples": ("qjax", "experiments.tasks"),  # plug-ins, written as a user would
    "tests": ("qjax", "experiments", "examples", "tests"),
}
EXPERIMENTAL = "qjax.kernels.experimental"


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str, root: pathlib.Path) -> bool:
    base = root.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def package_of(module: str) -> str:
    """The :data:`LAYERS` package a module belongs to (its longest listed prefix)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return ".".join(parts[:n])
    return module


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def allowed(src: str, dst: str) -> bool:
    package = package_of(src)
    return within(dst, package) or any(within(dst, p) for p in LAYERS.get(package, ()))


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def imports(tree: ast.Module) -> Iterator[tuple[ast.stmt, ast.alias, str, str | None, bool]]:
    """``(node, alias, module, imported name or None, at module level)`` of every absolute import."""
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node, a, a.name, None, id(node) in top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                yield node, a, node.module, a.name, id(node) in top


def check_file(path: pathlib.Path, root: pathlib.Path) -> list[str]:
    src = module_name(path, root)
    where = path.relative_to(root)
    if package_of(src) in ("qjax", "experiments") and src not in ("qjax", "experiments"):
        return [f"{where}:1: {src} is in no layer; add its package to LAYERS in scripts/check_imports.py"]
    tree = ast.parse(path.read_text(), filename=str(path))
    problems = []
    aliases: dict[str, str] = {}  # local name -> the first-party module it is bound to
    for node, alias, module, name, top_level in imports(tree):
        if module.split(".")[0] not in FIRST_PARTY:
            continue
        target = module if name is None or not is_module(f"{module}.{name}", root) else f"{module}.{name}"
        if name is not None and private(name) and target == module and module != src:
            problems.append(f"{where}:{node.lineno}: imports the private name {name} of {module}")
        if not allowed(src, target):
            may = ", ".join(LAYERS.get(package_of(src), ())) or "no first-party package"
            problems.append(
                f"{where}:{node.lineno}: {package_of(src)} imports {target} (it may import: {may})"
            )
        reaches_experimental = within(target, EXPERIMENTAL) and not within(src, EXPERIMENTAL)
        if top_level and reaches_experimental and package_of(src).startswith("qjax"):
            problems.append(
                f"{where}:{node.lineno}: imports {target} at module level; the default paths must not "
                "reach it: import it inside the function of the path that names it"
            )
        if name is None and alias.asname is None:
            aliases[module.split(".")[0]] = module.split(".")[0]  # import a.b binds a
        elif name is None or target != module:  # import a.b as c; from a import b (b a module)
            aliases[alias.asname or alias.name] = target
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and private(node.attr)
            and isinstance(node.value, ast.Name)
            and aliases.get(node.value.id, src) != src
        ):
            owner = aliases[node.value.id]
            problems.append(f"{where}:{node.lineno}: uses the private name {node.attr} of {owner}")
    return problems


def check(root: pathlib.Path, roots: Sequence[str] = ROOTS) -> list[str]:
    problems: list[str] = []
    for top in roots:
        for path in sorted((root / top).rglob("*.py")):
            problems += check_file(path, root)
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parent.parent)
    args = parser.parse_args(argv)
    problems = check(args.root)
    for p in problems:
        print(p)
    if problems:
        print(
            f"{len(problems)} import problem(s); see scripts/check_imports.py for the rules", file=sys.stderr
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
