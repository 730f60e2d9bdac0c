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


# The floors (issue 29, README "Architecture"), bottom up: a module imports from its own floor or below,
# never from above. A module's floor is that of the longest prefix listed here (the package itself,
# ``g2e_jax``, only by its name); every module must have one, so a new module is placed on purpose.
FLOORS = (
    ("utilities", ("g2e_jax.io", "g2e_jax.paths", "g2e_jax.distributed", "g2e_jax.mesh", "g2e_jax.aot",
                   "g2e_jax.config_sections", "g2e_jax.config_utils", "g2e_jax.compile_cache", "g2e_jax.plots")),
    ("formats", ("g2e_jax.data", "g2e_jax.prompts", "g2e_jax.tokenization")),
    ("models", ("g2e_jax.models", "g2e_jax.adapters")),
    ("programs", ("g2e_jax.programs", "g2e_jax.train.loss", "g2e_jax.train.step", "g2e_jax.saha")),
    ("host objects", ("g2e_jax.preprocess", "g2e_jax.pipeline", "g2e_jax.weights", "g2e_jax.checkpoints",
                      "g2e_jax.encode_loop", "g2e_jax.embed_cache", "g2e_jax.embed", "g2e_jax.train.batch",
                      "g2e_jax.train.data", "g2e_jax.train.feed")),
    ("jobs", ("g2e_jax.eval", "g2e_jax.mine", "g2e_jax.prepare", "g2e_jax.check_data", "g2e_jax.compare",
              "g2e_jax.train", "g2e_jax.export", "g2e_jax.analysis", "g2e_jax.integrations")),
    ("entry points", ("g2e_jax", "g2e_jax.cli", "g2e_jax.demo")),
)  # fmt: skip


def floor_of(module: str, floors=FLOORS) -> int | None:
    """The index in ``floors`` of the longest listed prefix of ``module`` (None: not placed)."""
    best = None
    for level, (_, prefixes) in enumerate(floors):
        for prefix in prefixes:
            below = "." in prefix and module.startswith(prefix + ".")
            if (module == prefix or below) and (best is None or len(prefix) > best[1]):
                best = (level, len(prefix))
    return None if best is None else best[0]


def upward_imports(edges: dict[str, set[str]], floors=FLOORS) -> list[str]:
    """Every import from a lower floor to a higher one, and every module with no floor."""
    found = [f"{m}: on no floor (add it to FLOORS)" for m in edges if floor_of(m, floors) is None]
    for mod, targets in edges.items():
        here = floor_of(mod, floors)
        for target in sorted(targets):
            there = floor_of(target, floors)
            if here is not None and there is not None and there > here:
                found.append(f"{mod} ({floors[here][0]}) imports {target} ({floors[there][0]})")
    return found


def test_every_module_imports_only_from_its_floor_or_below():
    edges, _ = import_graph(PACKAGE)
    assert len(edges) > 50
    found = upward_imports(edges)
    assert not found, "\n".join(found)


def test_an_upward_import_and_an_unplaced_module_are_found(tmp_path):
    """The floor check on a package written to fail it: a format module importing a model, and a
    module that no floor lists."""
    pkg = tmp_path / "pkg"
    for sub in ("data", "models"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "rows.py").write_text("from pkg.models import net\n")
    (pkg / "models" / "net.py").write_text("from pkg.data import rows\n")
    (pkg / "stray.py").write_text("")
    floors = (("formats", ("pkg.data",)), ("models", ("pkg.models",)), ("top", ("pkg",)))
    edges, _ = import_graph(pkg)
    found = upward_imports({m: t for m, t in edges.items() if m != "pkg.stray"}, floors)
    assert found == ["pkg.data.rows (formats) imports pkg.models.net (models)"]
    floors_without_top = floors[:2]
    assert "pkg.stray: on no floor (add it to FLOORS)" in upward_imports(edges, floors_without_top)


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
