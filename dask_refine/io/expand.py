"""Symmetry expansion of a particle store, as ``relion_particle_symmetry_expand``
(docs/design.md §4, "Symmetry expansion").

Every particle becomes |G| rows, one per rotation R of the point group (identity first), with
the pose ``A·R`` (RELION's ``Euler_apply_transf(I, R, …)``): the same image seen as each of the
symmetry-related views, so that a map refined or classified without the symmetry (a focused
refinement of one subunit, a 3D classification of a subunit's states) sees every copy of the
subunit. Origins, CTF, optics, half sets (copies of a particle stay in its half: the gold
standard holds) and every other column are repeated; the images are *shared*: the new store
holds no stack, only each row's row in the source store (:class:`.store.SharedImages`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from ..core.symmetry import symmetry_operators
from .errors import InputError
from .store import SHARED_IMAGES, SOURCE_ROW, ParticleStore, is_url


def _arrays(group: zarr.Group, prefix: str = ""):
    """``(path, array)`` of every array below ``group`` (the image stack left out)."""
    for name, array in group.arrays():
        if not (prefix == "" and name == "images"):
            yield prefix + name, array
    for name, sub in group.groups():
        yield from _arrays(sub, f"{prefix}{name}/")


def expand_symmetry(store: ParticleStore, out_path, symmetry: str) -> ParticleStore:
    """A new store at ``out_path`` with ``store``'s particles expanded by ``symmetry`` (module
    docstring); ``store`` is not changed. Needs poses (``rotation``)."""
    try:
        operators = symmetry_operators(symmetry)
    except ValueError as exc:
        raise InputError("--symmetry", str(exc)) from None
    if not store.has_column("rotation"):
        raise InputError(store.path, "no rotation column: symmetry expansion needs poses "
                         "(import a refined STAR or .cs, or a refinement's particles.star)")
    if store.group.attrs.get(SHARED_IMAGES):
        raise InputError(store.path, "is itself an expansion; expand its source store")
    info = store.info
    n, g = info.n_particles, len(operators)
    source = store.path if is_url(store.path) else str(Path(store.path).resolve())
    expanded = ParticleStore.create(out_path, n * g, info.box_size, info.pixel_size_A,
                                    info.chunk_size * g, storage_options=store.storage_options)
    del expanded.group["images"]  # shared, not copied
    attrs = {k: v for k, v in store.attrs.items()
             if k not in ("n_particles", "provenance")}
    attrs.update(n_particles=n * g,
                 provenance={"created_by": "dask_refine.expand_symmetry", "source": source,
                             "symmetry": str(symmetry).upper(), "copies": g,
                             "source_provenance": store.attrs.get("provenance", {})},
                 **{SHARED_IMAGES: {"path": source, "chunk_rows": info.chunk_size * g}})
    expanded.group.attrs.update(attrs)
    rows = np.repeat(np.arange(n), g)
    expanded.write_column(SOURCE_ROW, rows)
    for path, array in _arrays(store.group):
        values = np.repeat(np.asarray(array[...]), g, axis=0)
        if path.split("/")[-1] == "rotation":  # the pose, and the truth's, of each copy
            values = np.einsum("nij,njk->nik", values,
                               np.tile(operators, (n, 1, 1)))
        folder, _, name = path.rpartition("/")
        expanded.write_column(name, values, group=folder or None)
    if expanded.has_column("uid", group="cs"):
        # cryoSPARC's uids must stay unique: copy k > 0 of a particle gets a fresh one
        uid = expanded.read_column("uid", group="cs").astype(np.uint64)
        fresh = np.random.default_rng(n * g).integers(1, 2 ** 63, size=n * g, dtype=np.uint64)
        copy = np.tile(np.arange(g), n)
        expanded.write_column("uid", np.where(copy == 0, uid, fresh), group="cs")
    return ParticleStore.open(out_path, storage_options=store.storage_options)
