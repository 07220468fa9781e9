"""Local refinement: Gaussian pose priors in the search (core/pose_search.py), and the job
started from the store's poses with a focus mask (jobs/refine.py)."""

import numpy as np
import pytest

from dask_refine.core.pose_search import SearchParams, prior_penalty
from dask_refine.core.rotations import angular_distance_deg, euler_to_matrix
from dask_refine.io.simulate import SimulationConfig, simulate_store
from dask_refine.io.store import GROUND_TRUTH


def _tilted(rotations, degrees: float, seed: int = 0):
    """Each rotation turned by ``degrees`` about a random axis."""
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    axis = rng.normal(size=(len(rotations), 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    turn = Rotation.from_rotvec(np.deg2rad(degrees) * axis).as_matrix()
    return np.matmul(turn, rotations)


def test_the_fulcrum_frame_is_a_shift_of_each_particles_origin(demo_map):
    """The map moved so that the fulcrum c sits at the box centre, V'(r) = V(r + c): its slice
    at any pose A, translated by (A c)_xy, is V's slice (so an origin against V' is the origin
    against V less (A c)_xy)."""
    from dask_refine.core.filters import lowpass_filter
    from dask_refine.core.fourier import translate_rfft, translate_volume
    from dask_refine.core.projection import extract_central_slices_rfft, prepare_reference_rfft
    from dask_refine.core.rotations import random_rotations
    from dask_refine.jobs.refine import fulcrum_shift_px

    volume, px = demo_map
    smooth = lowpass_filter(volume.astype(np.float64), 4 * px, px)
    fulcrum = np.array([5.0, -3.0, 4.0])
    moved = translate_volume(smooth, -fulcrum)
    rotations = random_rotations(5, np.random.default_rng(2))
    plain = extract_central_slices_rfft(prepare_reference_rfft(smooth), rotations, 64)
    framed = extract_central_slices_rfft(prepare_reference_rfft(moved), rotations, 64)
    back = translate_rfft(framed, fulcrum_shift_px(rotations, fulcrum))
    # to the slices' interpolation (1.0% measured; 78% with the shift's sign flipped)
    assert np.linalg.norm(back - plain) < 0.02 * np.linalg.norm(plain)
    assert np.linalg.norm(framed - plain) > 0.3 * np.linalg.norm(plain)  # not trivially equal


def test_prior_penalty_is_minus_two_log_of_the_gaussians():
    params = SearchParams(r_align=10, particle_radius_px=10, prior_sigma_deg=2.0,
                          prior_sigma_shift_px=0.5)
    centre = euler_to_matrix(10.0, 40.0, 70.0)
    rotations = _tilted(np.repeat(centre[None], 3, axis=0), 3.0)
    origins = np.array([[0.0, 0.0], [0.5, 0.0], [0.3, -0.4]])
    got = prior_penalty(params, rotations, origins, centre, np.zeros(2))
    np.testing.assert_allclose(got, (3.0 / 2.0) ** 2 + np.sum(origins ** 2, axis=1) / 0.25)
    assert np.all(prior_penalty(SearchParams(r_align=10, particle_radius_px=10), rotations,
                                origins, centre, np.zeros(2)) == 0)


def test_the_prior_pulls_the_search_toward_its_centre(demo_map, tmp_path):
    """Particles searched locally around their true poses under a weak likelihood (noise
    variance 100 per pixel): with no prior they keep them; a prior centred 6° away pulls them
    to it (σ 0.5°: to within the 1.9° grid of its centre; σ 2°: part of the way, as a posterior
    between the two), and the errors it returns include the penalty."""
    from helpers import downsample_to_32

    from dask_refine.core.noise import noise_weights
    from dask_refine.core.pose_search import ParticleData, amplitude_envelope, branch_and_bound
    from dask_refine.core.projection import prepare_reference_rfft
    from dask_refine.core.backprojection import observed_rfft, particle_ctfs

    volume, px = demo_map
    small, px = downsample_to_32(volume), 2 * px
    store = simulate_store(small, px, tmp_path / "p.zarr", SimulationConfig(
        n_particles=6, snr=np.inf, chunk_size=6, seed=1, shift_sigma_A=0.0))
    meta = store.optics_metadata()
    truth = store.read_column("rotation", group=GROUND_TRUTH)
    scale = store.read_column("scale", group=GROUND_TRUTH)
    ref = prepare_reference_rfft(small)
    data = ParticleData(observed_rfft(store.images[:], meta, px), particle_ctfs(meta, 32, px),
                        scale, noise_weights(np.full(17, 1e2), 32))
    params = SearchParams(r_align=14, particle_radius_px=12, first_level=3, last_level=5,
                          max_shift_px=1.0, local=True, local_level=3)
    free = branch_and_bound(ref, data, params, prior_rotation=truth,
                            envelope=amplitude_envelope(ref, 32))
    assert np.median(angular_distance_deg(free.rotation, truth)) < 2.0
    away = _tilted(truth, 6.0, seed=3)
    distance = {}
    for sigma in (0.5, 2.0):
        pulled = branch_and_bound(ref, data, SearchParams(**{**params.__dict__,
                                                             "prior_sigma_deg": sigma}),
                                  prior_rotation=truth, envelope=amplitude_envelope(ref, 32),
                                  prior_centre=(away, np.zeros((6, 2))))
        distance[sigma] = np.median(angular_distance_deg(pulled.rotation, away))
        assert np.all(pulled.error > free.error)
    assert distance[0.5] < 2.5 < distance[2.0] < 5.5


def test_local_refinement_starts_from_the_stores_poses(tmp_path, demo_map, focus=True):
    """The store's poses 4° off the truth: a local refinement keeps to their neighbourhood
    from its first iteration and brings them closer; an off-centre focus mask is the
    references' mask and its centre of mass the fulcrum; the outputs are in the box's frame."""
    from helpers import downsample_to_32

    from dask_refine.core.masks import soft_sphere_mask
    from dask_refine.io.mrc import read_map, write_map
    from dask_refine.jobs.refine import RefineConfig, run_refine

    volume, px = demo_map
    small, px = downsample_to_32(volume), 2 * px
    store = simulate_store(small, px, tmp_path / "p.zarr", SimulationConfig(
        n_particles=120, snr=1.0, chunk_size=60, seed=8), write_poses=True)
    truth = store.read_column("rotation", group=GROUND_TRUTH)
    store.write_column("rotation", _tilted(truth, 4.0))
    write_map(tmp_path / "initial.mrc", small, px)
    mask = soft_sphere_mask(32, 9.0, 3.0, centre_px=(0, 0, 3)).astype(np.float32)
    write_map(tmp_path / "focus.mrc", mask, px)
    summary = run_refine(RefineConfig(
        store=str(store.path), initial_map=str(tmp_path / "initial.mrc"),
        out_dir=str(tmp_path / "out"), max_iterations=2, local_refinement=True,
        initial_lowpass_A=12.0, focus_mask=str(tmp_path / "focus.mrc") if focus else None),
        log=lambda m: None)
    first = np.load(tmp_path / "out" / "iterations" / "iter_001" / "poses.npz")
    last = np.load(tmp_path / "out" / "iterations" / f"iter_{summary['iterations']:03d}"
                   / "poses.npz")
    assert np.percentile(angular_distance_deg(first["rotation"], truth), 95) < 15.0
    assert (np.median(angular_distance_deg(last["rotation"], truth))
            < 0.8 * np.median(angular_distance_deg(store.read_column("rotation"), truth)))
    import csv

    rows = list(csv.DictReader(open(tmp_path / "out" / "iterations.csv")))
    assert all(int(r["local_search"]) == 1 for r in rows)
    if focus:  # the focus mask (in the frame of its centre of mass, the fulcrum)
        from dask_refine.core.fourier import translate_volume

        used, _ = read_map(tmp_path / "out" / "iterations" / "iter_001" / "mask.mrc")
        np.testing.assert_allclose(translate_volume(used, (3.0, 0.0, 0.0)), mask, atol=0.05)
    # back in the box's frame: origins as the truth's, the map where the truth is
    import starfile

    refined = starfile.read(tmp_path / "out" / "particles.star")["particles"]
    shift = refined[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float)
    error_px = np.linalg.norm(shift - store.read_column("shift_A", group=GROUND_TRUTH), axis=1) / px
    assert np.median(error_px) < 0.6, np.median(error_px)
    final, _ = read_map(tmp_path / "out" / "map.mrc")
    assert np.corrcoef(final.ravel(), small.ravel())[0, 1] > 0.8


def test_symmetry_relaxation_finds_each_particles_copy(demo_map, tmp_path):
    """Particles of an asymmetric map whose poses are filed as a C2 refinement would leave
    them (half turned by the 2-fold): local searches from the filed poses keep the turned half
    wrong; with the C2 relaxation each starts from its better copy and lands on the truth."""
    from helpers import downsample_to_32

    from dask_refine.core.backprojection import FourierSums, observed_rfft
    from dask_refine.core.noise import noise_weights
    from dask_refine.core.pose_search import amplitude_envelope
    from dask_refine.core.projection import prepare_reference_rfft
    from dask_refine.core.refine_step import EStepOptions, refine_particles
    from dask_refine.core.symmetry import symmetry_operators

    volume, px = demo_map
    small, px = downsample_to_32(volume), 2 * px
    store = simulate_store(small, px, tmp_path / "p.zarr", SimulationConfig(
        n_particles=12, snr=np.inf, chunk_size=12, seed=2, shift_sigma_A=0.0))
    truth = store.read_column("rotation", group=GROUND_TRUTH)
    turned = np.arange(12) % 2 == 1
    filed = np.where(turned[:, None, None], truth @ symmetry_operators("C2")[1], truth)
    meta = dict(store.optics_metadata(), scale=store.read_column("scale", group=GROUND_TRUTH),
                origin_px=np.zeros((12, 2)), rotation=filed)
    ref = prepare_reference_rfft(small)
    params = SearchParams(r_align=14, particle_radius_px=12, first_level=3, last_level=5,
                          max_shift_px=1.0, local=True, local_level=3)

    def estep(relax):
        return refine_particles(FourierSums.zeros(2, 32), store.images[:], meta,
                                np.zeros(12, int), [ref, ref], [amplitude_envelope(ref, 32)] * 2,
                                noise_weights(np.full(17, 1.0), 32), params, px, 14.0,
                                options=EStepOptions(relax_symmetry=relax))

    plain = angular_distance_deg(estep(None).rotation, truth)
    relaxed = angular_distance_deg(estep("C2").rotation, truth)
    assert np.all(plain[turned] > 90.0) and np.all(plain[~turned] < 5.0)
    assert np.all(relaxed < 5.0), relaxed
