import numpy as np

from dask_refine.core.backprojection import FourierSums, backproject_particles
from dask_refine.core.fourier import centred_rfftn
from dask_refine.core.fsc import fsc, resolution_at_threshold, shell_sums
from dask_refine.core.reconstruction import reconstruct
from dask_refine.io.simulate import SimulationConfig, render_particles, simulate_metadata
from dask_refine.core.projection import prepare_reference_rfft


def _noise_free(demo_map, n, ctf=True):
    volume, px = demo_map
    cfg = SimulationConfig(n_particles=n, snr=np.inf, ctf=ctf, seed=5)
    sim = simulate_metadata(cfg, volume.shape[0], px)
    images = render_particles(prepare_reference_rfft(volume), sim["meta"], sim["truth"],
                              slice(0, n), volume.shape[0], px, ctf)
    meta = {**sim["meta"], **sim["truth"]}
    return volume, px, images, meta


def test_noise_free_reconstruction_with_known_poses(demo_map):
    """Brief: FSC to the ground truth ≥ 0.9 out to 0.8 × Nyquist at box 64 (CTF on)."""
    volume, px, images, meta = _noise_free(demo_map, 1500)
    box = volume.shape[0]
    sums = backproject_particles(FourierSums.zeros(1, box), images, meta,
                                 np.zeros(len(images), int), px)
    rec = reconstruct(sums.data[0], sums.weight[0], box)
    curve = fsc(rec, volume)
    last = int(0.8 * box // 2)
    assert curve[1:last + 1].min() >= 0.9, curve
    assert resolution_at_threshold(curve, box, px, 0.5) < 2.0 * px / 0.8


def test_reconstruction_scale_and_scales_cancel(demo_map):
    """Per-particle scales s are undone exactly (num Σ s·C·X, weights Σ s²·C²)."""
    volume, px, images, meta = _noise_free(demo_map, 600, ctf=False)
    box = volume.shape[0]
    sums = backproject_particles(FourierSums.zeros(1, box), images, meta,
                                 np.zeros(len(images), int), px, use_ctf=False)
    rec = reconstruct(sums.data[0], sums.weight[0], box)
    # amplitude per Fourier shell, Re⟨rec, truth⟩ / |truth|², out to 0.8 × Nyquist
    ft, fr = centred_rfftn(volume.astype(np.float64), 3), centred_rfftn(rec.astype(np.float64), 3)
    ratio = shell_sums((fr * ft.conj()).real, box, 3) / shell_sums(abs(ft) ** 2, box, 3)
    np.testing.assert_allclose(ratio[1:int(0.8 * box / 2)], 1.0, atol=0.03)


def test_nan_image_is_reported_with_its_index(demo_map):
    volume, px, images, meta = _noise_free(demo_map, 8)
    images[5, 3, 3] = np.nan
    try:
        backproject_particles(FourierSums.zeros(1, 64), images, meta, np.zeros(8, int), px,
                              first_index=100)
    except ValueError as exc:
        assert "particle 105" in str(exc)
    else:
        raise AssertionError("NaN pixels were accepted")
