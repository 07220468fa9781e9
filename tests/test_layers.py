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
