"""Viewing directions of RELION poses and their equal-area histogram."""

import numpy as np
import pytest

from dask_refine.core.rotations import euler_to_matrix, matrix_to_euler, random_rotations
from dask_refine.core.symmetry import symmetry_operators
from dask_refine.core.viewing import (equal_area_edges, viewing_direction_histogram,
                                      viewing_directions)


def test_viewing_direction_is_the_projection_axis(rng):
    # a projection integrates V(Aᵀ(x, y, z)) over z: the ray through the image centre runs
    # along d = Aᵀ ẑ, so A d = ẑ for every pose
    A = random_rotations(50, rng)
    az, el = viewing_directions(A)
    d = np.stack([np.cos(np.deg2rad(el)) * np.cos(np.deg2rad(az)),
                  np.cos(np.deg2rad(el)) * np.sin(np.deg2rad(az)), np.sin(np.deg2rad(el))], -1)
    np.testing.assert_allclose(np.einsum("nij,nj->ni", A, d), np.tile([0, 0, 1.0], (50, 1)),
                               atol=1e-12)


def test_azimuth_is_rot_and_elevation_is_90_minus_tilt(rng):
    rot, tilt, psi = rng.uniform([-179, 1, -180], [179, 179, 180], (200, 3)).T
    az, el = viewing_directions(euler_to_matrix(rot, tilt, psi))
    np.testing.assert_allclose(az, rot, atol=1e-9)
    np.testing.assert_allclose(el, 90 - tilt, atol=1e-9)
    back = matrix_to_euler(euler_to_matrix(rot, tilt, psi))
    np.testing.assert_allclose(viewing_directions(euler_to_matrix(*back))[1], 90 - tilt, atol=1e-9)


def test_top_views_go_to_the_top_row_and_side_views_to_the_equator(rng):
    n_top, n_side, n_bottom = 30, 50, 7
    top = euler_to_matrix(rng.uniform(-180, 180, n_top), 0.0, rng.uniform(-180, 180, n_top))
    side = euler_to_matrix(rng.uniform(-180, 180, n_side), 90.0, rng.uniform(-180, 180, n_side))
    bottom = euler_to_matrix(0.0, np.full(n_bottom, 180.0), 0.0)
    counts, az_edges, el_edges = viewing_direction_histogram(
        np.concatenate([top, side, bottom]), n_azimuth=12, n_elevation=9)
    assert counts.shape == (9, 12) and counts.sum() == n_top + n_side + n_bottom
    assert counts[-1].sum() == n_top and el_edges[-1] == 90.0  # elevation +90°
    assert counts[4].sum() == n_side and el_edges[4] < 0 < el_edges[5]  # elevation 0°
    assert counts[0].sum() == n_bottom


def test_bins_have_equal_area(rng):
    az_edges, el_edges = equal_area_edges(16, 8)
    area = np.diff(np.deg2rad(az_edges))[None, :] * np.diff(np.sin(np.deg2rad(el_edges)))[:, None]
    np.testing.assert_allclose(area, 4 * np.pi / 128)
    counts, _, _ = viewing_direction_histogram(random_rotations(128_000, rng), 16, 8)
    assert np.abs(counts / 1000 - 1).max() < 0.15  # uniform poses fill every cell alike


def test_weights_and_symmetry_expansion_keep_the_total(rng):
    side = euler_to_matrix(10.0, 90.0, 0.0)[None]
    c4 = symmetry_operators("C4")
    counts, az_edges, _ = viewing_direction_histogram(side, 8, 5, operators=c4)
    assert counts.sum() == pytest.approx(1.0)
    hit = np.flatnonzero(counts[2] > 0)  # equator row: four copies 90° apart, 1/4 each
    np.testing.assert_allclose(counts[2, hit], 0.25)
    np.testing.assert_allclose(np.sort(0.5 * (az_edges[hit] + az_edges[hit + 1])) % 90, 22.5)
    R = random_rotations(40, rng)
    w = rng.uniform(0, 1, 40)
    counts, _, _ = viewing_direction_histogram(R, weights=w, operators=symmetry_operators("D3"))
    assert counts.sum() == pytest.approx(w.sum())
