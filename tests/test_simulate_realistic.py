"""The simulator's real-data nuisances (junk, preferred views, coloured noise, an undeclared
envelope), each tested against its definition; with the defaults the images are the clean
model's, bit for bit."""

import math

import numpy as np
import pytest

from dask_refine.core.ctf import ctf_rfft
from dask_refine.core.fourier import (centred_irfftn, centred_rfftn, fourier_downsample,
                                      rfft_radius, translate_rfft)
from dask_refine.core.projection import extract_central_slices_rfft, prepare_reference_rfft
from dask_refine.core.rotations import matrix_to_euler, random_rotations
from dask_refine.io.errors import InputError
from dask_refine.io.simulate import (EMPTY_ICE, JUNK_BLOB, SimulationConfig, render_particles,
                                     resimulate_rows, simulate_metadata, simulate_store)
from dask_refine.io.store import GROUND_TRUTH


@pytest.fixture(scope="module")
def small_map(demo_map):
    """The shipped map Fourier-cropped to box 32 (4 Å/px)."""
    volume, px = demo_map
    return fourier_downsample(volume, 32).astype(np.float32), px * volume.shape[0] / 32


def _clean_model(volume, px, cfg):
    """A copy of the simulator before the nuisances: images ``(N, D, D)`` and the truth."""
    box, n = volume.shape[-1], cfg.n_particles
    rng = np.random.default_rng([cfg.seed, 1])
    defocus = rng.uniform(cfg.defocus_min_A, cfg.defocus_max_A, n)
    astig = rng.uniform(0.0, cfg.astigmatism_max_A, n)
    shift = np.clip(rng.normal(0.0, cfg.shift_sigma_A, (n, 2)), -0.15 * box * px, 0.15 * box * px)
    ctf = {"defocus_u_A": defocus + 0.5 * astig, "defocus_v_A": defocus - 0.5 * astig,
           "defocus_angle_deg": rng.uniform(0.0, 180.0, n), "phase_shift_deg": np.zeros(n),
           "bfactor_A2": np.full(n, cfg.bfactor_A2), "voltage_kV": np.full(n, cfg.voltage_kV),
           "cs_mm": np.full(n, cfg.cs_mm), "amplitude_contrast": np.full(n, cfg.amplitude_contrast)}
    rotation = random_rotations(n, rng)
    scale = rng.uniform(cfg.scale_min, cfg.scale_max, n)
    reference = prepare_reference_rfft(np.asarray(volume, np.float32), cfg.pad)

    def render(rows):
        weight = scale[rows].reshape(-1, 1, 1)
        if cfg.ctf:
            weight = weight * ctf_rfft(box, px, **{k: v[rows] for k, v in ctf.items()})
        f = translate_rfft(extract_central_slices_rfft(reference, rotation[rows], box)
                           * weight.astype(np.float32), -shift[rows] / px)
        return centred_irfftn(f, 2, box).astype(np.float32)

    sigma = 1.0
    if math.isfinite(cfg.snr):
        sigma = math.sqrt(float(render(slice(0, min(n, 200))).var(axis=(1, 2)).mean()) / cfg.snr)
    seeds = np.random.SeedSequence([cfg.seed, 2]).spawn(math.ceil(n / cfg.chunk_size))
    images = []
    for i, start in enumerate(range(0, n, cfg.chunk_size)):
        block = render(slice(start, min(start + cfg.chunk_size, n)))
        if math.isfinite(cfg.snr):
            noise = np.random.default_rng(seeds[i]).standard_normal(block.shape, dtype=np.float32)
            block = (block + sigma * noise) / sigma
        images.append(block)
    return np.concatenate(images), {"rotation": rotation, "shift_A": shift, "scale": scale}


@pytest.mark.parametrize("cfg", [
    SimulationConfig(n_particles=70, chunk_size=30, seed=7),
    SimulationConfig(n_particles=40, snr=np.inf, ctf=False, bfactor_A2=50.0, chunk_size=16,
                     seed=2)], ids=["ctf_noise", "no_ctf_noise_free"])
