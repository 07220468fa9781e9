"""Alignment against the half map without the particle's fold (``alignment_folds``): the
fold-out references (definitions), the E-step's routing of each particle to its fold's
reference, the folds themselves, and resuming runs saved before the setting existed."""

import numpy as np
import pytest
from helpers import downsample_to_32

from dask_refine.core.backprojection import FourierSums, backproject_particles
from dask_refine.core.noise import noise_weights
from dask_refine.core.pose_search import SearchParams, amplitude_envelope
from dask_refine.core.projection import prepare_reference_rfft
from dask_refine.core.reconstruction import (
    fold_out_references,
    reconstruct,
    reconstruction_denominator,
    shell_mean_weight,
)
from dask_refine.core.refine_step import EStepOptions, refine_particles
from dask_refine.core.rotations import angular_distance_deg
from dask_refine.io.errors import InputError
from dask_refine.io.output_folder import OutputFolder
from dask_refine.io.simulate import SimulationConfig, render_particles, simulate_metadata
from dask_refine.jobs.checkpoint import check_resumable
from dask_refine.jobs.refine import LEGACY_SETTINGS, RESUME_KEYS, alignment_folds


def _particles(demo_map, n, snr, seed=3):
    volume = downsample_to_32(demo_map[0])
    px = 2 * demo_map[1]
    ref = prepare_reference_rfft(volume)
    sim = simulate_metadata(SimulationConfig(n_particles=n, seed=seed), 32, px)
    meta, truth = sim["meta"], sim["truth"]
    truth["shift_A"] = np.zeros((n, 2))
    clean = render_particles(ref, meta, truth, slice(0, n), 32, px)
    noise = np.random.default_rng(seed).normal(0, clean.std() / np.sqrt(snr), clean.shape)
    return (clean + noise).astype(np.float32), meta, truth, volume, px


def _fold_sums(images, meta, truth, folds, px):
    sums = FourierSums.zeros(int(folds.max()) + 1, 32)
    backproject_particles(sums, images, {**meta, **truth}, folds, px)
    return sums.completed(32)


def test_fold_out_reference_leaves_its_fold_out(demo_map):
    """Reference f is the half's reconstruction from every fold but f: it does not change
    when fold f's images do (it holds none of their noise), the others do; and each is
    regularised with the half map's λ, so its divisor is the half's minus fold f's weight."""
    images, meta, truth, _, px = _particles(demo_map, 18, snr=1.0)
    folds = np.arange(18) % 3
    sums = _fold_sums(images, meta, truth, folds, px)
    total_w = sums.weight.sum(axis=0)
    ssnr = np.linspace(20, 0.5, 17)
    refs = fold_out_references(sums.data, sums.weight, 32, ssnr)
    assert len(refs) == 3
    other = images.copy()
    other[folds == 1] = np.random.default_rng(9).normal(size=other[folds == 1].shape)
    perturbed = _fold_sums(other, meta, truth, folds, px)
    changed = fold_out_references(perturbed.data, perturbed.weight, 32, ssnr)
    np.testing.assert_array_equal(changed[1], refs[1])
    for f in (0, 2):
        assert np.abs(changed[f] - refs[f]).max() > 0.1 * np.abs(refs[f]).max()
    # the half map's divisor less the fold's weight: the same Wiener filter, less data
    half = reconstruction_denominator(total_w, 32, ssnr)
    inside = np.isfinite(half)
    for f in range(3):
        rest = total_w - sums.weight[f]
        scaled = ssnr * shell_mean_weight(rest, 32) / shell_mean_weight(total_w, 32)
        mine = reconstruction_denominator(rest, 32, scaled)
        np.testing.assert_allclose(mine[inside], (half - sums.weight[f])[inside], rtol=1e-5,
                                   atol=1e-5 * float(half[inside].max()))
        np.testing.assert_allclose(refs[f], reconstruct(sums.data.sum(0) - sums.data[f], rest,
                                                        32, ssnr=scaled, complete_planes=False),
                                   rtol=1e-4, atol=1e-5 * float(np.abs(refs[f]).max()))
    with pytest.raises(ValueError, match="at least 2 folds"):
        fold_out_references(sums.data[:1], sums.weight[:1], 32, ssnr)


def _estep(images, meta, groups, references, folds, px, params):
    env = [amplitude_envelope(r, 32) for r in references]
    sums = FourierSums.zeros(2 * folds, 32)
    step = refine_particles(sums, images, meta, groups, references, env,
                            noise_weights(np.full(17, 40.0), 32), params, px, 8.0,
                            options=EStepOptions(alignment_folds=folds))
    return sums, step


