"""Symmetry in the jobs: reconstruction, pose search over the asymmetric unit, refinement."""

import numpy as np
import pytest

from dask_refine.core.fourier import centred_rfftn
from dask_refine.core.fsc import fsc
from dask_refine.core.masks import soft_sphere_mask
from dask_refine.core.noise import noise_weights
from dask_refine.core.pose_search import ParticleData, SearchParams, branch_and_bound
from dask_refine.core.projection import prepare_reference_rfft
from dask_refine.core.rotations import angular_distance_deg
from dask_refine.core.symmetry import expand_poses, symmetry_operators
from dask_refine.core import so3_grid
from dask_refine.io.mrc import read_map, write_map
from dask_refine.io.simulate import SimulationConfig, simulate_store
from dask_refine.jobs.reconstruct import reconstruct_halves_and_full
from dask_refine.jobs.refine import RefineConfig, run_refine
from helpers import downsample_to_32, true_pose_sums


def c4_map(volume):
    """Average of the four 90° rotations about z (through index D/2): exactly C4-symmetric.
    Masked inside a sphere first, so the symmetry holds without wrapping around the box."""
    out = np.zeros_like(volume, dtype=np.float64)
    box = volume.shape[0]
    v = volume.astype(np.float64) * soft_sphere_mask(box, box / 2 - 4, 3)
    for _ in range(4):
        out += v
        v = np.roll(np.rot90(v, 1, axes=(1, 2)), 1, axis=1)  # (y, x) → (x, −y) about D/2
    return (out / 4).astype(np.float32)


@pytest.fixture(scope="module")
def symmetric_32(demo_map):
    volume, px = demo_map
    return c4_map(downsample_to_32(volume)), 2 * px


def test_c4_map_is_symmetric_under_our_c4_group(symmetric_32):
    volume, _ = symmetric_32
    ref = prepare_reference_rfft(volume.astype(np.float64))
    ops = symmetry_operators("C4")
    from dask_refine.core.projection import extract_central_slices_rfft
    from dask_refine.core.rotations import random_rotations

    R = random_rotations(10, np.random.default_rng(0))
    a = extract_central_slices_rfft(ref, R, 32)
    for S in ops[1:]:
        b = extract_central_slices_rfft(ref, R @ S, 32)
        assert np.abs(a - b).max() < 1e-6 * np.abs(a).max()


def test_symmetric_reconstruction_matches_c1_and_is_better(symmetric_32, tmp_path):
    volume, px = symmetric_32
    store = simulate_store(volume, px, tmp_path / "p.zarr",
                           SimulationConfig(n_particles=400, snr=0.3, chunk_size=200, seed=3))
    sums = true_pose_sums(store, px)
    _, curve_c1, full_c1 = reconstruct_halves_and_full(sums, 32, px)
    _, curve_c4, full_c4 = reconstruct_halves_and_full(sums, 32, px, symmetry="C4")
    # same map within noise, and 4× the data per asymmetric unit: a better half-map FSC and
    # a better FSC to the truth
    assert fsc(full_c1, full_c4)[1:8].min() > 0.9
    assert curve_c4[4:14].mean() > curve_c1[4:14].mean() + 0.05
    assert fsc(full_c4, volume)[4:14].mean() > fsc(full_c1, volume)[4:14].mean()


def test_search_over_the_asymmetric_unit_finds_equivalent_poses(symmetric_32):
    volume, px = symmetric_32
    from dask_refine.io.simulate import render_particles, simulate_metadata

    cfg = SimulationConfig(n_particles=12, snr=np.inf, ctf=False, seed=9, shift_sigma_A=0.0)
    sim = simulate_metadata(cfg, 32, px)
    ref = prepare_reference_rfft(volume.astype(np.float64))
    images = render_particles(ref, sim["meta"], sim["truth"], slice(0, 12), 32, px, False)
    data = ParticleData(centred_rfftn(images.astype(np.float64), 2), np.ones((12, 32, 17)),
                        sim["truth"]["scale"],
                        noise_weights(np.ones(17), 32))
    common = dict(r_align=12, particle_radius_px=12, first_level=2, last_level=3,
                  max_shift_px=0.0, shift_step_px=1.0)
    c4 = branch_and_bound(ref, data, SearchParams(**common, symmetry="C4"))
    c1 = branch_and_bound(ref, data, SearchParams(**common))
    truth = expand_poses(sim["truth"]["rotation"], symmetry_operators("C4"))
    err = np.array([angular_distance_deg(np.broadcast_to(r, (4, 3, 3)), t).min()
                    for r, t in zip(c4.rotation, truth)])
    assert np.median(err) < 2 * so3_grid.spacing_deg(3), err
    assert c4.n_evaluations.mean() < c1.n_evaluations.mean()  # first level: 53% of the cells
    assert np.allclose(c4.error, c1.error, rtol=0.05, atol=1e-3 * np.abs(c1.error).max())


@pytest.mark.slow  # ~50 s; symmetric reconstruction and search are covered above
def test_refinement_with_symmetry_gives_the_c1_map(symmetric_32, tmp_path):
    volume, px = symmetric_32
    store = simulate_store(volume, px, tmp_path / "p.zarr",
                           SimulationConfig(n_particles=120, snr=1.0, chunk_size=60, seed=11))
    write_map(tmp_path / "initial.mrc", volume, px)
    maps = {}
    for sym in ("C1", "C4"):
        summary = run_refine(RefineConfig(store=str(store.path),
                                          initial_map=str(tmp_path / "initial.mrc"),
                                          out_dir=str(tmp_path / sym), max_iterations=3,
                                          symmetry=sym), log=lambda m: None)
        assert summary["iterations"] >= 1
        maps[sym] = read_map(tmp_path / sym / "map.mrc")[0]
    assert fsc(maps["C1"], maps["C4"])[1:8].min() > 0.8  # same map within the C1 noise
    assert fsc(maps["C4"], volume)[1:12].mean() >= fsc(maps["C1"], volume)[1:12].mean() - 0.02
