"""Hopf-fibration grids on SO(3) (Yershova et al. 2010) with nested levels, and shift grids.

A rotation cell at level ``l`` is a pair ``(direction, psi)``: ``direction`` is a HEALPix pixel
(NESTED scheme, ``nside = 2**l``, 12·4**l pixels) giving the viewing direction (tilt = θ,
rot = φ of the pixel centre), ``psi`` indexes ``6·2**l`` in-plane angles; the cell's rotation is
RELION's ``Euler_angles2matrix(rot=φ, tilt=θ, psi=(psi + ½)·Δψ)``. Every level halves the spacing
(≈ 60°/2**l), and a cell has (mostly) 8 children: the 4 nested HEALPix sub-pixels × the in-plane
cells whose best-matching parent it is (see :func:`children`); every cell has exactly one parent
(:func:`parent_cells`), so the descendants of a level cover every finer level.
HEALPix pixel centres come from ``healpy``.
"""

from __future__ import annotations

import functools

import numpy as np

from .rotations import euler_to_matrix

PSI_PER_NSIDE = 6


def n_directions(level: int) -> int:
    return 12 * 4 ** level


def n_psi(level: int) -> int:
    return PSI_PER_NSIDE * 2 ** level


def n_rotations(level: int) -> int:
    return n_directions(level) * n_psi(level)


def spacing_deg(level: int) -> float:
    """Nominal angular spacing of level ``l`` (the in-plane step, 60°/2**l)."""
    return 360.0 / n_psi(level)


def direction_angles_deg(level: int, direction) -> tuple[np.ndarray, np.ndarray]:
    """(rot, tilt) in degrees of HEALPix pixel centres (NESTED) at ``level``."""
    import healpy

    theta, phi = healpy.pix2ang(2 ** level, np.asarray(direction), nest=True)
    return np.rad2deg(phi), np.rad2deg(theta)


def cell_rotations(level: int, direction, psi) -> np.ndarray:
    """Rotation matrices ``(n, 3, 3)`` of cells ``(direction[i], psi[i])`` at ``level``."""
    rot, tilt = direction_angles_deg(level, direction)
    psi_deg = (np.asarray(psi) + 0.5) * spacing_deg(level)
    return euler_to_matrix(rot, tilt, psi_deg)


def all_cells(level: int) -> tuple[np.ndarray, np.ndarray]:
    """Every cell of a level as ``(direction, psi)`` index arrays (direction-major)."""
    d, p = np.meshgrid(np.arange(n_directions(level)), np.arange(n_psi(level)), indexing="ij")
    return d.ravel(), p.ravel()


def parent_cells(level: int, direction, psi) -> tuple[np.ndarray, np.ndarray]:
    """The parent at level l−1 of each cell ``(direction[i], psi[i])`` of ``level`` (l ≥ 1).

    Direction: the nested HEALPix parent ``direction // 4``. In-plane: the level-(l−1) ψ cell
    containing the angle ψ** at which the parent direction best matches the cell's rotation
    (``R ≈ Euler(rot_p, tilt_p, ψ**)``). Every cell has exactly one parent, so the children
    (:func:`children`) of all cells of a level partition the next level.
    """
    direction = np.asarray(direction, dtype=np.int64)
    rots = cell_rotations(level, direction, psi)
    pdir = direction // 4
    rot, tilt = direction_angles_deg(level - 1, pdir)
    base = euler_to_matrix(rot, tilt, 0.0).reshape(-1, 3, 3)
    m = rots @ np.swapaxes(base, -1, -2)
    psi_star = np.rad2deg(np.arctan2(m[..., 0, 1], m[..., 0, 0])) % 360.0
    ppsi = np.floor(psi_star / spacing_deg(level - 1)).astype(np.int64) % n_psi(level - 1)
    return pdir, ppsi


#: ψ cells tried around the nominal child ψ (each is kept only if its parent is the cell)
_CHILD_PSI_WINDOW = np.arange(-3, 3)


#: levels whose children are looked up in a table made once per process (≤ 36,864 cells)
CHILDREN_TABLE_MAX_LEVEL = 3


