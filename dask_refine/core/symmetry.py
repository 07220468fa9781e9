"""Point-group symmetry: RELION's groups and axis placement, asymmetric units, symmetrised sums.

A map with symmetry group G satisfies ``V(S r) = V(r)`` for every ``S`` in G, so the pose ``A``
(RELION convention, slice at ``Aᵀ k``) and every ``A·S`` give the same projection. Groups are
built from RELION's generators (``SymList::fill_symmetry_class``, src/symmetries.cpp):

* ``Cn``: n-fold about z;  ``Dn``: n-fold about z and 2-fold about x;
* ``T``: 3-fold about z and 2-fold about (0, 0.816496, 0.577350);
* ``O``: 3-fold about (1, 1, 1)/√3 and 4-fold about z;
* ``I`` = ``I2`` (default), ``I1``, ``I3``, ``I4``: RELION's four icosahedral orientations.

Improper groups (mirrors, inversion) are refused: a cryo-EM map of a chiral molecule has none.
"""

from __future__ import annotations

import functools
import re

import numpy as np

from .backend import array_module

_ICOSAHEDRAL_GENERATORS = {
    # (axis of the 2-fold, of the 5-fold, of the 3-fold) as RELION writes them
    "I1": ((1, 0, 0), (0.85065080702670, 0, -0.5257311142635), (0.9341723640, 0.3568220765, 0)),
    "I2": ((0, 0, 1), (0.525731114, 0, 0.850650807), (0, 0.356822076, 0.934172364)),
    "I3": ((-0.5257311143, 0, 0.8506508070), (0, 0, 1),
           (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428)),
    "I4": ((0.5257311143, 0, 0.8506508070), (0.8944271932547096, 0, 0.4472135909903704),
           (0.4911234778630044, 0.3568220764705179, 0.7946544753759428)),
}


def axis_rotation(axis, angle_rad: float) -> np.ndarray:
    """Rotation matrix by ``angle_rad`` about ``axis`` (right-handed, Rodrigues)."""
    u = np.asarray(axis, dtype=np.float64)
    u = u / np.linalg.norm(u)
    k = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * k + (1 - np.cos(angle_rad)) * (k @ k)


def _closure(generators, max_order: int = 60) -> np.ndarray:
    """All products of the generators: the finite group they generate (identity first)."""
    group = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for g in frontier:
            for h in generators:
                p = g @ h
                if not any(np.allclose(p, q, atol=1e-5) for q in group):
                    group.append(p)
                    new.append(p)
        frontier = new
        if len(group) > max_order:
            raise ValueError("symmetry generators do not close into a finite point group")
    return np.array(group)


def symmetry_operators(name: str) -> np.ndarray:
    """The rotations of point group ``name`` (``C1``, ``C4``, ``D7``, ``T``, ``O``, ``I``,
    ``I1`` … ``I4``; case-insensitive) as ``(n, 3, 3)`` float64, identity first."""
    return _operators(str(name).strip().upper()).copy()


@functools.lru_cache(maxsize=32)
def _operators(key: str) -> np.ndarray:
    match = re.fullmatch(r"([CD])(\d+)", key)
    if match:
        order = int(match.group(2))
        if order < 1:
            raise ValueError(f"symmetry {key!r}: the order must be ≥ 1")
        gens = [axis_rotation((0, 0, 1), 2 * np.pi / order)]
        if match.group(1) == "D":
            gens.append(axis_rotation((1, 0, 0), np.pi))
        return _closure(gens, max_order=2 * order)
    if key == "T":
        gens = [axis_rotation((0, 0, 1), 2 * np.pi / 3),
                axis_rotation((0, 0.816496, 0.577350), np.pi)]
    elif key == "O":
        gens = [axis_rotation((1, 1, 1), 2 * np.pi / 3), axis_rotation((0, 0, 1), np.pi / 2)]
    elif key in ("I", *_ICOSAHEDRAL_GENERATORS):
        two, five, three = _ICOSAHEDRAL_GENERATORS["I2" if key == "I" else key]
        gens = [axis_rotation(two, np.pi), axis_rotation(five, 2 * np.pi / 5),
                axis_rotation(three, 2 * np.pi / 3)]
    else:
        raise ValueError(f"symmetry {key!r} is not supported: expected Cn, Dn, T, O, I or I1–I4 "
                         "(proper point groups, RELION's axis conventions)")
    ops = _closure(gens)
    expected = {"T": 12, "O": 24}.get(key, 60)
    if len(ops) != expected:  # the rounded axes RELION writes must still close exactly
        raise ValueError(f"symmetry {key!r}: generators gave {len(ops)} operators, "
                         f"expected {expected}")
    return ops


