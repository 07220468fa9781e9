import numpy as np
import pytest

from dask_refine.core.fsc import fsc
from dask_refine.core.pose_search import asymmetric_cells
from dask_refine.core.projection import (extract_central_slices_rfft, insert_central_slices_rfft,
                                         prepare_reference_rfft, symmetrize_hermitian_planes)
from dask_refine.core.reconstruction import reconstruct
from dask_refine.core.rotations import angular_distance_deg, random_rotations
from dask_refine.core.symmetry import (axis_rotation, canonical_poses, expand_poses,
                                       in_asymmetric_unit, symmetrize_sums, symmetry_operators)
from dask_refine.core import so3_grid


@pytest.mark.parametrize("name, order", [("C1", 1), ("c2", 2), ("C7", 7), ("D2", 4), ("D5", 10),
                                         ("T", 12), ("O", 24), ("I", 60), ("I1", 60),
                                         ("I3", 60), ("I4", 60)])
def test_groups_are_closed_proper_and_of_the_right_order(name, order):
    ops = symmetry_operators(name)
    assert ops.shape == (order, 3, 3)
    np.testing.assert_allclose(ops[0], np.eye(3))
    np.testing.assert_allclose(ops @ ops.transpose(0, 2, 1), np.broadcast_to(np.eye(3), ops.shape),
                               atol=1e-9)
    np.testing.assert_allclose(np.linalg.det(ops), 1.0)
    products = np.einsum("aij,bjk->abik", ops, ops).reshape(-1, 3, 3)
    for p in products:  # closed under multiplication
        assert np.min(np.abs(ops - p).max(axis=(1, 2))) < 1e-5


def test_relion_axis_placement():
    """RELION's conventions: Cn about z, the Dn 2-fold about x, I2's 2-folds on x, y, z."""
    c4 = symmetry_operators("C4")
    assert any(np.allclose(op, axis_rotation((0, 0, 1), np.pi / 2)) for op in c4)
    d3 = symmetry_operators("D3")
    assert any(np.allclose(op, axis_rotation((1, 0, 0), np.pi)) for op in d3)
    i2 = symmetry_operators("I")
    for axis in np.eye(3):
        assert any(np.allclose(op, axis_rotation(axis, np.pi), atol=1e-6) for op in i2)
    # I1 has its 2-folds on x, y, z too, and its 5-folds in the xz plane rotated from I2's
    i1 = symmetry_operators("I1")
    assert any(np.allclose(op, axis_rotation((0.85065080702670, 0, -0.5257311142635),
                                             2 * np.pi / 5), atol=1e-6) for op in i1)
    o = symmetry_operators("O")
    assert any(np.allclose(op, axis_rotation((0, 0, 1), np.pi / 2)) for op in o)


def test_unknown_group_is_refused():
    with pytest.raises(ValueError, match="not supported"):
        symmetry_operators("C2v")


def test_canonical_poses_are_equivalent_and_in_the_asymmetric_unit(rng):
    ops = symmetry_operators("D3")
    R = random_rotations(200, rng)
    canon = canonical_poses(R, ops)
    assert in_asymmetric_unit(canon, ops).all()
    expanded = expand_poses(R, ops)  # (N, n, 3, 3)
    dist = angular_distance_deg(np.repeat(canon, len(ops), axis=0), expanded.reshape(-1, 3, 3))
    assert (dist.reshape(200, len(ops)).min(axis=1) < 1e-4).all()
    # random poses land in the unit with probability 1/|G|
    assert abs(in_asymmetric_unit(R, ops).mean() - 1 / 6) < 0.08


def test_asymmetric_grid_covers_so3(rng):
    """Every pose is within one grid spacing of some kept cell, up to symmetry."""
    level = 2
    ops = symmetry_operators("C4")
    _, _, cells = asymmetric_cells(level, "C4")
    assert cells.shape[0] < 0.6 * so3_grid.n_rotations(level)
    assert asymmetric_cells(level, "I")[2].shape[0] < 0.05 * so3_grid.n_rotations(level)
    R = random_rotations(100, rng)
    eq = expand_poses(R, ops).reshape(-1, 3, 3)
    nearest_eq = [angular_distance_deg(np.broadcast_to(e, cells.shape), cells).min() for e in eq]
    assert np.max(np.array(nearest_eq).reshape(100, 4).min(axis=1)) < so3_grid.spacing_deg(level)


def test_symmetrised_sums_equal_expanded_insertion(demo_map, rng):
    """Symmetrising the sums (RELION applyPointGroupSymmetry) = inserting every image at all
    its symmetry-equivalent poses A·S."""
    volume, _ = demo_map
    box = volume.shape[0]
    ops = symmetry_operators("C3")
    ref = prepare_reference_rfft(volume.astype(np.float64))
    R = random_rotations(150, rng)
    images = extract_central_slices_rfft(ref, R, box)
    weights = np.ones(images.shape)
    P = 2 * box
    shape = (P, P, P // 2 + 1)

    def sums(rotations, imgs, wgts):
        d, w = np.zeros(shape, complex), np.zeros(shape)
        insert_central_slices_rfft(imgs, wgts, rotations, d, w)
        return symmetrize_hermitian_planes(d), symmetrize_hermitian_planes(w)

    d1, w1 = symmetrize_sums(*sums(R, images, weights), ops, box)
    eq = expand_poses(R, ops).reshape(-1, 3, 3)
    d2, w2 = sums(eq, np.repeat(images, len(ops), axis=0), np.repeat(weights, len(ops), axis=0))
    assert abs(w1.sum() / w2.sum() - 1) < 0.02
    v1 = reconstruct(d1, w1, box, complete_planes=False)
    v2 = reconstruct(d2, w2, box, complete_planes=False)
    curve = fsc(v1, v2)
    assert curve[1:box // 2 - 2].min() > 0.97, curve
    # the symmetrised map is symmetric: projections at A and A·S agree; the input map's do not
    def agreement(vol):
        ref_v = prepare_reference_rfft(vol.astype(np.float64))
        a = extract_central_slices_rfft(ref_v, R[:20], box, r_max=box / 4)
        b = extract_central_slices_rfft(ref_v, R[:20] @ ops[1], box, r_max=box / 4)
        return np.abs(np.vdot(a, b)) / np.sqrt(np.vdot(a, a).real * np.vdot(b, b).real)

    assert agreement(v1) > 0.99
    assert agreement(volume) < 0.9
