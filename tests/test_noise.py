"""The first noise model and greyscale (:mod:`dask_refine.core.noise`): measured in the images'
background, so that coloured noise is not taken for signal."""

import numpy as np
import pytest

from dask_refine.core.fourier import centred_rfftn
from dask_refine.core.noise import (background_noise_power, initial_noise_and_scale,
                                    shell_mean)
from dask_refine.core.projection import extract_central_slices_rfft, prepare_reference_rfft
from dask_refine.core.rotations import random_rotations
from dask_refine.io.simulate import noise_power_rfft, simulate_noise

BOX, PX = 48, 3.0


def _shell_power(images):
    return shell_mean((np.abs(centred_rfftn(images, 2)) ** 2).mean(axis=0), BOX, 2)


@pytest.mark.parametrize("color", ["white", "ice"])
def test_background_power_is_the_noise_spectrum(color):
    """On noise alone the background estimate equals the noise's power spectrum (its definition,
    ``D² ·`` :func:`noise_power_rfft` averaged per shell) within 10% in every shell past the
    first two (where a shell holds few pixels), for white and for coloured noise."""
    noise = simulate_noise(np.random.default_rng(1), (400, BOX, BOX), PX, color)
    measured = background_noise_power(noise, radius_px=0.4 * BOX)
    expected = shell_mean(BOX * BOX * noise_power_rfft(BOX, PX, color), BOX, 2)
    np.testing.assert_allclose(measured[2:], expected[2:], rtol=0.10)


def test_background_power_ignores_the_particle():
    """With a particle inside the disc, the background estimate stays the noise's (within 10%),
    while the images' power holds the particle's signal too (> 1.5× the noise at low
    resolution)."""
    rng = np.random.default_rng(2)
    x = np.arange(BOX) - BOX // 2
    z, y, xx = np.meshgrid(x, x, x, indexing="ij")
    volume = np.exp(-(z ** 2 + y ** 2 + (xx - 3) ** 2) / 40.0) + np.exp(
        -((z + 4) ** 2 + (y - 2) ** 2 + xx ** 2) / 25.0)
    ref = prepare_reference_rfft(volume.astype(np.float32))
    slices = extract_central_slices_rfft(ref, random_rotations(300, rng), BOX)
    from dask_refine.core.fourier import centred_irfftn

    signal = centred_irfftn(slices, 2, BOX)
    signal *= 0.6 / signal.std()
    images = signal + simulate_noise(rng, signal.shape, PX, "ice")
    expected = shell_mean(BOX * BOX * noise_power_rfft(BOX, PX, "ice"), BOX, 2)
    measured = background_noise_power(images, radius_px=0.4 * BOX)
    np.testing.assert_allclose(measured[2:], expected[2:], rtol=0.10)
    assert (_shell_power(images)[2:4] > 1.5 * expected[2:4]).all()


def test_greyscale_from_the_background_under_coloured_noise(demo_map):
    """Images ``g · slice + coloured noise`` of a real map: with the background noise model the
    fitted greyscale is ``g`` within 10% and σ² is the noise's; the white-noise assumption is
    off by more than 30% on the same images (why the background is measured)."""
    volume, px = demo_map
    box = volume.shape[0]
    rng = np.random.default_rng(3)
    ref = prepare_reference_rfft(volume)
    slices = extract_central_slices_rfft(ref, random_rotations(300, rng), box)
    from dask_refine.core.fourier import centred_irfftn

    clean = centred_irfftn(slices, 2, box)
    g_true = 0.4 / clean.std()  # SNR 0.16
    images = g_true * clean + simulate_noise(rng, clean.shape, px, "ice")
    power = shell_mean((np.abs(centred_rfftn(images, 2)) ** 2).mean(axis=0), box, 2)
    ref_power = shell_mean(np.abs(centred_rfftn(volume.astype(np.float64), 3)) ** 2, box, 3)
    ctf2 = np.ones(box // 2 + 1)
    noise = background_noise_power(images, radius_px=0.4 * box)
    g, sigma2 = initial_noise_and_scale(power, ctf2, ref_power, box * px / 30.0, noise)
    assert g == pytest.approx(g_true, rel=0.10)
    expected = shell_mean(box * box * noise_power_rfft(box, px, "ice"), box, 2)
    np.testing.assert_allclose(sigma2[2:], expected[2:], rtol=0.10)
    g_white, _ = initial_noise_and_scale(power, ctf2, ref_power, box * px / 30.0)
    assert abs(g_white / g_true - 1) > 0.3


def test_no_background_when_the_particle_fills_the_box():
    images = np.random.default_rng(0).standard_normal((4, BOX, BOX))
    assert background_noise_power(images, radius_px=0.7 * BOX) is None
