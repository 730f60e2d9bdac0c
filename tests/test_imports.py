"""The package's import graph, read from the source (deferred imports inside functions included):
no cycle, and JAX's private modules reached from one place only (issue 29)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "g2e_jax"
# The coordination service's key-value store has no public JAX API: one wrapper holds the import.
PRIVATE_JAX_ALLOWED = {"g2e_jax.distributed"}


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph(root: Path) -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """(module -> the package's modules it imports, module -> the ``jax._src`` modules it imports).

    ``from pkg import name`` counts as importing ``pkg.name`` when that is a module, else ``pkg``;
    importing one's own parent package is not an edge (Python has run it already)."""
    mods = modules(root)

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    private: dict[str, list[str]] = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
                targets = [owner(n) for n in names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                names = [base]
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else owner(base) for a in node.names]
            else:
                continue
            private.setdefault(mod, []).extend(n for n in names if n == "jax._src" or n.startswith("jax._src."))
            edges[mod].update(t for t in targets if t and t != mod and not mod.startswith(t + "."))
    return edges, {m: v for m, v in private.items() if v}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_package_has_no_import_cycle():
    edges, _ = import_graph(PACKAGE)
    assert len(edges) > 50  # the walk found the package
    found = cycles(edges)
    assert not found, "import cycles: " + "; ".join(
        " <-> ".join(f"{m} (imports {sorted(edges[m] & set(c))})" for m in c) for c in found
    )


# The floors below data/ (issue 29): data/ reads and writes formats with nothing of the models, the
# programs or the jobs above it.
UTILITIES = {"g2e_jax.io", "g2e_jax.paths", "g2e_jax.distributed", "g2e_jax.mesh", "g2e_jax.config_sections",
             "g2e_jax.config_utils"}  # fmt: skip


def test_data_imports_only_data_and_the_utilities():
    edges, _ = import_graph(PACKAGE)
    data = [m for m in edges if m == "g2e_jax.data" or m.startswith("g2e_jax.data.")]
    assert len(data) > 5
    upward = {m: sorted(t for t in edges[m] if not t.startswith("g2e_jax.data") and t not in UTILITIES)
              for m in data}  # fmt: skip
    assert not any(upward.values()), {m: t for m, t in upward.items() if t}


def test_private_jax_is_imported_in_one_place():
    _, private = import_graph(PACKAGE)
    assert set(private) == PRIVATE_JAX_ALLOWED, private


@pytest.mark.parametrize("deferred", [False, True])
def test_a_deliberate_cycle_and_private_import_are_found(tmp_path, deferred):
    """The checks above on a package written to fail them: a.py and b.py import each other (at the
    top, or the second inside a function, as data/check.py and data/prepared.py did), and c.py
    reaches into ``jax._src``."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    body = "def f():\n    from pkg import a\n" if deferred else "from .. import a\n"
    (pkg / "sub" / "b.py").write_text(body)
    (pkg / "c.py").write_text("from pkg import a\n\ndef g():\n    from jax._src import distributed\n")
    edges, private = import_graph(pkg)
    assert cycles(edges) == [["pkg.a", "pkg.sub.b"]]
    assert private == {"pkg.c": ["jax._src"]}


def test_no_package_attribute_shadows_its_submodule():
    """``models.backbone`` was a function hiding the module ``g2e_jax.models.backbone``: after
    ``import g2e_jax.models.backbone`` the name meant one or the other depending on import order."""
    import importlib

    mods = modules(PACKAGE)
    shadowed = []
    for name, path in mods.items():
        if path.name != "__init__.py":
            continue
        package = importlib.import_module(name)
        for sub in (m for m in mods if m.rpartition(".")[0] == name):
            attr = getattr(package, sub.rpartition(".")[2], None)
            if attr is not None and attr is not importlib.import_module(sub):
                shadowed.append(f"{name}.{sub.rpartition('.')[2]} is {type(attr).__name__}, not the module")
    assert not shadowed, shadowed
