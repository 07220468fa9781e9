"""Marginalised E-step: posterior weights (definitions) and backprojection over poses."""

import numpy as np

from dask_refine.core.backprojection import FourierSums
from dask_refine.core.noise import noise_weights
from dask_refine.core.pose_search import SearchParams, amplitude_envelope
from dask_refine.core.posterior import class_evidence, significant_poses, softmax
from dask_refine.core.projection import prepare_reference_rfft
from dask_refine.core.refine_step import EStepOptions, refine_particles
from dask_refine.io.simulate import SimulationConfig, render_particles, simulate_metadata
from helpers import downsample_to_32


def test_significant_poses_are_the_posterior_mass():
    rng = np.random.default_rng(0)
    errors = rng.uniform(0, 30, 200)
    keep, w, log_ev = significant_poses(errors, significant_fraction=0.99)
    p = np.exp(-0.5 * (errors - errors.min()))
    p /= p.sum()
    # the kept poses are the most probable ones, just enough of them to hold 99% of the mass
    np.testing.assert_array_equal(np.sort(keep), np.sort(np.argsort(-p)[:keep.size]))
    assert p[keep].sum() >= 0.99 > p[keep[:-1]].sum()
    np.testing.assert_allclose(w, p[keep] / p[keep].sum())
    np.testing.assert_allclose(log_ev, np.log(np.exp(-0.5 * errors).sum()))
    # a prior shifts the weights as exp(log π); the cap keeps the largest
    keep2, w2, _ = significant_poses(errors, np.log(np.linspace(1, 2, 200)), 0.999, max_poses=3)
    q = np.exp(-0.5 * errors) * np.linspace(1, 2, 200)
    np.testing.assert_array_equal(keep2, np.argsort(-q)[:3])
    np.testing.assert_allclose(w2.sum(), 1.0)


def test_class_evidence_is_the_log_sum_over_poses():
    e = [np.array([10.0, 12.0]), np.array([11.0])]
    ev = class_evidence(e, np.log([0.25, 0.75]))
    np.testing.assert_allclose(ev, [np.log(0.25 * (np.exp(-5) + np.exp(-6))),
                                    np.log(0.75 * np.exp(-5.5))])
    np.testing.assert_allclose(softmax(ev).sum(), 1.0)


def _batch(demo_map, n=8, snr=2.0):
    volume = downsample_to_32(demo_map[0])
    px = 2 * demo_map[1]
    ref = prepare_reference_rfft(volume)
    sim = simulate_metadata(SimulationConfig(n_particles=n, seed=3), 32, px)
    meta, truth = sim["meta"], sim["truth"]
    truth["shift_A"] = np.zeros((n, 2))
    clean = render_particles(ref, meta, truth, slice(0, n), 32, px)
    noise = np.random.default_rng(1).normal(0, clean.std() / np.sqrt(snr), clean.shape)
    meta = {**meta, "scale": truth["scale"], "origin_px": np.zeros((n, 2)),
            "rotation": truth["rotation"]}
    return (clean + noise).astype(np.float32), meta, ref, px


def test_delta_posterior_backprojects_as_the_hard_assignment(demo_map):
    """A window of 0 leaves one pose per particle: the marginalised E-step is then exactly
    the hard one (same poses, scales, noise sums and Fourier sums)."""
    images, meta, ref, px = _batch(demo_map)
    env = amplitude_envelope(ref, 32)
    params = SearchParams(r_align=10, particle_radius_px=12, first_level=1, last_level=3,
                          max_shift_px=1.0, local=True, local_level=2)
    out = {}
    for marginalize in (False, True):
        sums = FourierSums.zeros(2, 32)
        step = refine_particles(sums, images, meta, np.zeros(8, int), [ref, ref], [env, env],
                                noise_weights(np.ones(17), 32), params, px, 8.0,
                                options=EStepOptions(marginalize=marginalize))
        out[marginalize] = (sums, step)
    (s0, r0), (s1, r1) = out[False], out[True]
    assert (r1.n_significant == 1).all()
    np.testing.assert_array_equal(r1.rotation, r0.rotation)
    np.testing.assert_allclose(r1.scale_estimate, r0.scale_estimate, rtol=1e-6)
    np.testing.assert_allclose(r1.noise_sums, r0.noise_sums, rtol=1e-6)
    np.testing.assert_allclose(s1.data, s0.data, rtol=1e-6, atol=1e-6 * np.abs(s0.data).max())
    np.testing.assert_allclose(s1.weight, s0.weight, rtol=1e-6, atol=1e-7)