def test_defaults_are_bit_identical_to_the_clean_model(tmp_path, demo_map, cfg):
    volume, px = demo_map
    store = simulate_store(volume, px, tmp_path / "s.zarr", cfg)
    images, truth = _clean_model(volume, px, cfg)
    np.testing.assert_array_equal(store.images[:], images)
    for name, values in truth.items():
        np.testing.assert_array_equal(store.read_column(name, group=GROUND_TRUTH), values)
    assert not store.read_column("is_junk", group=GROUND_TRUTH).any()


@pytest.mark.parametrize("field, value", [
    ("junk_fraction", 1.0), ("junk_fraction", -0.1), ("preferred_view_fraction", 1.0),
    ("preferred_view_spread_deg", 0.0), ("envelope_bfactor_A2", -1.0), ("noise_color", "pink"),
    ("junk_fraction", float("nan"))])
def test_bad_nuisance_values_are_refused_naming_the_field(field, value):
    with pytest.raises(InputError) as err:
        SimulationConfig(**{field: value})
    assert err.value.where == field


def test_junk_count_kinds_and_images(tmp_path, small_map):
    """round_half_up(junk_fraction · N) junk rows, half (rounded down) empty ice; empty rows are
    signal-free, blob rows are not the map's projections but have its mean image variance."""
    volume, px = small_map
    for n, fraction, n_junk in [(101, 0.1, 10), (25, 0.1, 3), (50, 0.05, 3), (40, 0.0, 0)]:
        kinds = simulate_metadata(SimulationConfig(n_particles=n, junk_fraction=fraction),
                                  32, px)["junk_kind"]
        assert (kinds > 0).sum() == n_junk
        assert (kinds == EMPTY_ICE).sum() == n_junk // 2

    cfg = SimulationConfig(n_particles=240, snr=np.inf, junk_fraction=0.25, chunk_size=64, seed=3)
    store = simulate_store(volume, px, tmp_path / "j.zarr", cfg)
    is_junk = store.read_column("is_junk", group=GROUND_TRUTH)
    kind = store.read_column("junk_kind", group=GROUND_TRUTH)
    assert is_junk.dtype == bool and is_junk.sum() == 60 and np.array_equal(is_junk, kind > 0)
    rotation = store.read_column("rotation", group=GROUND_TRUTH)  # a rotation for every row
    np.testing.assert_allclose(np.einsum("nij,nkj->nik", rotation, rotation),
                               np.broadcast_to(np.eye(3), rotation.shape), atol=1e-12)
    images = store.images[:]
    sim = simulate_metadata(cfg, 32, px)
    clean = render_particles(prepare_reference_rfft(volume), sim["meta"], sim["truth"],
                             slice(None), 32, px)
    particle, empty, blob = kind == 0, kind == EMPTY_ICE, kind == JUNK_BLOB
    np.testing.assert_array_equal(images[particle], clean[particle])
    assert not images[empty].any()
    var = images.var(axis=(1, 2))
    assert 0.6 < var[blob].mean() / var[particle].mean() < 1.6
    corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(images[blob], clean[blob])]
    assert np.median(np.abs(corr)) < 0.5  # unrelated to the map's projection at that pose


