import numpy as np
import pytest
from scipy import ndimage

from dask_refine.core.fourier import centred_rfftn
from dask_refine.core.projection import (backproject, extract_central_slices_rfft,
                                         insert_central_slices_rfft, prepare_reference_rfft,
                                         project, symmetrize_hermitian_planes)
from dask_refine.core.rotations import euler_to_matrix, random_rotations


@pytest.mark.parametrize("box", [16, 18])
def test_project_backproject_adjoint(rng, box):
    v = rng.standard_normal((box,) * 3)
    R = random_rotations(6, rng)
    R[0] = np.eye(3)  # exercise points exactly on the x = 0 plane
    R[1] = euler_to_matrix(90.0, 90.0, 0.0)
    x = rng.standard_normal((6, box, box))
    lhs = np.vdot(project(v, R), x)
    rhs = np.vdot(v, backproject(x, R))
    assert abs(lhs - rhs) / abs(lhs) < 1e-10  # brief: < 1e-5 in float64


def test_adjoint_with_band_limit(rng):
    v = rng.standard_normal((16,) * 3)
    R = random_rotations(4, rng)
    x = rng.standard_normal((4, 16, 16))
    lhs = np.vdot(project(v, R, r_max=5.5), x)
    rhs = np.vdot(v, backproject(x, R, r_max=5.5))
    assert abs(lhs - rhs) / abs(lhs) < 1e-10


def _blobs(box, centres, amps, sigma):
    c = np.arange(box) - box // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    return sum(a * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma ** 2))
               for a, (cx, cy, cz) in zip(amps, centres))


def test_fourier_slice_theorem_against_analytic_projection(rng):
    """A central slice = FFT of the real-space projection ∫V(Aᵀr)dz; for Gaussian blobs centred at
    c the projection is analytic: 2-D Gaussians at (A c)_xy. The interpolation error of trilinear
    gridding falls roughly as 1/pad²."""
    box, sigma = 32, 1.6
    centres = rng.uniform(-8, 8, (6, 3))
    amps = rng.uniform(0.5, 1.5, 6)
    v = _blobs(box, centres, amps, sigma)
    R = random_rotations(5, rng)
    c = np.arange(box) - box // 2
    yy, xx = np.meshgrid(c, c, indexing="ij")
    ky, kx = np.meshgrid(c, np.arange(box // 2 + 1), indexing="ij")
    band = kx ** 2 + ky ** 2 < (0.4 * box) ** 2
    analytic = np.stack([
        sum(a * np.sqrt(2 * np.pi) * sigma * np.exp(-((xx - px) ** 2 + (yy - py) ** 2)
                                                   / (2 * sigma ** 2))
            for a, (px, py, _) in zip(amps, centres @ R[i].T))
        for i in range(5)])
    fa = centred_rfftn(analytic, 2)
    errors = {}
    for pad in (2, 4):
        images = project(v, R, pad=pad)
        real_err = np.linalg.norm(images - analytic) / np.linalg.norm(analytic)
        errors[pad] = np.linalg.norm((fa - centred_rfftn(images, 2))[:, band]) / np.linalg.norm(
            fa[:, band])
        assert real_err < 0.05
    assert errors[2] < 0.05
    assert errors[4] < 0.5 * errors[2]


def test_fourier_slice_theorem_against_real_space_rotation(rng):
    """FFT of the sum along z of the volume resampled at Aᵀ r (scipy spline) = extracted slice."""
    box = 32
    v = _blobs(box, rng.uniform(-7, 7, (5, 3)), rng.uniform(0.5, 1.5, 5), 2.0)
    R = random_rotations(3, rng)
    c = np.arange(box) - box // 2
    grid = np.stack(np.meshgrid(c, c, c, indexing="ij"), axis=0).reshape(3, -1)  # z, y, x
    ours = project(v, R)
    for i in range(3):
        xyz = grid[::-1]  # (x, y, z) coordinates of each output voxel
        src = R[i].T @ xyz  # sample V at Aᵀ r
        rotated = ndimage.map_coordinates(v, src[::-1] + box // 2, order=3).reshape((box,) * 3)
        proj = rotated.sum(axis=0)
        assert np.corrcoef(proj.ravel(), ours[i].ravel())[0, 1] > 0.999


def test_insert_then_complete_equals_full_space_insertion(rng):
    """Half-space insertion + plane completion gives a Hermitian sum: its inverse is real."""
    box = 16
    R = random_rotations(3, rng)
    R[0] = np.eye(3)
    imgs = centred_rfftn(rng.standard_normal((3, box, box)), 2)
    p = 2 * box
    num = np.zeros((p, p, p // 2 + 1), np.complex128)
    wgt = np.zeros(num.shape, np.float64)
    insert_central_slices_rfft(imgs, np.ones(imgs.shape), R, num, wgt)
    full = symmetrize_hermitian_planes(num)
    plane = full[:, :, 0]
    mirror = (p - np.arange(p)) % p
    np.testing.assert_allclose(plane, plane[mirror][:, mirror].conj(), atol=1e-12)
    w = symmetrize_hermitian_planes(wgt)
    assert w.min() >= 0


def test_extraction_is_hermitian_consistent(rng):
    """The kx = 0 column of an extracted slice is Hermitian (it comes from a real projection)."""
    box = 24
    ref = prepare_reference_rfft(rng.standard_normal((box,) * 3))
    s = extract_central_slices_rfft(ref, random_rotations(4, rng), box)
    col = s[:, :, 0]
    ky = np.arange(box) - box // 2
    inside = np.abs(ky) < box // 2
    idx = np.flatnonzero(inside)
    mirror = box - idx  # index of −ky
    np.testing.assert_allclose(col[:, idx], col[:, mirror].conj(), rtol=1e-5, atol=1e-5)


def test_float32_path_matches_float64(rng):
    v = rng.standard_normal((16,) * 3)
    R = random_rotations(4, rng)
    a = project(v, R)
    b = project(v.astype(np.float32), R)
    assert b.dtype == np.float32
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-5


def test_numba_kernels_match_numpy_reference(rng):
    box = 20
    R = random_rotations(7, rng)
    R[0] = np.eye(3)
    ref = prepare_reference_rfft(rng.standard_normal((box,) * 3).astype(np.float32))
    a = extract_central_slices_rfft(ref, R, box, kernel="numpy")
    b = extract_central_slices_rfft(ref, R, box, kernel="numba")
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
    data = centred_rfftn(rng.standard_normal((7, box, box)), 2).astype(np.complex64)
    weights = rng.random(data.shape).astype(np.float32)
    p = 2 * box
    sums = {}
    for kernel in ("numpy", "numba"):
        num = np.zeros((p, p, p // 2 + 1), np.complex64)
        wgt = np.zeros(num.shape, np.float32)
        insert_central_slices_rfft(data, weights, R, num, wgt, kernel=kernel)
        sums[kernel] = (num, wgt)
    for x, y in zip(sums["numpy"], sums["numba"]):
        assert np.abs(x - y).max() <= 1e-5 * np.abs(x).max()