def test_marginalised_backprojection_is_the_weighted_sum_of_hard_ones(demo_map):
    """With a window, each particle's sums equal Σ_j p_j × (its hard backprojection at pose j),
    the weights p_j being the posterior of the candidates the search returned."""
    from dask_refine.core.backprojection import backproject_particles

    images, meta, ref, px = _batch(demo_map, n=3, snr=0.05)
    env = amplitude_envelope(ref, 32)
    params = SearchParams(r_align=10, particle_radius_px=12, first_level=1, last_level=3,
                          max_shift_px=1.0, local=True, local_level=2, posterior_window=18.4)
    sums = FourierSums.zeros(2, 32)
    step = refine_particles(sums, images, meta, np.zeros(3, int), [ref, ref], [env, env],
                            noise_weights(np.full(17, 40.0), 32), params, px, 8.0)
    assert step.n_significant.min() > 1  # low SNR: several poses carry weight
    assert np.all(step.max_posterior < 1.0) and np.all(step.posterior_sd_deg > 0)
    # rebuild the same sums pose by pose with the hard backprojection
    from dask_refine.core.pose_search import ParticleData, branch_and_bound
    from dask_refine.core.backprojection import particle_ctfs
    from dask_refine.core.fourier import centred_rfftn

    data = ParticleData(centred_rfftn(images, 2), particle_ctfs(meta, 32, px), meta["scale"],
                        noise_weights(np.full(17, 40.0), 32))
    found = branch_and_bound(ref, data, params, prior_rotation=meta["rotation"],
                             prior_origin_px=meta["origin_px"], envelope=env)
    expected = FourierSums.zeros(2, 32)
    for b in range(3):
        rots, origins, errors = found.candidates[b]
        keep, w, _ = significant_poses(errors)
        assert keep.size == step.n_significant[b]
        for j, wj in zip(keep, w):
            one = {k: v[b:b + 1] for k, v in meta.items()}
            one.update(rotation=rots[j:j + 1], shift_A=origins[j:j + 1] * px,
                       scale=meta["scale"][b:b + 1], class_weight=np.array([[wj]]))
            backproject_particles(expected, images[b:b + 1], one, np.zeros(1, int), px)
    np.testing.assert_allclose(sums.data, expected.data, rtol=1e-4,
                               atol=1e-4 * np.abs(expected.data).max())
    np.testing.assert_allclose(sums.weight, expected.weight, rtol=1e-4,
                               atol=1e-4 * expected.weight.max())


def test_band_limited_backprojection_inserts_only_the_band(demo_map):
    """``backprojection_max_shell`` (RELION's current_size) leaves the search, scales and noise
    model as they are and inserts exactly the Fourier pixels inside the band: the sums equal a
    hard backprojection at the found poses with that ``r_max``, and differ from the full one."""
    from dask_refine.core.backprojection import backproject_particles

    images, meta, ref, px = _batch(demo_map)
    env = amplitude_envelope(ref, 32)
    params = SearchParams(r_align=10, particle_radius_px=12, first_level=1, last_level=3,
                          max_shift_px=1.0, local=True, local_level=2)
    out = {}
    for r_max in (None, 7.0):
        sums = FourierSums.zeros(2, 32)
        step = refine_particles(sums, images, meta, np.zeros(8, int), [ref, ref], [env, env],
                                noise_weights(np.ones(17), 32), params, px, 8.0,
                                options=EStepOptions(marginalize=False,
                                                     backprojection_max_shell=r_max))
        out[r_max] = (sums, step)
    (full, r0), (limited, r1) = out[None], out[7.0]
    np.testing.assert_array_equal(r1.rotation, r0.rotation)
    np.testing.assert_array_equal(r1.scale_estimate, r0.scale_estimate)
    np.testing.assert_array_equal(r1.noise_sums, r0.noise_sums)
    expected = FourierSums.zeros(2, 32)
    backproject_particles(expected, images, {**meta, "rotation": r1.rotation,
                                             "shift_A": r1.origin_px * px},
                          np.zeros(8, int), px, r_max=7.0)
    np.testing.assert_allclose(limited.data, expected.data, rtol=1e-5,
                               atol=1e-5 * np.abs(expected.data).max())
    np.testing.assert_allclose(limited.weight, expected.weight, rtol=1e-5,
                               atol=1e-5 * expected.weight.max())
    assert limited.weight.sum() < 0.5 * full.weight.sum()


