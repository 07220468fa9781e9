import numpy as np

from dask_refine.core.filters import apply_shell_filter, lowpass_filter
from dask_refine.core.fourier import centred_irfftn, centred_rfftn, rfft_radius
from dask_refine.core.fsc import fsc, resolution_at_threshold, shell_resolution_A, ssnr_from_fsc
from dask_refine.core.masks import soft_sphere_mask


def test_fsc_of_identical_maps_is_one(rng):
    v = rng.standard_normal((24,) * 3)
    np.testing.assert_allclose(fsc(v, v), 1.0, atol=1e-12)
    np.testing.assert_allclose(fsc(v, 3.0 * v), 1.0, atol=1e-12)
    np.testing.assert_allclose(fsc(v, -v), -1.0, atol=1e-12)


def test_fsc_of_independent_noise_is_small(rng):
    a, b = rng.standard_normal((2, 32, 32, 32))
    curve = fsc(a, b)
    shells = np.arange(curve.size)
    # σ ≈ 1/√(voxels in shell) ≈ 1/√(4π r²)
    assert np.all(np.abs(curve[4:]) < 5 / np.sqrt(4 * np.pi * shells[4:] ** 2))


def test_fsc_matches_signal_to_noise(rng):
    """Two noisy copies of one map: FSC ≈ SNR / (1 + SNR) per shell (white signal, white noise)."""
    s = rng.standard_normal((32,) * 3)
    a = s + rng.standard_normal(s.shape)
    b = s + rng.standard_normal(s.shape)
    assert abs(fsc(a, b)[5:].mean() - 0.5) < 0.03


def test_resolution_interpolation():
    curve = np.array([1.0, 0.9, 0.5, 0.1, 0.0])
    # falls below 0.143 between shell 2 (0.5) and 3 (0.1): at 2 + 0.357/0.4
    shell = 2 + (0.5 - 0.143) / 0.4
    assert np.isclose(resolution_at_threshold(curve, 8, 1.5, 0.143), 8 * 1.5 / shell)
    assert resolution_at_threshold(np.ones(5), 8, 1.5) == 3.0  # Nyquist
    assert np.isinf(shell_resolution_A(8, 1.5)[0])


def test_ssnr_from_fsc():
    np.testing.assert_allclose(ssnr_from_fsc([0.5]), [1.0])
    np.testing.assert_allclose(ssnr_from_fsc([0.5], full_map=True), [2.0])


def test_lowpass_removes_high_frequencies(rng):
    v = rng.standard_normal((32,) * 3).astype(np.float32)
    out = lowpass_filter(v, resolution_A=8.0, pixel_size_A=1.0, edge_width_px=2.0)
    f = np.abs(centred_rfftn(out, 3))
    r = rfft_radius(32, 3)
    assert f[r > 32 / 8 + 1.01].max() < 1e-4 * f.max()
    f_in = np.abs(centred_rfftn(v, 3))
    np.testing.assert_allclose(f[r < 2.9], f_in[r < 2.9], rtol=1e-4)
    assert out.dtype == np.float32


def test_shell_filter_identity(rng):
    v = rng.standard_normal((16,) * 3)
    out = apply_shell_filter(v, np.ones(9))
    # everything but the corners beyond shell D/2 is kept
    f = centred_rfftn(v, 3)
    f[np.rint(rfft_radius(16, 3)) > 8] = 0
    np.testing.assert_allclose(out, centred_irfftn(f, 3, 16), atol=1e-10)
    half = apply_shell_filter(v, np.full(9, 0.5))
    np.testing.assert_allclose(half, 0.5 * out, atol=1e-10)


def test_soft_sphere_mask():
    m = soft_sphere_mask(32, radius_px=8, soft_edge_px=4)
    assert m[16, 16, 16] == 1.0 and m[16, 16, 16 + 8] == 1.0
    assert m[16, 16, 16 + 12] == 0.0 and m[0, 0, 0] == 0.0
    assert np.isclose(m[16, 16, 16 + 10], 0.5)