def test_folds_change_only_the_reference_a_particle_sees(demo_map):
    """With every fold's reference the half map itself, two folds give exactly the one-fold
    E-step: the same poses, scales and noise, and fold sums that add up to the half's."""
    images, meta, truth, volume, px = _particles(demo_map, 8, snr=2.0)
    meta = {**meta, "scale": truth["scale"], "origin_px": np.zeros((8, 2)),
            "rotation": truth["rotation"]}
    ref = prepare_reference_rfft(volume)
    params = SearchParams(r_align=10, particle_radius_px=12, first_level=1, last_level=3,
                          max_shift_px=1.0, local=True, local_level=2, posterior_window=18.4)
    half = np.arange(8) % 2
    s1, r1 = _estep(images, meta, half, [ref, ref], 1, px, params)
    s2, r2 = _estep(images, meta, 2 * half + (np.arange(8) // 4), [ref] * 4, 2, px, params)
    np.testing.assert_array_equal(r2.rotation, r1.rotation)
    np.testing.assert_allclose(r2.scale_estimate, r1.scale_estimate, rtol=1e-6)
    np.testing.assert_allclose(r2.noise_sums, r1.noise_sums, rtol=1e-6)
    for h in (0, 1):
        np.testing.assert_allclose(s2.data[2 * h:2 * h + 2].sum(0), s1.data[h], rtol=1e-5,
                                   atol=1e-5 * np.abs(s1.data).max())
        np.testing.assert_allclose(s2.weight[2 * h:2 * h + 2].sum(0), s1.weight[h], rtol=1e-5,
                                   atol=1e-6)
        assert s2.count[2 * h:2 * h + 2].sum() == s1.count[h]


def test_each_particle_is_searched_against_its_folds_reference(demo_map):
    """References are indexed (half · F + fold): give half A's fold 1 a wrong map and only
    that fold's particles lose their poses; the others, and their sums, are untouched."""
    images, meta, truth, volume, px = _particles(demo_map, 12, snr=5.0)
    meta = {**meta, "scale": truth["scale"], "origin_px": np.zeros((12, 2))}
    good = prepare_reference_rfft(volume)
    wrong = prepare_reference_rfft(np.ascontiguousarray(np.flip(volume, axis=(0, 1))))
    params = SearchParams(r_align=8, particle_radius_px=12, first_level=1, last_level=3,
                          max_shift_px=1.0)
    groups = np.array([0, 0, 1, 1, 2, 2, 3, 3] + [1] * 4)  # half · 2 + fold
    sums, step = _estep(images, meta, groups, [good, wrong, good, good], 2, px, params)
    err = angular_distance_deg(step.rotation, truth["rotation"])
    assert np.all(err[groups != 1] < 10), err
    assert np.median(err[groups == 1]) > 30, err
    np.testing.assert_array_equal(sums.count, [2, 6, 2, 2])


def test_alignment_folds_cut_each_half_into_equal_runs():
    half = np.array([0, 1] * 5 + [0] * 6 + [1] * 2)  # 11 in half A, 7 in half B
    fold = alignment_folds(half, 3)
    for h, n in ((0, 11), (1, 7)):
        f = fold[half == h]
        assert np.all(np.diff(f) >= 0)  # runs in store order
        counts = np.bincount(f, minlength=3)
        assert counts.sum() == n and counts.max() - counts.min() <= 1
    np.testing.assert_array_equal(alignment_folds(half, 1), 0)


def test_runs_saved_before_the_setting_resume_with_one_fold(tmp_path):
    """A checkpoint whose config.json predates ``alignment_folds`` ran with one fold: it
    resumes with 1 and is refused with 2 (the search would change mid-run)."""
    from dask_refine.io.outputs import write_json

    config = {k: 0 for k in RESUME_KEYS} | {"alignment_folds": 1}
    saved = {k: v for k, v in config.items() if k != "alignment_folds"}
    write_json(tmp_path / "config.json", saved)
    out = OutputFolder(str(tmp_path))
    assert check_resumable(out, config, True, RESUME_KEYS, LEGACY_SETTINGS) == []
    with pytest.raises(InputError, match="alignment_folds"):
        check_resumable(out, config | {"alignment_folds": 2}, True, RESUME_KEYS,
                        LEGACY_SETTINGS)
    assert "alignment_folds" in RESUME_KEYS


def test_automatic_folds_fit_the_memory_budget():
    """None: four folds where 2·K·F padded sums fit 2 GiB per chain (box 64 and 128), fewer
    above (box 192: three), one at box 256; a number given is kept."""
    from dask_refine.jobs.refine import RefineConfig, resolved_alignment_folds

    auto = RefineConfig(store="s", initial_map="m.mrc", out_dir="o")
    assert auto.alignment_folds is None
    assert [resolved_alignment_folds(auto, box, 1) for box in (64, 128, 192, 256)] == [4, 4, 3, 1]
    assert resolved_alignment_folds(auto, 128, 3) == 3  # three classes: more sums per fold
    given = RefineConfig(store="s", initial_map="m.mrc", out_dir="o", alignment_folds=2)
    assert resolved_alignment_folds(given, 256, 1) == 2
    with pytest.raises(InputError, match="alignment_folds"):
        RefineConfig(store="s", initial_map="m.mrc", out_dir="o", alignment_folds=0)
