"""Hopf-fibration grids on SO(3) (Yershova et al. 2010) with nested levels, and shift grids.

A rotation cell at level ``l`` is a pair ``(direction, psi)``: ``direction`` is a HEALPix pixel
(NESTED scheme, ``nside = 2**l``, 12·4**l pixels) giving the viewing direction (tilt = θ,
rot = φ of the pixel centre), ``psi`` indexes ``6·2**l`` in-plane angles; the cell's rotation is
RELION's ``Euler_angles2matrix(rot=φ, tilt=θ, psi=(psi + ½)·Δψ)``. Every level halves the spacing
(≈ 60°/2**l), and a cell has 8 children: the 4 nested HEALPix sub-pixels × 2 in-plane cells
(see :func:`children`).
HEALPix pixel centres come from ``healpy``.
"""

from __future__ import annotations

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


def children(level: int, direction, psi) -> tuple[np.ndarray, np.ndarray]:
    """The 8 children at level l+1 of each cell of ``level``: arrays of shape ``(n, 8)``.

    Directions: the 4 nested HEALPix sub-pixels. In-plane: for each sub-pixel, the two
    level-(l+1) cells around the angle ψ* at which that direction best matches the parent's
    rotation. (Matching ψ, rather than reusing the parent's ψ index, keeps children next to their
    parent near the poles, where ZYZ angles couple rot and psi.)
    """
    direction = np.asarray(direction)
    parent = cell_rotations(level, direction, psi)  # (n, 3, 3)
    d = 4 * direction[:, None] + np.arange(4)[None, :]  # (n, 4)
    rot, tilt = direction_angles_deg(level + 1, d.ravel())
    base = euler_to_matrix(rot, tilt, 0.0).reshape(-1, 4, 3, 3)
    m = parent[:, None] @ np.swapaxes(base, -1, -2)
    psi_star = np.rad2deg(np.arctan2(m[..., 0, 1], m[..., 0, 0])) % 360.0
    step = spacing_deg(level + 1)
    upper = np.floor(psi_star / step + 0.5).astype(int)  # the cell boundary nearest ψ*
    p = np.stack([upper - 1, upper], axis=-1) % n_psi(level + 1)  # (n, 4, 2)
    return np.repeat(d[:, :, None], 2, axis=2).reshape(-1, 8), p.reshape(-1, 8)


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