def canonical_poses(rotations, operators) -> np.ndarray:
    """Map each pose to its representative in the asymmetric unit of ``operators``.

    The asymmetric unit is the Dirichlet domain around the identity: among the equivalent poses
    ``A·S`` the one closest to the identity (largest trace). Returns ``(N, 3, 3)`` float64.
    """
    R = np.asarray(rotations, dtype=np.float64)
    ops = np.asarray(operators, dtype=np.float64)
    candidates = np.einsum("nij,kjl->nkil", R, ops)
    best = np.argmax(np.trace(candidates, axis1=-2, axis2=-1), axis=1)
    return candidates[np.arange(R.shape[0]), best]


def in_asymmetric_unit(rotations, operators, margin_deg: float = 0.0):
    """True where a pose lies in the asymmetric unit of :func:`canonical_poses`, widened by
    ``margin_deg`` (a pose within ``margin_deg`` of the unit's boundary counts as inside, so
    grid cells that straddle the boundary are kept)."""
    R = np.asarray(rotations, dtype=np.float64)
    ops = np.asarray(operators, dtype=np.float64)
    traces = np.trace(np.einsum("nij,kjl->nkil", R, ops), axis1=-2, axis2=-1)
    angles = np.arccos(np.clip((traces - 1) / 2, -1.0, 1.0))  # distance of A·S to identity
    return angles[:, 0] <= angles.min(axis=1) + np.deg2rad(2 * margin_deg) + 1e-9


def expand_poses(rotations, operators) -> np.ndarray:
    """Symmetry expansion: every pose ``A`` → the ``n`` equivalent poses ``A·S`` as
    ``(N, n, 3, 3)`` (RELION ``relion_particle_symmetry_expand`` gives the same set)."""
    xp = array_module(rotations)
    return xp.einsum("nij,kjl->nkil", xp.asarray(rotations), xp.asarray(operators))


def symmetrize_sums(data_sum, weight_sum, operators, box_size: int):
    """Apply the point group to padded half-space sums (RELION
    ``BackProjector::applyPointGroupSymmetry``): ``D(k) ← Σ_S D(S k)`` by trilinear interpolation,
    for ``|k| < D/2``. Inputs must already have their Hermitian planes completed
    (:func:`.projection.symmetrize_hermitian_planes`); so do the outputs. Returns new arrays.
    """
    from .projection import sample_half_space

    xp = array_module(data_sum)
    ops = np.asarray(operators, dtype=np.float64)
    if len(ops) == 1:
        return data_sum.copy(), weight_sum.copy()
    padded = data_sum.shape[0]
    pad = padded // box_size
    half = padded // 2
    h = padded // 2 + 1
    z, y, x = xp.meshgrid(xp.arange(padded) - half, xp.arange(padded) - half, xp.arange(h),
                          indexing="ij")
    r_max = (box_size // 2) * pad
    inside = (x * x + y * y + z * z) < r_max * r_max
    idx = xp.nonzero(inside.ravel())[0]
    points = xp.stack([x.ravel()[idx], y.ravel()[idx], z.ravel()[idx]], axis=-1).astype(xp.float64)
    data_out = data_sum.copy().reshape(-1)
    weight_out = weight_sum.copy().reshape(-1)
    for S in ops[1:]:
        rotated = points @ xp.asarray(S.T)  # row-vector form of S·k
        data_out[idx] += sample_half_space(data_sum, rotated)
        weight_out[idx] += sample_half_space(weight_sum, rotated)
    return data_out.reshape(data_sum.shape), weight_out.reshape(weight_sum.shape)