def children_flat(level: int, direction, psi) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The children at level l+1 of each cell of ``level`` as flat arrays ``(owner, direction,
    psi)`` sorted by owner: ``owner[j]`` is the index of the input cell whose child ``j`` is (see
    :func:`children`). The children of distinct cells are distinct (every cell has one parent);
    a cell that no child maps to has none here (its neighbours' children cover the region).
    Levels ≤ 3 read a table of every cell's children (:func:`_children_table`)."""
    direction = np.asarray(direction, dtype=np.int64).ravel()
    psi = np.asarray(psi, dtype=np.int64).ravel()
    if level > CHILDREN_TABLE_MAX_LEVEL:
        return _children_flat(level, direction, psi)
    start, child_d, child_p = _children_table(level)
    cell = direction * n_psi(level) + psi
    counts = start[cell + 1] - start[cell]
    owner = np.repeat(np.arange(cell.size), counts)
    offset = np.concatenate([[0], np.cumsum(counts)[:-1]])
    idx = start[cell][owner] + np.arange(owner.size) - offset[owner]
    return owner, child_d[idx], child_p[idx]


@functools.lru_cache(maxsize=CHILDREN_TABLE_MAX_LEVEL + 1)
def _children_table(level: int):
    """Every cell's children at ``level`` as CSR: ``(start (n + 1,), direction, psi)``, the
    children of cell ``c = direction · n_psi + psi`` at ``start[c]:start[c + 1]``."""
    owner, d, p = _children_flat(level, *all_cells(level))
    start = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=n_rotations(level)))])
    return start, d, p


def _children_flat(level: int, direction, psi):
    """:func:`children_flat` computed from the grid (``parent_cells`` of the candidates)."""
    n = direction.size
    parent = cell_rotations(level, direction, psi)  # (n, 3, 3)
    d = 4 * direction[:, None] + np.arange(4)[None, :]  # (n, 4)
    rot, tilt = direction_angles_deg(level + 1, d.ravel())
    base = euler_to_matrix(rot, tilt, 0.0).reshape(-1, 4, 3, 3)
    m = parent[:, None] @ np.swapaxes(base, -1, -2)
    psi_star = np.rad2deg(np.arctan2(m[..., 0, 1], m[..., 0, 0])) % 360.0
    step = spacing_deg(level + 1)
    upper = np.floor(psi_star / step + 0.5).astype(np.int64)  # the cell boundary nearest ψ*
    cand_p = ((upper[:, :, None] + _CHILD_PSI_WINDOW[None, None, :]) % n_psi(level + 1))
    cand_d = np.broadcast_to(d[:, :, None], cand_p.shape)
    width = cand_p[0].size if n else 0
    pd, pp = parent_cells(level + 1, cand_d.ravel(), cand_p.ravel())
    mine = ((pd == np.repeat(direction, width)) & (pp == np.repeat(psi, width))).reshape(n, -1)
    owner, col = np.nonzero(mine)
    return owner, cand_d.reshape(n, -1)[owner, col], cand_p.reshape(n, -1)[owner, col]


def children(level: int, direction, psi) -> tuple[np.ndarray, np.ndarray]:
    """The children at level l+1 of each cell of ``level``: arrays of shape ``(n, K)``.

    The children of a cell are exactly the level-(l+1) cells whose :func:`parent_cells` is that
    cell: the 4 nested HEALPix sub-pixels, each with the ψ cells whose best-matching parent ψ
    falls in the parent's ψ cell (matching ψ, rather than reusing the parent's ψ index, keeps
    children next to their parent near the poles, where ZYZ angles couple rot and psi). Because
    every cell has one parent, the descendants of all cells of a level cover every cell of every
    finer level (no cell is unreachable). Most cells have 8 children; near the poles some have
    9 or fewer, so ``K ≥ 8`` is the largest count in the call and shorter rows are padded by
    repeating their first child (callers de-duplicate). Flat form: :func:`children_flat`.
    """
    direction = np.asarray(direction, dtype=np.int64).ravel()
    n = direction.size
    owner, cd, cp = children_flat(level, direction, psi)
    counts = np.bincount(owner, minlength=n)
    k = max(8, int(counts.max()) if n else 8)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(owner.size) - start[owner]
    # rows are padded with their first child; a cell without children gets its nominal child
    # (the ψ cell nearest ψ* of sub-pixel 0, which has another parent: a duplicate, no gap)
    step = spacing_deg(level + 1)
    direction_ = np.asarray(direction, dtype=np.int64).ravel()
    psi_ = np.asarray(psi, dtype=np.int64).ravel()
    first_d, first_p = 4 * direction_, np.zeros(n, dtype=np.int64)
    if n:
        m = cell_rotations(level, direction_, psi_) @ np.swapaxes(
            euler_to_matrix(*direction_angles_deg(level + 1, first_d), 0.0).reshape(-1, 3, 3),
            -1, -2)
        first_p = np.floor((np.rad2deg(np.arctan2(m[..., 0, 1], m[..., 0, 0])) % 360.0) / step
                           + 0.5).astype(np.int64) % n_psi(level + 1)
    has = counts > 0
    first_d[has], first_p[has] = cd[start[has]], cp[start[has]]
    out_d = np.repeat(first_d[:, None], k, axis=1)
    out_p = np.repeat(first_p[:, None], k, axis=1)
    out_d[owner, rank] = cd
    out_p[owner, rank] = cp
    return out_d, out_p


