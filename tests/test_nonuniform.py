"""Non-uniform (adaptive local) regularisation."""

import numpy as np
import pytest

from dask_refine.core.filters import apply_shell_filter, lowpass_filter
from dask_refine.core.fsc import fsc
from dask_refine.core.masks import soft_sphere_mask
from dask_refine.core.nonuniform import (apply_local_filter, candidate_resolutions_A,
                                         local_cutoff_choice, local_resolution_map)


def _flexible_halves(demo_map, rng):
    """Two half maps of a structure whose x > centre part is flexible: its detail beyond 12 Å
    differs in every half (disorder), so the consensus there is the 12 Å map."""
    v, px = demo_map
    v = v.astype(np.float64) / v.std()
    flex = np.zeros(v.shape, bool)
    flex[:, :, 34:] = True
    truth = np.where(flex, lowpass_filter(v, 12.0, px), v)

    def half():
        extra = lowpass_filter(rng.standard_normal(v.shape), 4.5, px) * 3
        disorder = np.where(flex, extra - lowpass_filter(extra, 12.0, px), 0.0)
        return truth + disorder + 0.7 * rng.standard_normal(v.shape)

    return half(), half(), truth, flex, px


def test_local_filter_beats_the_global_fsc_filter_on_a_flexible_region(demo_map, rng):
    a, b, truth, flex, px = _flexible_halves(demo_map, rng)
    full = (a + b) / 2
    f = fsc(a, b)
    global_map = apply_shell_filter(full, np.clip(2 * f / (1 + f), 0, 1))
    choice, res = local_cutoff_choice(a, b, px)
    nu_map = apply_local_filter(full, choice, res, px)
    inside = soft_sphere_mask(64, 24, 3) > 0.5
    mse = {name: np.mean((m - truth)[inside] ** 2) for name, m in
           (("global", global_map), ("nu", nu_map))}
    assert mse["nu"] < 0.95 * mse["global"], mse
    local_res = local_resolution_map(choice, res)
    # the flexible part is assigned coarser cutoffs than the rigid part
    assert np.median(local_res[inside & flex]) > np.median(local_res[inside & ~flex])


def test_noise_free_halves_keep_high_frequencies_in_the_density(demo_map):
    v, px = demo_map
    choice, res = local_cutoff_choice(v, v, px)
    density = v > 0.2 * v.max()
    assert np.median(local_resolution_map(choice, res)[density]) <= res[-3]  # near Nyquist
    # one cutoff everywhere = the global low-pass
    np.testing.assert_allclose(apply_local_filter(v, np.full(v.shape, 4), res, px),
                               lowpass_filter(v.astype(np.float64), res[4], px), atol=1e-4)


def test_candidate_cutoffs():
    res = candidate_resolutions_A(1.5, coarsest_A=30.0, n=10)
    assert res[0] == 30.0 and np.isclose(res[-1], 3.0) and (np.diff(res) < 0).all()


def _flexible_store(root, demo_map, n=300):
    """Box 32 (4 Å/px): half the particles carry a rigid copy of the structure, half have its
    x > centre part shifted by 2 px (a flexible domain). Consensus truth: the average."""
    from dask_refine.io.mrc import write_map
    from dask_refine.io.simulate import SimulationConfig, resimulate_rows, simulate_store
    from helpers import downsample_to_32

    volume, px = demo_map
    rigid = downsample_to_32(volume)
    moved = rigid.copy()
    moved[:, :, 18:] = np.roll(rigid, 2, axis=1)[:, :, 18:]
    px = 2 * px
    simulate_store(rigid, px, root / "p.zarr",
                   SimulationConfig(n_particles=n, snr=1.0, chunk_size=100, seed=31))
    resimulate_rows(root / "p.zarr", moved, slice(n // 2, n), seed=3)
    write_map(root / "initial.mrc", rigid, px)
    return (rigid + moved) / 2, px


def test_non_uniform_refinement_writes_nu_map_and_local_resolution(tmp_path, demo_map):
    from dask_refine.io.mrc import read_map
    from dask_refine.jobs.refine import RefineConfig, run_refine

    _flexible_store(tmp_path, demo_map, n=160)
    summary = run_refine(RefineConfig(store=str(tmp_path / "p.zarr"),
                                      initial_map=str(tmp_path / "initial.mrc"),
                                      out_dir=str(tmp_path / "nu"), max_iterations=2,
                                      non_uniform=True, first_level_candidates=256),  # SNR 1
                         log=lambda m: None)
    assert summary["iterations"] == 2
    local, px = read_map(tmp_path / "nu" / "nu_cutoff_resolution.mrc")
    assert local.min() >= 2 * px - 1e-3 and local.max() <= 30.0 + 1e-3
    assert (tmp_path / "nu" / "map_nu.mrc").exists()
    assert (tmp_path / "nu" / "local_resolution.mrc").exists()  # the half maps' local FSC


# ~80 s on 2 cores; the NU kernel test and the NU job-output test run by default
@pytest.mark.slow
def test_non_uniform_beats_homogeneous_on_a_flexible_domain(tmp_path, demo_map):
    from dask_refine.io.mrc import read_map
    from dask_refine.jobs.refine import RefineConfig, run_refine

    consensus, _ = _flexible_store(tmp_path, demo_map)
    scores = {}
    for name, nu in (("homo", False), ("nu", True)):
        run_refine(RefineConfig(store=str(tmp_path / "p.zarr"),
                                initial_map=str(tmp_path / "initial.mrc"),
                                out_dir=str(tmp_path / name), max_iterations=5, non_uniform=nu),
                   log=lambda m: None)
        final = read_map(tmp_path / name / ("map_nu.mrc" if nu else "map.mrc"))[0]
        scores[name] = fsc(final, consensus)[2:15].mean()
    assert scores["nu"] > scores["homo"], scores