def test_preferred_views_concentrate_around_the_top_view():
    spread_deg, fraction = 10.0, 0.3
    base = SimulationConfig(n_particles=4000, junk_fraction=0.1, seed=5)
    cfg = SimulationConfig(n_particles=4000, junk_fraction=0.1, seed=5,
                           preferred_view_fraction=fraction, preferred_view_spread_deg=spread_deg)
    uniform, sim = simulate_metadata(base, 64, 2.0), simulate_metadata(cfg, 64, 2.0)
    keep = sim["junk_kind"] == 0
    rot, rot0 = sim["truth"]["rotation"], uniform["truth"]["rotation"]
    changed = np.any(rot != rot0, axis=(1, 2))
    # round_half_up(fraction · non-junk) of the non-junk rows, the others untouched
    assert changed.sum() == math.floor(fraction * keep.sum() + 0.5) and not changed[~keep].any()
    for k in ("shift_A", "scale"):
        np.testing.assert_array_equal(sim["truth"][k], uniform["truth"][k])
    # the viewing direction is the third row (A^T z); its angle from +z
    angle = np.rad2deg(np.arccos(np.clip(rot[:, 2, 2], -1, 1)))
    within = np.mean(angle[keep] <= 3 * spread_deg)
    kappa = 1 / np.radians(spread_deg) ** 2
    p_fisher = -np.expm1(-kappa * (1 - np.cos(np.radians(3 * spread_deg))))
    p_uniform = (1 - np.cos(np.radians(3 * spread_deg))) / 2
    assert within >= fraction
    assert abs(within - (fraction * p_fisher + (1 - fraction) * p_uniform)) < 0.03
    # for this spread the angle from +z is ≈ Rayleigh(σ): E[θ²] = 2σ²
    assert abs(np.mean(angle[changed] ** 2) / (2 * spread_deg ** 2) - 1) < 0.1
    _, _, psi = matrix_to_euler(rot[changed])  # uniform in-plane angle
    assert abs(np.mean(np.exp(1j * np.radians(psi)))) < 0.1