def _two_class_step(images, meta, ref, px, noise_weight, soft=True):
    env = amplitude_envelope(ref, 32)
    params = SearchParams(r_align=10, particle_radius_px=12, first_level=1, last_level=3,
                          max_shift_px=1.0, local=True, local_level=2, posterior_window=18.4)
    sums = FourierSums.zeros(4, 32)
    step = refine_particles(sums, images, meta, np.zeros(len(images), int), [ref] * 4,
                            [env] * 4, noise_weight, params, px, 8.0,
                            options=EStepOptions(n_classes=2, soft_classes=soft))
    return sums, step


def test_equal_per_class_noise_models_are_the_shared_model(demo_map):
    """Per-class noise models that happen to be equal change nothing: the normalisers cancel
    in the class posterior, and the per-class noise sums add up to the shared ones."""
    images, meta, ref, px = _batch(demo_map, n=6, snr=0.5)
    shared = noise_weights(np.full(17, 3.0), 32)
    s0, r0 = _two_class_step(images, meta, ref, px, shared)
    s1, r1 = _two_class_step(images, meta, ref, px, np.stack([shared, shared]))
    np.testing.assert_allclose(r1.class_weight, r0.class_weight, rtol=1e-9)
    np.testing.assert_array_equal(r1.rotation, r0.rotation)
    np.testing.assert_allclose(r1.error, r0.error, rtol=1e-12)
    np.testing.assert_allclose(r1.noise_sums, r0.noise_sums, rtol=1e-9)
    np.testing.assert_allclose(s1.data, s0.data, rtol=1e-6, atol=1e-6 * np.abs(s0.data).max())


def test_class_posterior_weighs_noise_models_by_their_likelihood(demo_map, monkeypatch):
    """Two classes with the same reference, one with the noise model the images were drawn
    with and one with 4× (or ¼×) that power: the whitened error alone favours the larger σ²
    (it divides by it); with each model's normaliser Σ m log σ² the true model wins, as the
    likelihood of Gaussian noise says it must."""
    from dask_refine.core.fourier import centred_rfftn
    from dask_refine.core.noise import shell_power_sums, sigma2_from_sums

    clean, meta, ref, px = _batch(demo_map, n=6, snr=1e12)
    std = 3.0 * clean.std()
    rng = np.random.default_rng(5)
    images = (clean + rng.normal(0, std, clean.shape)).astype(np.float32)
    sums, counts = shell_power_sums(centred_rfftn(rng.normal(0, std, (400, 32, 32)), 2))
    sigma2 = sigma2_from_sums(sums, counts)  # the images' own noise model, per shell
    for factor in (4.0, 0.25):
        for true_class in (0, 1):
            models = [sigma2, sigma2]
            models[1 - true_class] = factor * sigma2
            _, step = _two_class_step(images, meta, ref, px, noise_weights(np.stack(models), 32))
            assert (step.class_id == true_class).all(), (factor, true_class)
            assert step.class_weight[:, true_class].min() > 0.99
    # without the normalisers the 4× model wins every particle by dividing the error by 4
    from dask_refine.core import refine_step

    monkeypatch.setattr(refine_step, "log_noise_normaliser", lambda *_: 0.0)
    _, step = _two_class_step(images, meta, ref, px,
                              noise_weights(np.stack([sigma2, 4.0 * sigma2]), 32))
    assert (step.class_id == 1).all()


def test_class_noise_models_shrink_toward_the_pooled_model():
    from dask_refine.core.noise import class_noise_models, sigma2_from_sums

    box, shells = 16, 9
    pixels = np.bincount(np.rint(np.hypot(*np.meshgrid(np.fft.fftfreq(box) * box,
                                                     np.fft.fftfreq(box) * box,
                                                     indexing="ij"))).astype(int).ravel(),
                         minlength=shells)[:shells].astype(float)
    big, small = 1e5 * pixels, 0.0 * pixels  # class 2 holds no particle
    sums = np.stack([2.0 * big, small])
    out = class_noise_models(sums, np.stack([big, small]))
    np.testing.assert_allclose(out[0], 2.0, rtol=1e-3)  # a large class: its own noise
    np.testing.assert_allclose(out[1], 2.0, rtol=1e-12)  # an empty class: the pooled one
    one = class_noise_models(sums[:1], np.stack([big]))
    np.testing.assert_allclose(one[0], sigma2_from_sums(sums[0], big))