def descendants(level: int, direction, psi, last_level: int):
    """Every ``last_level`` descendant of the given cells of ``level``: ``(owner, direction,
    psi)``, ``owner`` the index of the input cell (repeated children applied)."""
    d, p = np.asarray(direction, dtype=np.int64), np.asarray(psi, dtype=np.int64)
    owner = np.arange(d.size)
    for lvl in range(level, last_level):
        o, d, p = children_flat(lvl, d, p)
        owner = owner[o]
        key = np.unique((owner * n_rotations(lvl + 1) + d * n_psi(lvl + 1) + p))
        owner, cell = key // n_rotations(lvl + 1), key % n_rotations(lvl + 1)
        d, p = cell // n_psi(lvl + 1), cell % n_psi(lvl + 1)
    return owner, d, p


def neighbourhood(level: int, rotation: np.ndarray, psi_radius: int = 1) -> tuple[np.ndarray,
                                                                                   np.ndarray]:
    """Cells of ``level`` around a rotation (local search): the HEALPix pixel of its viewing
    direction and that pixel's 8 neighbours, each with the in-plane cells within ``psi_radius``
    of the in-plane angle that best matches ``rotation`` at that direction (robust at the poles).
    """
    import healpy

    nside = 2 ** level
    view = rotation[2]  # third row of A: the viewing direction (sin t cos r, sin t sin r, cos t)
    tilt = np.arccos(np.clip(view[2], -1.0, 1.0))
    rot = np.arctan2(view[1], view[0])
    centre = healpy.ang2pix(nside, tilt, rot, nest=True)
    around = healpy.get_all_neighbours(nside, centre, nest=True)
    dirs = np.unique(np.concatenate([[centre], around[around >= 0]]))
    base = cell_rotations(level, dirs, np.zeros(dirs.size)) @ _rz(-0.5 * spacing_deg(level))
    # rotation = Rz(ψ) · A0  ⇒  ψ* = angle of rotation · A0ᵀ about z
    m = rotation[None] @ np.swapaxes(base, 1, 2)
    psi_star = np.rad2deg(np.arctan2(m[:, 0, 1], m[:, 0, 0])) % 360.0
    step = spacing_deg(level)
    offsets = np.arange(-psi_radius, psi_radius + 1)
    psi = (np.floor(psi_star / step).astype(int)[:, None] + offsets[None, :]) % n_psi(level)
    return np.repeat(dirs, offsets.size), psi.ravel()


def _rz(angle_deg: float) -> np.ndarray:
    return euler_to_matrix(0.0, 0.0, angle_deg)


def shift_grid(half_extent: float, step: float) -> np.ndarray:
    """Square grid of 2-D offsets ``(n, 2)`` (x, y) from −half_extent to +half_extent by ``step``
    (always contains (0, 0))."""
    n = int(np.floor(half_extent / step + 1e-9))
    axis = np.arange(-n, n + 1) * step
    gx, gy = np.meshgrid(axis, axis, indexing="xy")
    return np.stack([gx.ravel(), gy.ravel()], axis=1)
