"""Viewing directions of particle poses and their distribution on the sphere.

Rotations ``(..., 3, 3)`` follow RELION (``Euler_angles2matrix``, docs/design.md §2): a
projection's Fourier pixel ``(x, y)`` samples the map at ``Aᵀ (x, y, 0)``, so the beam looks along
``Aᵀ ẑ``, the third row of ``A`` = ``(sin tilt cos rot, sin tilt sin rot, cos tilt)``. Its
azimuth is RELION's ``rlnAngleRot`` and its elevation ``90° − rlnAngleTilt`` (top views,
tilt 0, at +90°; side views at 0°), the axes of RELION's and cryoSPARC's viewing-direction plots.
"""

from __future__ import annotations

import numpy as np

from .symmetry import expand_poses


def viewing_directions(rotation) -> tuple[np.ndarray, np.ndarray]:
    """``(azimuth_deg, elevation_deg)`` of rotations ``(..., 3, 3)``: azimuth in (−180, 180]
    (= rot), elevation in [−90, 90] (= 90 − tilt). float64 arrays of shape ``(...)``."""
    d = np.asarray(rotation, dtype=np.float64)[..., 2, :]
    azimuth = np.rad2deg(np.arctan2(d[..., 1], d[..., 0]))
    elevation = np.rad2deg(np.arcsin(np.clip(d[..., 2] / np.linalg.norm(d, axis=-1), -1, 1)))
    return azimuth, elevation


def equal_area_edges(n_azimuth: int, n_elevation: int) -> tuple[np.ndarray, np.ndarray]:
    """Bin edges in degrees that cut the sphere into ``n_azimuth × n_elevation`` cells of equal
    area: uniform in azimuth (−180 … 180) and in sin(elevation) (−90 … 90)."""
    azimuth = np.linspace(-180.0, 180.0, n_azimuth + 1)
    elevation = np.rad2deg(np.arcsin(np.linspace(-1.0, 1.0, n_elevation + 1)))
    return azimuth, elevation


def viewing_direction_histogram(rotation, n_azimuth: int = 72, n_elevation: int = 36,
                                weights=None, operators=None):
    """Particles per equal-area cell of viewing directions.

    ``rotation``: ``(N, 3, 3)``; ``weights``: ``(N,)`` (default 1 each); ``operators``: a point
    group ``(n, 3, 3)`` (:func:`.symmetry.symmetry_operators`): each pose is spread over its
    ``n`` equivalent poses ``A·S`` with weight 1/n, so the plot shows the symmetric picture
    whatever asymmetric unit the search picked. Returns ``(counts, azimuth_edges_deg,
    elevation_edges_deg)``: counts ``(n_elevation, n_azimuth)`` float64 summing to Σ weights.
    """
    rotation = np.asarray(rotation, dtype=np.float64).reshape(-1, 3, 3)
    weights = np.ones(rotation.shape[0]) if weights is None else np.asarray(weights, np.float64)
    if operators is not None and len(operators) > 1:
        n_ops = len(operators)
        rotation = expand_poses(rotation, operators).reshape(-1, 3, 3)
        weights = np.repeat(weights / n_ops, n_ops)
    az_edges, el_edges = equal_area_edges(n_azimuth, n_elevation)
    azimuth, elevation = viewing_directions(rotation)
    counts, _, _ = np.histogram2d(elevation, azimuth, bins=(el_edges, az_edges), weights=weights)
    return counts, az_edges, el_edges