def _shell_power(images):
    """Mean |FT|²/D² per integer shell 1 … D/2 − 1 (pixels of the centred rfft, both halves)."""
    box = images.shape[-1]
    power = (np.abs(centred_rfftn(images.astype(np.float64), 2)) ** 2).mean(axis=0) / box ** 2
    shell = np.rint(rfft_radius(box, 2)).astype(int)
    return np.array([power[shell == s].mean() for s in range(1, box // 2)]), shell


def _ice_profile(box, px):
    """The ice spectrum by its definition, normalised over the full D×D transform."""
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(box), np.fft.fftfreq(box))) / px
    full = (1 + 4 * np.exp(-(k * 40.0) ** 2)) * np.maximum(0, 1 - 0.5 * (k * 2 * px) ** 2)
    k_rfft = rfft_radius(box, 2) / (box * px)
    half = ((1 + 4 * np.exp(-(k_rfft * 40.0) ** 2))
            * np.maximum(0, 1 - 0.5 * (k_rfft * 2 * px) ** 2)) / full.mean()
    shell = np.rint(rfft_radius(box, 2)).astype(int)
    return np.array([half[shell == s].mean() for s in range(1, box // 2)])


@pytest.mark.parametrize("color", ["white", "ice"])
def test_noise_spectrum_follows_the_configured_profile(tmp_path, small_map, color):
    """Pure-noise images (SNR 1e-8: the signal is 1e-8 of the noise power) have unit variance
    per pixel and the configured radial power spectrum, also after resimulate_rows."""
    volume, px = small_map
    cfg = SimulationConfig(n_particles=300, snr=1e-8, noise_color=color, chunk_size=100, seed=1)
    store = simulate_store(volume, px, tmp_path / "n.zarr", cfg)
    expected = np.ones(15) if color == "white" else _ice_profile(32, px)
    if color == "ice":
        assert expected[0] > 3 * expected[-1]  # the profile is far from flat
    for images in (store.images[:],
                   resimulate_rows(tmp_path / "n.zarr", volume, slice(0, 300), seed=2).images[:]):
        assert abs(images.var() - 1) < 0.03
        measured, _ = _shell_power(images)
        np.testing.assert_allclose(measured, expected, rtol=0.12)


def test_envelope_is_in_the_images_but_not_in_the_ctf_column(tmp_path, demo_map):
    volume, px = demo_map
    bfactor = 100.0
    common = dict(n_particles=12, snr=np.inf, bfactor_A2=30.0, chunk_size=5, seed=4)
    plain = simulate_store(volume, px, tmp_path / "a.zarr", SimulationConfig(**common))
    enveloped = simulate_store(volume, px, tmp_path / "b.zarr",
                               SimulationConfig(**common, envelope_bfactor_A2=bfactor))
    np.testing.assert_array_equal(enveloped.read_column("bfactor_A2"), 30.0)  # declared only
    a, b = centred_rfftn(plain.images[:], 2), centred_rfftn(enveloped.images[:], 2)
    box = a.shape[-2]
    r = rfft_radius(box, 2)
    k = r / (box * px)
    use = (r < box / 2 - 1) & (np.abs(a) > 1e-2 * np.abs(a).max(axis=(1, 2), keepdims=True))
    ratio = b / np.where(use, a, 1)
    expected = np.broadcast_to(np.exp(-bfactor * k ** 2 / 4), a.shape)
    assert expected[use].min() < 0.3  # the test reaches frequencies where the envelope matters
    np.testing.assert_allclose(ratio[use].real, expected[use], rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(ratio[use].imag, 0, atol=2e-3)


def test_resimulate_rows_keeps_junk_and_the_envelope(tmp_path, small_map):
    volume, px = small_map
    cfg = SimulationConfig(n_particles=60, snr=np.inf, junk_fraction=0.2, envelope_bfactor_A2=80.0,
                           preferred_view_fraction=0.5, chunk_size=25, seed=6)
    original = simulate_store(volume, px, tmp_path / "r.zarr", cfg).images[:]
    store = resimulate_rows(tmp_path / "r.zarr", 0.5 * volume, slice(10, 60), seed=1)
    junk = store.read_column("is_junk", group=GROUND_TRUTH)
    images = store.images[:]
    np.testing.assert_array_equal(images[:10], original[:10])
    np.testing.assert_array_equal(images[10:][junk[10:]], original[10:][junk[10:]])
    moved = ~junk & (np.arange(60) >= 10)
    assert moved.sum() > 30
    np.testing.assert_allclose(images[moved], 0.5 * original[moved],
                               atol=1e-4 * np.abs(original).max())


def test_resimulate_rows_refuses_junk_it_cannot_tell_apart(tmp_path, small_map):
    volume, px = small_map
    cfg = SimulationConfig(n_particles=20, snr=np.inf, junk_fraction=0.2, chunk_size=10)
    store = simulate_store(volume, px, tmp_path / "r.zarr", cfg)
    del store.group[GROUND_TRUTH]["is_junk"]
    with pytest.raises(InputError, match="is_junk"):
        resimulate_rows(tmp_path / "r.zarr", volume, slice(0, 20))


def test_cli_options_reach_the_store_and_bad_ones_exit_2(tmp_path, capsys):
    from dask_refine.data import demo_map_path
    from dask_refine.io.store import ParticleStore
    from dask_refine.ui.cli import main

    mrc = str(demo_map_path())
    code = main(["simulate", mrc, str(tmp_path / "s.zarr"), "--n-particles", "20",
                 "--junk-fraction", "0.1", "--preferred-view-fraction", "0.3",
                 "--preferred-view-spread-deg", "5", "--noise-color", "ice",
                 "--envelope-bfactor-A2", "100"])
    assert code == 0
    sim = ParticleStore.open(tmp_path / "s.zarr").attrs["provenance"]["simulation"]
    assert (sim["junk_fraction"], sim["preferred_view_fraction"], sim["preferred_view_spread_deg"],
            sim["noise_color"], sim["envelope_bfactor_A2"]) == (0.1, 0.3, 5.0, "ice", 100.0)
    capsys.readouterr()
    for option, value in [("--junk-fraction", "1"), ("--preferred-view-fraction", "-0.5"),
                          ("--preferred-view-spread-deg", "0"), ("--envelope-bfactor-A2", "-1")]:
        code = main(["simulate", mrc, str(tmp_path / "bad.zarr"), option, value])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"error: {option}:") and err.count("\n") == 1
        assert not (tmp_path / "bad.zarr").exists()