def test_classes_are_judged_on_the_other_half(demo_map):
    """Half A's references of both classes are the same map (they say nothing about the class);
    half B's are the two true class maps. A half-A particle's class posterior comes from half
    B's maps, at the poses its own half's search found, so it goes to its true class; judged on
    its own half (``cross_half_classes=False``) the classes are indistinguishable."""
    volume = downsample_to_32(demo_map[0])
    px = 2 * demo_map[1]
    other = volume.copy()
    other[:, :, 18:] = 0.0  # class 2: a part removed
    refs = [prepare_reference_rfft(v) for v in (volume, other)]
    n = 6
    sim = simulate_metadata(SimulationConfig(n_particles=n, seed=4), 32, px)
    meta, truth = sim["meta"], sim["truth"]
    truth["shift_A"] = np.zeros((n, 2))
    clean = render_particles(refs[1], meta, truth, slice(0, n), 32, px)  # all from class 2
    images = (clean + np.random.default_rng(2).normal(0, clean.std(), clean.shape)).astype(
        np.float32)
    meta = {**meta, "scale": truth["scale"], "origin_px": np.zeros((n, 2)),
            "rotation": truth["rotation"]}
    blurred = prepare_reference_rfft(0.5 * (volume + other))
    references = [blurred, refs[0], blurred, refs[1]]  # class · 2 + half
    envelopes = [amplitude_envelope(r, 32) for r in references]
    params = SearchParams(r_align=12, particle_radius_px=12, first_level=1, last_level=3,
                          max_shift_px=1.0, local=True, local_level=2, posterior_window=18.4)
    weight = {}
    for cross in (True, False):
        step = refine_particles(FourierSums.zeros(4, 32), images, meta, np.zeros(n, int),
                                references, envelopes, noise_weights(np.full(17, 50.0), 32),
                                params, px, 8.0,
                                options=EStepOptions(n_classes=2, soft_classes=True,
                                                     cross_half_classes=cross))
        weight[cross] = step.class_weight
    assert weight[True][:, 1].min() > 0.99
    np.testing.assert_allclose(weight[False], 0.5, atol=1e-6)


def test_random_subsets_are_drawn_per_particle_not_per_chunk(demo_map):
    """``random_class_seed``: each particle goes, whole, into one class drawn from the seed and
    its index in the store: the same draw whichever chunk it is processed in, about N/K per
    class, one-hot class weights, and its poses backprojected into that class only."""
    from dask_refine.core.refine_step import random_classes

    draws = random_classes(3, np.arange(4000), 2)
    assert abs(draws.mean() - 0.5) < 0.03
    np.testing.assert_array_equal(random_classes(3, np.arange(100, 200), 2), draws[100:200])
    assert not np.array_equal(random_classes(4, np.arange(4000), 2), draws)
    images, meta, ref, px = _batch(demo_map, n=8, snr=0.5)
    env = amplitude_envelope(ref, 32)
    params = SearchParams(r_align=10, particle_radius_px=12, first_level=1, last_level=3,
                          max_shift_px=1.0, local=True, local_level=2, posterior_window=18.4)
    whole = FourierSums.zeros(4, 32)
    step = refine_particles(whole, images, meta, np.zeros(8, int), [ref] * 4, [env] * 4,
                            noise_weights(np.full(17, 3.0), 32), params, px, 8.0,
                            first_index=50, options=EStepOptions(n_classes=2, soft_classes=True,
                                                                 random_class_seed=3))
    np.testing.assert_array_equal(step.class_id, draws[50:58])
    np.testing.assert_array_equal(step.class_weight, np.eye(2)[draws[50:58]])
    assert whole.count[0] == np.sum(draws[50:58] == 0) and whole.count[2] == np.sum(draws[50:58])
    # in two chunks: the same draws and the same sums
    parts = FourierSums.zeros(4, 32)
    for lo in (0, 4):
        rows = slice(lo, lo + 4)
        part = refine_particles(parts, images[rows], {k: v[rows] for k, v in meta.items()},
                                np.zeros(4, int), [ref] * 4, [env] * 4,
                                noise_weights(np.full(17, 3.0), 32), params, px, 8.0,
                                first_index=50 + lo,
                                options=EStepOptions(n_classes=2, soft_classes=True,
                                                     random_class_seed=3))
        np.testing.assert_array_equal(part.class_id, draws[50 + lo:54 + lo])
    np.testing.assert_allclose(parts.data, whole.data, rtol=1e-5,
                               atol=1e-6 * np.abs(whole.data).max())
