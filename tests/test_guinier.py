"""Guinier analysis and B-factor (RELION ``relion_postprocess --auto_bfac`` conventions)."""

import numpy as np
import pytest

from dask_refine.core.fourier import centred_irfftn, centred_rfftn, rfft_radius
from dask_refine.core.guinier import apply_bfactor, fsc_weights, guinier_bfactor

BOX, PX = 64, 1.0


@pytest.fixture(scope="module")
def flat_map():
    """White noise: the expected Fourier amplitude is the same in every shell."""
    return np.random.default_rng(3).standard_normal((BOX,) * 3)


def _blur(volume, b_blur):
    """The definition: amplitudes × exp(−B s²/4), s = |k| in 1/Å."""
    s = rfft_radius(BOX, 3) / (BOX * PX)
    return centred_irfftn(centred_rfftn(volume, 3) * np.exp(-b_blur * s ** 2 / 4), 3, BOX)


@pytest.mark.parametrize("b_blur", [30.0, 100.0, 300.0])
def test_fit_recovers_a_known_bfactor_with_relions_sign(flat_map, b_blur):
    fit = guinier_bfactor(_blur(flat_map, b_blur), PX, fit_low_A=10.0, fit_high_A=2.5)
    # RELION: B = 4 · slope, the sharpening B-factor, negative for a blurred map
    assert fit.bfactor_A2 == pytest.approx(-b_blur, rel=0.03)
    assert fit.corr_coeff > 0.95
    assert fit.fit_range_A[0] <= 10.0 and fit.fit_range_A[1] >= 2.5


def test_applying_the_fitted_bfactor_flattens_the_spectrum(flat_map):
    blurred = _blur(flat_map, 150.0)
    np.testing.assert_allclose(apply_bfactor(flat_map, 150.0, PX), blurred,
                               atol=1e-3 * np.abs(blurred).max())  # corners beyond Nyquist only
    fit = guinier_bfactor(blurred, PX, fit_high_A=2.5)
    sharpened = apply_bfactor(blurred, fit.bfactor_A2, PX)
    assert abs(guinier_bfactor(sharpened, PX, fit_high_A=2.5).bfactor_A2) < 3.0


def test_fsc_weighting_follows_relion():
    curve = np.array([1.0, 0.9, 0.5, 0.143, 0.05, -0.01, 0.3, 0.2])
    w = fsc_weights(curve)
    f = curve[:5]
    np.testing.assert_allclose(w[:5], np.sqrt(2 * f / (1 + f)))
    np.testing.assert_array_equal(w[5:], 0.0)  # zero from the first FSC < 1e-4 on


def test_fsc_weighted_shells_leave_the_fit(flat_map):
    blurred = _blur(flat_map, 100.0)
    ones = guinier_bfactor(blurred, PX, np.ones(BOX // 2 + 1), fit_high_A=2.5)
    plain = guinier_bfactor(blurred, PX, fit_high_A=2.5)
    assert ones.bfactor_A2 == pytest.approx(plain.bfactor_A2)
    curve = np.where(np.arange(BOX // 2 + 1) <= 16, 1.0, 0.0)  # FSC gone beyond 4 Å
    cut = guinier_bfactor(blurred, PX, curve)
    assert cut.fit_range_A == pytest.approx((64 / 7, 4.0))
    assert not cut.in_fit[17:].any() and np.isnan(cut.ln_amplitude_weighted[17:]).all()
    assert cut.bfactor_A2 == pytest.approx(-100.0, rel=0.05)


def test_no_fit_without_shells_beyond_10_A(flat_map):
    fit = guinier_bfactor(flat_map[:32, :32, :32], 5.0)  # Nyquist 10 Å: one shell in range
    assert fit.bfactor_A2 is None and fit.fit_range_A is None and not fit.in_fit.any()


def test_guinier_curve_axes(flat_map):
    fit = guinier_bfactor(flat_map, 2.0)
    assert fit.s2_invA2.shape == (BOX // 2 + 1,)
    assert fit.s2_invA2[-1] == pytest.approx(1 / 4.0 ** 2)  # Nyquist 4 Å at 2 Å/px
    first = np.flatnonzero(fit.in_fit)[0]
    assert BOX * 2.0 / first <= 10.0 < BOX * 2.0 / (first - 1)  # RELION: res ≤ 10 Å
