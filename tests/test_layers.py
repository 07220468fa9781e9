"""The layers of docs/design.md §5: each package imports only the ones above it, and ``core``
imports neither Dask nor an I/O or plotting library."""

import ast
from pathlib import Path

import pytest

import dask_refine

PACKAGE = Path(dask_refine.__file__).parent
LAYERS = ("core", "io", "parallel", "jobs", "ui")
#: Libraries that read or write files, build graphs or draw: never imported by the kernels.
#: (pandas is allowed: ``pose_search`` uses its hash-based ``factorize``, pure and in memory.)
NOT_IN_CORE = ("dask", "distributed", "zarr", "mrcfile", "starfile", "fsspec", "s3fs", "bokeh",
               "matplotlib", "cryosparc")


def _imports(path: Path, root: Path) -> list[str]:
    """The absolute dotted module of every import in ``path`` (relative imports resolved
    against its package under ``root``, the folder holding ``dask_refine``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = path.relative_to(root).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                found.append(".".join(base + ((node.module,) if node.module else ())))
            else:
                found.append(node.module)
    return found


def violations(package: Path, layer: str) -> list[str]:
    """Every import in ``package/layer`` of a lower layer (or, in core, of a library that does
    I/O or builds graphs)."""
    allowed = set(LAYERS[:LAYERS.index(layer) + 1])
    bad = []
    for path in sorted((package / layer).rglob("*.py")):
        for module in _imports(path, package.parent):
            parts = module.split(".")
            lower = parts[0] == "dask_refine" and len(parts) > 1 and parts[1] in LAYERS \
                and parts[1] not in allowed
            if lower or (layer == "core" and parts[0] in NOT_IN_CORE):
                bad.append(f"{path.relative_to(package)} imports {module}")
    return bad


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_only_layers_above(layer):
    bad = violations(PACKAGE, layer)
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_violation(tmp_path):
    """A core module importing the io layer or Dask, or an io module importing jobs, is caught."""
    fake = tmp_path / "dask_refine"
    for layer in ("core", "io"):
        (fake / layer).mkdir(parents=True)
    (fake / "core" / "bad.py").write_text(
        "from ..io.store import ParticleStore\nimport dask.array\nfrom . import fourier\n")
    (fake / "io" / "bad.py").write_text(
        "from dask_refine.jobs import refine\nfrom ..core import ctf\n")
    assert violations(fake, "core") == ["core/bad.py imports dask_refine.io.store",
                                        "core/bad.py imports dask.array"]
    assert violations(fake, "io") == ["io/bad.py imports dask_refine.jobs"]


def _module_graph(package: Path) -> dict[str, set[str]]:
    """Module → the package's modules it imports, anywhere in its body (a function's import
    counts too: it is a dependency all the same); ``from .pkg import name`` counts as an
    import of the module ``pkg.name`` when there is one."""
    root = package.parent
    modules = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
               for p in package.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _imports_of(node, path, root):
                if target in modules and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def _imports_of(node, path: Path, root: Path) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    package = path.relative_to(root).with_suffix("").parts[:-1]
    base = (package[:len(package) - node.level + 1] if node.level else ()) + \
        (tuple(node.module.split(".")) if node.module else ())
    dotted = ".".join(base)
    return [dotted] + [f"{dotted}.{alias.name}" for alias in node.names]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (its modules in order), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module):
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        state[module] = 2
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


def test_no_import_cycle_inside_the_package():
    """No module of dask_refine imports, directly or through others, one that imports it back
    (function-level imports included: a lazy import is still a dependency)."""
    cycle = _cycle(_module_graph(PACKAGE))
    assert cycle is None, " → ".join(cycle)


def test_the_cycle_finder_sees_a_cycle(tmp_path):
    pkg = tmp_path / "demo_pkg"
    (pkg / "io").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "io" / "__init__.py").write_text("")
    (pkg / "io" / "star.py").write_text("def f():\n    from .cs import g\n")
    (pkg / "io" / "cs.py").write_text("from .star import f\n")
    (pkg / "io" / "mrc.py").write_text("import numpy\n")
    assert _cycle(_module_graph(pkg)) in (["demo_pkg.io.cs", "demo_pkg.io.star", "demo_pkg.io.cs"],
                                          ["demo_pkg.io.star", "demo_pkg.io.cs",
                                           "demo_pkg.io.star"])
