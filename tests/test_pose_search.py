import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dask_refine.core.backprojection import particle_ctfs
from dask_refine.core.fourier import centred_fftn, centred_ifftn, centred_rfftn, crop_centred
from dask_refine.core import so3_grid
from dask_refine.core.pose_search import (ParticleData, SearchParams, _Particle, _slices,
                                          amplitude_envelope, band_pixels, branch_and_bound,
                                          cell_deltas, cell_lower_bounds, exhaustive_evaluations,
                                          exhaustive_search, high_band_bound, pose_error,
                                          reachable_origins, rotation_spread,
                                          search_high_band_bounds)
from dask_refine.core.projection import extract_central_slices_rfft, prepare_reference_rfft
from dask_refine.core.rotations import angular_distance_deg, random_rotations
from dask_refine.io.simulate import SimulationConfig, render_particles, simulate_metadata


@pytest.fixture(scope="module")
def small_map(demo_map):
    """The demo map Fourier-cropped to box 32 (4 Å/px)."""
    volume, px = demo_map
    f = crop_centred(centred_fftn(volume.astype(np.float64), 3), 32, 3)
    return (centred_ifftn(f, 3).real / 8).astype(np.float32), 2 * px


def _particles(volume, px, n, snr=np.inf, seed=3):
    box = volume.shape[0]
    ref = prepare_reference_rfft(volume)
    cfg = SimulationConfig(n_particles=n, snr=snr, seed=seed, shift_sigma_A=4.0)
    sim = simulate_metadata(cfg, box, px)
    meta = {**sim["meta"], **sim["truth"]}
    images = render_particles(ref, sim["meta"], sim["truth"], slice(0, n), box, px)
    weight = np.ones((box, box // 2 + 1))
    if np.isfinite(snr):
        sigma = np.sqrt(images.var() / snr)
        images = images + sigma * np.random.default_rng(seed).standard_normal(images.shape)
        weight = weight / (box * box * sigma * sigma)  # 1/E|N_k|² of the unnormalised rfft
    data = ParticleData(centred_rfftn(images, 2), particle_ctfs(meta, box, px),
                        sim["truth"]["scale"], weight)
    return ref, data, sim["truth"]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), band=st.floats(1.0, 10.0), scale=st.floats(0.2, 3.0),
       noise=st.floats(0.0, 3.0))
