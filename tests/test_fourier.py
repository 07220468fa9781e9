import numpy as np

from dask_refine.core.fourier import (centred_fftn, centred_ifftn, centred_irfftn, centred_rfftn,
                                      crop_centred, pad_centred, rfft_frequencies,
                                      rfft_multiplicity, translate_rfft)


def test_delta_at_origin_has_flat_real_transform():
    a = np.zeros((16, 16))
    a[8, 8] = 1.0
    np.testing.assert_allclose(centred_fftn(a, 2), np.ones((16, 16)), atol=1e-12)
    np.testing.assert_allclose(centred_rfftn(a, 2), np.ones((16, 9)), atol=1e-12)


def test_round_trips(rng):
    a = rng.standard_normal((3, 12, 12, 12))
    np.testing.assert_allclose(centred_irfftn(centred_rfftn(a, 3), 3, 12), a, atol=1e-12)
    np.testing.assert_allclose(centred_ifftn(centred_fftn(a, 3), 3).real, a, atol=1e-12)
    np.testing.assert_allclose(crop_centred(pad_centred(a, 20, 3), 12, 3), a)


def test_rfft_is_the_half_of_the_centred_fft(rng):
    a = rng.standard_normal((10, 10))
    full = centred_fftn(a, 2)
    half = centred_rfftn(a, 2)
    np.testing.assert_allclose(half[:, :5], full[:, 5:], atol=1e-12)
    np.testing.assert_allclose(half[:, 5], full[:, 0], atol=1e-12)  # Nyquist: kx = +5 ≡ −5
    ky, kx = rfft_frequencies(10, 2)
    assert ky.ravel()[5] == 0 and kx.ravel()[0] == 0


def test_parseval_with_multiplicity(rng):
    a = rng.standard_normal((8, 8, 8))
    half = np.abs(centred_rfftn(a, 3)) ** 2
    assert np.isclose((half * rfft_multiplicity(8, 3)).sum() / a.size, (a ** 2).sum())


def test_translate_matches_roll(rng):
    a = rng.standard_normal((2, 16, 16))
    shifts = np.array([[3.0, -2.0], [-5.0, 4.0]])  # (x, y) pixels
    moved = centred_irfftn(translate_rfft(centred_rfftn(a, 2), shifts), 2, 16)
    for i, (sx, sy) in enumerate(shifts):
        np.testing.assert_allclose(moved[i], np.roll(a[i], (int(sy), int(sx)), axis=(0, 1)),
                                   atol=1e-10)


def test_fourier_downsample_resamples_a_smooth_map():
    """A Gaussian sampled at box 64 / 1 px, Fourier-cropped to box 32, equals the same Gaussian
    sampled at 2 px."""
    from dask_refine.core.fourier import fourier_downsample

    def gaussian(box, px):
        c = (np.arange(box) - box // 2) * px
        z, y, x = np.meshgrid(c, c, c, indexing="ij")
        return np.exp(-((x - 3) ** 2 + y ** 2 + (z + 2) ** 2) / (2 * 5.0 ** 2))

    small = fourier_downsample(gaussian(64, 1.0), 32)
    assert small.shape == (32, 32, 32) and small.dtype == np.float32
    np.testing.assert_allclose(small, gaussian(32, 2.0), atol=1e-5)
