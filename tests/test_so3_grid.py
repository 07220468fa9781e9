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
    cd, cp = so3_grid.children(2, d, p)  # (n, K ≥ 8): padded with repeats of a real child
    child = so3_grid.cell_rotations(3, cd.ravel(), cp.ravel()).reshape(-1, cd.shape[1], 3, 3)
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


def test_descendants_cover_every_cell_of_the_last_level():
    """From level 1 (and 2), the union of the descendants down to level 4 is every level-4
    cell, and every cell has exactly one parent (the children partition each level)."""
    for first in (1, 2):
        d, p = so3_grid.all_cells(first)
        owner, dd, dp = so3_grid.descendants(first, d, p, 4)
        cells = dd * so3_grid.n_psi(4) + dp
        assert np.unique(cells).size == so3_grid.n_rotations(4) == cells.size
    owner, cd, cp = so3_grid.children_flat(2, *so3_grid.all_cells(2))
    assert np.unique(cd * so3_grid.n_psi(3) + cp).size == cd.size == so3_grid.n_rotations(3)
    counts = np.bincount(owner, minlength=so3_grid.n_rotations(2))
    assert counts.min() >= 1 and abs(counts.mean() - 8) < 1e-9
    # the padded (n, K) form holds the same children
    pd_, pp_ = so3_grid.children(2, *so3_grid.all_cells(2))
    assert np.unique(pd_ * so3_grid.n_psi(3) + pp_).size == so3_grid.n_rotations(3)


def test_children_table_equals_the_computed_children():
    rng = np.random.default_rng(3)
    for level in range(4):
        d, p = so3_grid.all_cells(level)
        pick = rng.choice(d.size, min(d.size, 500), replace=False)
        got = so3_grid.children_flat(level, d[pick], p[pick])
        want = so3_grid._children_flat(level, d[pick], p[pick])
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
