import numpy as np

from dask_refine.core import so3_grid
from dask_refine.core.rotations import angular_distance_deg, random_rotations


def test_counts_and_spacing():
    assert so3_grid.n_rotations(0) == 72 and so3_grid.n_rotations(2) == 4608
    assert so3_grid.spacing_deg(3) == 7.5
    d, p = so3_grid.all_cells(1)
    R = so3_grid.cell_rotations(1, d, p)
    assert R.shape == (576, 3, 3)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-12)


def test_children_stay_close_to_their_parent_everywhere():
    d, p = so3_grid.all_cells(2)
    parent = so3_grid.cell_rotations(2, d, p)
    cd, cp = so3_grid.children(2, d, p)
    child = so3_grid.cell_rotations(3, cd.ravel(), cp.ravel()).reshape(-1, 8, 3, 3)
    dist = angular_distance_deg(child, parent[:, None])
    # children lie within about one parent spacing, including at the poles
    assert dist.max() < so3_grid.spacing_deg(2)


def test_grid_covers_so3():
    q = random_rotations(300, np.random.default_rng(0))
    for level, cover in ((1, 26.0), (2, 13.0)):
        R = so3_grid.cell_rotations(level, *so3_grid.all_cells(level))
        nearest = angular_distance_deg(q[:, None], R[None]).min(axis=1)
        assert nearest.max() < cover


def test_neighbourhood_contains_the_nearest_cell():
    q = random_rotations(40, np.random.default_rng(1))
    R = so3_grid.cell_rotations(2, *so3_grid.all_cells(2))
    nearest = angular_distance_deg(q[:, None], R[None]).min(axis=1)
    for i in range(40):
        d, p = so3_grid.neighbourhood(2, q[i], psi_radius=1)
        local = so3_grid.cell_rotations(2, d, p)
        assert np.isclose(angular_distance_deg(q[i][None], local).min(), nearest[i])


def test_shift_grid():
    g = so3_grid.shift_grid(2.0, 1.0)
    assert g.shape == (25, 2) and [0.0, 0.0] in g.tolist()
    assert np.abs(g).max() == 2.0