def test_lower_bound_never_exceeds_true_error(seed, band, scale, noise):
    """E_L(R, o) + bound([L, r_align)) ≤ E_{r_align}(R, o) for random images, maps and poses."""
    rng = np.random.default_rng(seed)
    box, r_align = 16, 7.5
    ref = prepare_reference_rfft(rng.standard_normal((box,) * 3))
    rot = random_rotations(3, rng)
    signal = extract_central_slices_rfft(ref, random_rotations(3, rng), box)
    images = signal + noise * (rng.standard_normal(signal.shape)
                               + 1j * rng.standard_normal(signal.shape)) * np.abs(signal).mean()
    ctf = rng.uniform(-1, 1, signal.shape)
    data = ParticleData(images, ctf, np.full(3, scale), rng.uniform(0.5, 2.0, (box, box // 2 + 1)))
    origins = rng.uniform(-3, 3, (3, 2))
    env = amplitude_envelope(ref, box)
    true = pose_error(ref, data, rot, origins, r_align)
    low = pose_error(ref, data, rot, origins, min(band, r_align))
    for b in range(3):
        assert low[b] + high_band_bound(data, b, env, band, r_align) <= true[b] * (1 + 1e-9) + 1e-9


def test_envelope_bounds_every_slice(rng):
    box = 16
    ref = prepare_reference_rfft(rng.standard_normal((box,) * 3))
    env = amplitude_envelope(ref, box)
    slices = extract_central_slices_rfft(ref, random_rotations(200, rng), box)
    assert np.all(np.abs(slices) <= env[None] * (1 + 1e-6) + 1e-9)


def test_branch_and_bound_finds_the_exhaustive_optimum(small_map):
    """Noise-free particles (no noise model: ε = 0, deterministic bounds only): every certified
    particle reaches the exhaustive optimum on the same finest grid, with ≥ 10× less work."""
    volume, px = small_map
    ref, data, truth = _particles(volume, px, 30)
    params = SearchParams(r_align=12, particle_radius_px=11, first_level=2, last_level=3,
                          max_shift_px=2, shift_step_px=1, failure_probability=0.0)
    bnb = branch_and_bound(ref, data, params)
    exh = exhaustive_search(ref, data, params)
    same = bnb.error <= exh.error * (1 + 1e-6)
    assert bnb.certified.all() and same.all(), np.flatnonzero(~same)
    assert bnb.n_pixel_evaluations.mean() * 10 < exh.n_pixel_evaluations[0]
    assert exh.n_evaluations[0] == exhaustive_evaluations(params)
    c4 = SearchParams(**{**params.__dict__, "symmetry": "C4"})
    assert exhaustive_evaluations(c4) < exhaustive_evaluations(params) / 2  # ¼ + cell margin
    # and the poses are the true ones to within the grid
    assert np.median(angular_distance_deg(bnb.rotation, truth["rotation"])) < 7.5
    assert np.median(np.abs(bnb.origin_px - truth["shift_A"] / px)) <= 0.5


def test_certified_search_returns_the_exhaustive_optimum_on_noisy_particles(small_map):
    """Noisy particles (SNR 0.05, the noise model of the noise added, ε = 10⁻³): every particle
    the search certifies gets the exhaustive optimum of the finest grid."""
    volume, px = small_map
    ref, data, _ = _particles(volume, px, 12, snr=0.05, seed=21)
    params = SearchParams(r_align=10, particle_radius_px=11, first_level=2, last_level=3,
                          max_shift_px=2)
    bnb = branch_and_bound(ref, data, params)
    exh = exhaustive_search(ref, data, params)
    assert bnb.certified.mean() >= 0.9
    same = bnb.error <= exh.error * (1 + 1e-6)
    assert same[bnb.certified].all(), np.flatnonzero(~same)
    assert np.all(bnb.n_pixel_evaluations < exh.n_pixel_evaluations)
    # the cap is only a safety valve: with a tiny cap the particles are flagged
    capped = branch_and_bound(ref, data,
                              SearchParams(**{**params.__dict__, "max_candidates": 50}))
    assert not capped.certified.any()
    assert all(sum(step[4] for step in steps) > 0 for steps in capped.pruning)


def test_search_with_noise_and_trace(small_map):
    volume, px = small_map
    ref, data, truth = _particles(volume, px, 10, snr=0.5, seed=9)
    params = SearchParams(r_align=10, particle_radius_px=11, first_level=2, last_level=3,
                          max_shift_px=2, posterior_window=20.0)
    res = branch_and_bound(ref, data, params, trace=True)
    err = angular_distance_deg(res.rotation, truth["rotation"])
    assert np.median(err) < 10.0
    level = res.trace[0][0]
    assert level["n_kept"] <= level["n_candidates"] and level["best_bound"] <= level["best_true"]
    assert {"band", "bounds", "final_errors", "n_pruned_bound", "n_pruned_cap"} <= set(
        res.trace[0][-1])
    violations = total = 0
    for b, (levels, evals) in enumerate(zip(res.trace, res.n_evaluations)):
        for lv in levels:
            n = lv["n_candidates"]
            assert lv["true_errors"].shape == lv["bounds"].shape == lv["kept"].shape == (n,)
            assert lv["rotations"].shape == (n, 3, 3) and lv["kept"].sum() == lv["n_kept"]
            assert lv["n_pruned_bound"] + lv["n_pruned_cap"] + lv["n_kept"] == n
            # a cell's bound holds for its centre too (with probability ≥ 1 − ε per pose)
            violations += int(np.sum(lv["bounds"] > lv["true_errors"] * (1 + 1e-9) + 1e-6))
            total += n
            kept = lv["kept"]  # survivors are within the best true error plus the window
            assert np.all(lv["bounds"][kept] <= lv["best_true"] + params.posterior_window + 1e-9)
        assert levels[-1]["evaluations"] <= evals
        # the returned pose is the best true error among the last level's survivors
        assert np.isclose(levels[-1]["final_errors"].min(), res.error[b])
        rots, origins, errors = res.candidates[b]
        assert np.isclose(errors[0], res.error[b]) and np.all(errors <= errors[0] + 20.0)
        assert np.all(np.diff(errors) >= 0) and rots.shape == (errors.size, 3, 3)
    assert violations <= params.failure_probability * total + 3 * np.sqrt(
        params.failure_probability * total) + 1


def test_local_search_around_prior(small_map):
    volume, px = small_map
    ref, data, truth = _particles(volume, px, 20, seed=11)
    # priors: the true rotations perturbed by a few degrees
    rng = np.random.default_rng(5)
    from dask_refine.core.rotations import euler_to_matrix

    kick = euler_to_matrix(rng.uniform(-4, 4, 20), rng.uniform(-4, 4, 20), rng.uniform(-4, 4, 20))
    prior = kick @ truth["rotation"]
    params = SearchParams(r_align=12, particle_radius_px=11, last_level=4, max_shift_px=2,
                          local=True, local_level=3, failure_probability=0.0)
    local = branch_and_bound(ref, data, params, prior_rotation=prior,
                             prior_origin_px=truth["shift_A"] / px)
    assert np.median(angular_distance_deg(local.rotation, truth["rotation"])) < 3.75
    full = SearchParams(r_align=12, particle_radius_px=11, first_level=2, last_level=4,
                        failure_probability=0.0)
    assert local.n_evaluations.mean() < 0.2 * branch_and_bound(ref, data, full).n_evaluations.mean()


def test_band_pixels_multiplicity():
    sel, kx, ky, mult = band_pixels(16, 0.0, 8.0)
    assert np.all(kx ** 2 + ky ** 2 < 64)
    assert set(np.unique(mult)) == {1.0, 2.0}
    assert np.all(mult[kx == 0] == 1.0)


def _lowpass_map(rng, box, sigma_px):
    """A random volume low-passed by a Gaussian of ``sigma_px`` Fourier pixels."""
    f = centred_fftn(rng.standard_normal((box,) * 3), 3)
    k = np.arange(box) - box // 2
    k2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
    return centred_ifftn(f * np.exp(-0.5 * k2 / sigma_px ** 2), 3).real


def _cell_case(rng, box, level, last, coarse, snr, scale, sigma_px=3.0):
    """A random map, cell of ``level``, centre origin, and an image of a pose of the cell
    (a last-level descendant and reachable origin, drawn before the noise) with white noise
    and its exact noise model. Returns what the bound and the check need."""
    ref = prepare_reference_rfft(_lowpass_map(rng, box, sigma_px))
    d = int(rng.integers(so3_grid.n_directions(level)))
    p = int(rng.integers(so3_grid.n_psi(level)))
    h = (2 ** (last - level) - 1.0) if coarse else 0.0  # shift spread of the cell (1 px step)
    o_c = rng.uniform(-2, 2, 2)
    owner, dd, dp = so3_grid.descendant_cells(level, [d], [p], last)
    rots = so3_grid.cell_rotations(last, dd, dp)
    shifts = o_c[None, :] + (so3_grid.shift_grid(h, 1.0) if h > 0 else np.zeros((1, 2)))
    j, t = int(rng.integers(rots.shape[0])), int(rng.integers(shifts.shape[0]))
    ctf = rng.uniform(-1, 1, (box, box // 2 + 1))
    signal = scale * ctf * extract_central_slices_rfft(ref, rots[j:j + 1], box)[0]
    ky, kx = np.meshgrid(np.arange(box) - box // 2, np.arange(box // 2 + 1), indexing="ij")
    signal = signal * np.exp(2j * np.pi * (kx * shifts[t, 0] + ky * shifts[t, 1]) / box)
    clean = centred_ifftn_2d(signal, box)
    sigma = np.sqrt(clean.var() / snr)
    return dict(ref=ref, d=d, p=p, h=h, o_c=o_c, rots=rots, shifts=shifts, ctf=ctf,
                signal=signal, sigma=sigma, scale=scale, pose=(j, t),
                weight=np.full((box, box // 2 + 1), 1.0 / (box * box * sigma * sigma)))


def centred_ifftn_2d(rfft, box):
    from dask_refine.core.fourier import centred_irfftn

    return centred_irfftn(rfft[None], 2, box)[0]


def _cell_errors(case, image_rfft, level, r_align, bands, eps):
    """For one image: per band, the cell bound pieces and the errors of every pose of the cell:
    ``[(lb_low, lb, E_L (n_rot, n_shift), E (n_rot, n_shift))]``."""
    box = image_rfft.shape[0]
    data = ParticleData(image_rfft[None], case["ctf"][None], np.array([case["scale"]]),
                        case["weight"])
    env = amplitude_envelope(case["ref"], box)
    last_rots = case["rots"]
    full = _Particle(data, 0, band_pixels(box, 0.0, r_align))
    true = full.errors(case["shifts"], _slices(case["ref"], box, last_rots, full.kx,
                                               full.ky))[0]
    out = []
    centre = so3_grid.cell_rotations(level, [case["d"]], [case["p"]])
    for band in bands:
        part = _Particle(data, 0, band_pixels(box, 0.0, band))
        yc = _slices(case["ref"], box, centre, part.kx, part.ky)
        spread, _ = rotation_spread(case["ref"], box, level, case["last"], np.array([case["d"]]),
                                    np.array([case["p"]]), yc, part.kx, part.ky)
        delta = cell_deltas(part, spread, yc, case["h"])[0]
        e_c = float(part.errors(case["o_c"][None, :], yc)[0][0, 0])
        high = search_high_band_bounds(data, env, band, r_align, eps)[0]
        low = part.errors(case["shifts"], _slices(case["ref"], box, last_rots, part.kx,
                                                  part.ky))[0]
        lb_low = float(cell_lower_bounds(np.array([e_c]), delta, 0.0)[0])
        out.append((lb_low, lb_low + high, low, true))
    return out


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), level=st.sampled_from([1, 2]),
       depth=st.sampled_from([1, 2]), coarse=st.booleans(), snr=st.floats(0.02, 3.0),
       scale=st.floats(0.3, 3.0), sigma_px=st.floats(1.5, 5.0))
def test_cell_bound_holds_over_the_whole_cell(seed, level, depth, coarse, snr, scale, sigma_px):
    """Theorem (deterministic): ``E_L(R_d, o) ≥ (√E_L(R_c, o_c) − Δ)₊²`` for every last-level
    descendant R_d and every reachable origin o of the cell, on random low-passed maps, CTFs,
    scales and noise; and the whole bound (ε = 10⁻³) stays below every pose's true error."""
    rng = np.random.default_rng(seed)
    box, r_align, last = 16, 7.0, level + depth
    case = _cell_case(rng, box, level, last, coarse, snr, scale, sigma_px)
    case["last"] = last
    noise = centred_rfftn(case["sigma"] * rng.standard_normal((1, box, box)), 2)[0]
    image = case["signal"] + noise
    bands = [2.0, 3.5, 5.0, r_align]
    for lb_low, lb, low, true in _cell_errors(case, image, level, r_align, bands, 1e-3):
        assert np.all(low >= lb_low * (1 - 1e-9) - 1e-9), (lb_low, low.min())
        assert np.all(true >= lb * (1 - 1e-9) - 1e-9), (lb, true.min())


def test_cell_bound_failure_rate_is_within_epsilon():
    """The probabilistic guarantee, counted: for a pose fixed before the noise is drawn, the
    cell bound exceeds that pose's true error in at most a fraction ε of noise draws (here ε =
    0.2, large enough for the probabilistic terms to matter; 300 draws, low SNR). Also counted
    (not a guarantee, reported): how often it exceeds the minimum over the whole cell."""
    rng = np.random.default_rng(7)
    box, r_align, level, last, eps = 16, 7.0, 2, 3, 0.2
    case = _cell_case(rng, box, level, last, False, 0.05, 1.0)
    case["last"] = last
    j, t = case["pose"]
    n_draws = 300
    fails_pose = np.zeros(3, int)
    fails_cell = np.zeros(3, int)
    for _ in range(n_draws):
        noise = centred_rfftn(case["sigma"] * rng.standard_normal((1, box, box)), 2)[0]
        res = _cell_errors(case, case["signal"] + noise, level, r_align, [2.0, 3.5, 5.0], eps)
        for i, (_, lb, _, true) in enumerate(res):
            fails_pose[i] += lb > true[j, t]
            fails_cell[i] += lb > true.min()
    # the binomial 99.9% quantile of Bin(n, ε)
    allowed = n_draws * eps + 3.1 * np.sqrt(n_draws * eps * (1 - eps))
    assert np.all(fails_pose <= allowed), (fails_pose, fails_cell)
    assert np.all(fails_cell <= allowed), (fails_pose, fails_cell)
