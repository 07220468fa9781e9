import numpy as np
import pytest

from dask_refine.core.filters import apply_shell_filter, lowpass_filter
from dask_refine.core.fourier import centred_irfftn, centred_rfftn, rfft_radius
from dask_refine.core.fsc import (fsc, mask_corrected_fsc, randomize_phases_beyond,
                                  resolution_at_threshold, shell_resolution_A, ssnr_from_fsc)
from dask_refine.core.masks import soft_mask_outside_map, soft_sphere_mask, solvent_mask


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
    c = np.sqrt(2 * 0.5 / 1.5)  # full map's FSC to the truth (RELION updateSSNRarrays)
    np.testing.assert_allclose(ssnr_from_fsc([0.5], full_map=True), [c / (1 - c)])


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


def test_soft_mask_outside_map_keeps_inside_and_flattens_corners(rng):
    v = rng.standard_normal((32, 32, 32))
    out = soft_mask_outside_map(v)  # radius D/2 = 16, 3-pixel edge, as RELION's default
    inside = soft_sphere_mask(32, 16, 0.0) == 1.0
    np.testing.assert_array_equal(out[inside], v[inside])
    corners = soft_sphere_mask(32, 19, 0.0) == 0.0
    assert np.ptp(out[corners]) < 1e-12  # one constant: the weighted background mean
    blend = 1 - soft_sphere_mask(32, 16, 3.0)
    expected = np.sum(blend * v) / np.sum(blend)
    np.testing.assert_allclose(out[0, 0, 0], expected)
    c = np.full((32, 32, 32), 2.5)
    np.testing.assert_allclose(soft_mask_outside_map(c), c)  # a constant map is unchanged


def test_mask_corrected_fsc_is_the_unmasked_fsc_for_a_mask_of_ones(demo_map, rng):
    volume, _ = demo_map
    a = volume + 2 * volume.std() * rng.standard_normal(volume.shape)
    b = volume + 2 * volume.std() * rng.standard_normal(volume.shape)
    curves = mask_corrected_fsc(a, b, np.ones_like(volume))
    np.testing.assert_array_equal(curves["corrected"], curves["unmasked"])
    np.testing.assert_array_equal(curves["masked"], curves["unmasked"])


def test_mask_corrected_fsc_removes_the_correlation_a_sharp_mask_adds(demo_map, rng):
    """Halves share only a low-resolution signal (true FSC 0 beyond shell 6): a tight mask
    inflates the high-resolution FSC, the corrected curve brings it back near 0."""
    volume, _ = demo_map
    signal = lowpass_filter(volume.astype(np.float64), 64 / 6, 1.0) / volume.std()
    a = signal + rng.standard_normal(volume.shape)
    b = signal + rng.standard_normal(volume.shape)
    tight = soft_sphere_mask(64, 12, 3.0)
    curves = mask_corrected_fsc(a, b, tight, randomize_at_shell=7)
    high = slice(10, 30)
    assert curves["masked"][high].mean() > 0.15  # the mask's own correlation
    assert curves["randomized_masked"][high].mean() > 0.15
    assert abs(curves["corrected"][high].mean()) < 0.08


def test_randomized_phases_keep_amplitudes(demo_map, rng):
    volume, _ = demo_map
    out = randomize_phases_beyond(volume, 10, rng)
    fa, fb = centred_rfftn(volume.astype(np.float64), 3), centred_rfftn(out, 3)
    np.testing.assert_allclose(np.abs(fa), np.abs(fb), atol=1e-6 * np.abs(fa).max())
    inner = rfft_radius(64, 3) < 10
    np.testing.assert_allclose(fa[inner], fb[inner], atol=1e-6 * np.abs(fa).max())
    assert fsc(volume, out)[12:].max() < 0.2


def test_solvent_mask_covers_the_density_with_a_soft_edge(demo_map):
    volume, _ = demo_map
    mask = solvent_mask(volume, 0.1 * volume.max(), extend_px=2, soft_edge_px=4)
    assert mask.dtype == np.float32 and mask.min() == 0.0 and mask.max() == 1.0
    assert (mask[volume > 0.1 * volume.max()] == 1.0).all()
    assert 0.02 < mask.mean() < 0.6
    soft = (mask > 0) & (mask < 1)
    assert soft.sum() > 0.2 * (mask == 1).sum()  # a real fall-off, not a binary mask
    with pytest.raises(ValueError, match="threshold"):
        solvent_mask(volume, 10 * volume.max())
