"""Homogeneous Refinement end to end: pose recovery, resolution vs true poses, kill + resume."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import starfile
from distributed import Client, LocalCluster

from dask_refine.core.fsc import fsc, resolution_at_threshold
from dask_refine.core.rotations import angular_distance_deg
from dask_refine.io.mrc import read_map, write_map
from dask_refine.io.simulate import SimulationConfig, simulate_store
from dask_refine.io.store import GROUND_TRUTH
from dask_refine.jobs.reconstruct import reconstruct_halves_and_full
from dask_refine.jobs.refine import RefineConfig, run_refine
from helpers import small_refine_dataset, true_pose_sums


@pytest.fixture(scope="module")
def client():
    # one in-process worker with two threads: as the embedded cluster runs small jobs, and
    # faster here than two processes (docs/benchmarks.md, "Cold start")
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as c:
        yield c


def _true_pose_map(store, px):
    return reconstruct_halves_and_full(true_pose_sums(store, px), store.info.box_size, px)[2]


def test_refinement_recovers_poses_and_resolution(tmp_path, demo_map, client):
    volume, px = demo_map
    store = simulate_store(volume, px, tmp_path / "p.zarr",
                           SimulationConfig(n_particles=240, snr=0.5, chunk_size=80, seed=4))
    write_map(tmp_path / "initial.mrc", volume, px)  # low-passed to 30 Å by the job
    summary = run_refine(RefineConfig(store=str(store.path), initial_map=str(tmp_path / "initial.mrc"),
                                      out_dir=str(tmp_path / "out"), max_iterations=6,
                                      first_level_candidates=128),  # SNR 0.5: 128 suffice
                         client=client, log=lambda m: None)
    for name in ("map.mrc", "half_A.mrc", "half_B.mrc", "fsc.csv", "fsc.png", "iterations.csv",
                 "particles.star", "summary.json", "config.json"):
        assert (tmp_path / "out" / name).exists(), name
    # the simulated images are written once, and both particle files refer to that stack
    assert [p.name for p in (tmp_path / "out").glob("*.mrcs")] == ["particles.mrcs"]
    assert set(np.load(tmp_path / "out" / "particles.cs")["blob/path"]) == {b"particles.mrcs"}
    poses = np.load(tmp_path / "out" / "iterations" / f"iter_{summary['iterations']:03d}"
                    / "poses.npz")
    err = angular_distance_deg(poses["rotation"], store.read_column("rotation", GROUND_TRUTH))
    assert np.median(err) < 2 * 0.9375 + 0.5  # within about two finest (level-6) grid steps
    refined, _ = read_map(tmp_path / "out" / "map.mrc")
    res_refined = resolution_at_threshold(fsc(refined, volume), 64, px, 0.5)
    res_true = resolution_at_threshold(fsc(_true_pose_map(store, px), volume), 64, px, 0.5)
    assert res_refined < 1.2 * res_true, (res_refined, res_true)
    assert summary["resolution_A"] < 6.0
    table = pd.read_csv(tmp_path / "out" / "iterations.csv")
    for name in ("pruned_by_bound_fraction", "pruned_by_cap_fraction", "capped_fraction"):
        assert table[name].between(0, 1).all(), name
    assert (table["pruned_by_bound_fraction"] + table["pruned_by_cap_fraction"] < 1).all()


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory, demo_map):
    root = tmp_path_factory.mktemp("resume")
    return root, small_refine_dataset(root, demo_map, n_particles=48, chunk_size=12)


def _refine_cmd(root, out, *extra):
    return [sys.executable, "-m", "dask_refine.ui.cli", "refine", str(root / "p.zarr"),
            "--initial", str(root / "initial.mrc"), "--out", str(out), "--max-iterations", "2",
            "--first-level-candidates", "256", *extra]  # SNR 1; small: threads in-process


def test_killed_run_resumes_to_the_same_result(small_dataset):
    root, _ = small_dataset
    full = subprocess.run(_refine_cmd(root, root / "full"), capture_output=True, text=True,
                          timeout=600)
    assert full.returncode == 0, full.stderr
    # a second run is killed (whole process group) once iteration 1 is on disk
    proc = subprocess.Popen(_refine_cmd(root, root / "killed"), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (root / "killed" / "iterations" / "iter_001").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (root / "killed" / "iterations" / "iter_002").exists()
    again = subprocess.run(_refine_cmd(root, root / "killed"), capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr  # no silent restart
    resumed = subprocess.run(_refine_cmd(root, root / "killed", "--resume"),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    for name in ("map.mrc", "half_A.mrc", "half_B.mrc"):
        a, _ = read_map(root / "full" / name)
        b, _ = read_map(root / "killed" / name)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())
    pa = np.load(root / "full" / "iterations" / "iter_002" / "poses.npz")
    pb = np.load(root / "killed" / "iterations" / "iter_002" / "poses.npz")
    np.testing.assert_allclose(pb["rotation"], pa["rotation"], atol=1e-9)
    np.testing.assert_allclose(pb["origin_px"], pa["origin_px"], atol=1e-9)
    star_a = starfile.read(root / "full" / "particles.star")
    star_b = starfile.read(root / "killed" / "particles.star")
    for block in ("optics", "particles"):
        pd.testing.assert_frame_equal(star_b[block], star_a[block])


def test_second_run_on_same_folder_is_refused(small_dataset, tmp_path):
    root, _ = small_dataset
    out = tmp_path / "busy"
    out.mkdir()
    (out / ".lock").write_text(str(os.getpid()))  # this (live) process holds the folder
    r = subprocess.run(_refine_cmd(root, out), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "another run" in r.stderr


def test_bad_initial_map_is_refused(small_dataset, tmp_path, demo_map):
    root, _ = small_dataset
    write_map(tmp_path / "big.mrc", demo_map[0], demo_map[1] * 2)  # box 64 vs particles' 32
    r = subprocess.run([sys.executable, "-m", "dask_refine.ui.cli", "refine",
                        str(root / "p.zarr"), "--initial", str(tmp_path / "big.mrc"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "box 64" in r.stderr and "Traceback" not in r.stderr


def test_stays_global_while_particles_still_jump_far():
    """The switch to local searches (``_search_params``): with the median pose change below the
    sampling it was measured at, a search is local only when at most ``max_far_jump_fraction``
    of the particles moved farther than a local search reaches (``far_jump_reach_deg``)."""
    from dask_refine.jobs.refine import State, _search_params, far_jump_reach_deg

    config = RefineConfig(store="s", initial_map="m.mrc", out_dir="o")
    n = 10

    def state(far):
        return State(3, [], np.ones(33), np.ones(n), np.tile(np.eye(3), (n, 1, 1)),
                     np.zeros((n, 2)), 20.0, 8.0, 8.0, 0, level=5, pose_change_deg=3.2,
                     pose_change_sampling_deg=3.75, angular_accuracy_deg=2.0,
                     far_jump_fraction=far)

    assert not _search_params(config, state(0.27), 64, 25.0, 6.0).local
    assert _search_params(config, state(0.01), 64, 25.0, 6.0).local
    # at the switch the reach covers the local range, and at least 1.5 cells of the grid
    assert far_jump_reach_deg(2.0, 5) == pytest.approx(6.0)
    assert far_jump_reach_deg(0.5, 5) == pytest.approx(1.5 * 1.875)


def test_local_sampling_goes_no_finer_than_the_poses_are_known():
    """RELION's rule for finer sampling: a local search's last level is the coarsest whose
    spacing is below 0.75 × the angular accuracy, even where the resolution asks for more;
    global searches and sharper posteriors are not held back by it."""
    from dask_refine.jobs.refine import State, _search_params, fine_enough_level

    config = RefineConfig(store="s", initial_map="m.mrc", out_dir="o")
    n = 10

    def state(accuracy, r_align=30.0, local=True):
        return State(6, [], np.ones(33), np.ones(n), np.tile(np.eye(3), (n, 1, 1)),
                     np.zeros((n, 2)), r_align, 5.0, 5.0, 0, local=local, level=5,
                     pose_change_deg=0.5 if local else 10.0, pose_change_sampling_deg=1.875,
                     angular_accuracy_deg=accuracy, far_jump_fraction=0.0)

    # the resolution alone (shell 30 of box 64, radius 25 px) would search to level 6
    assert _search_params(config, state(0.5), 64, 25.0, 6.0).last_level == 6
    for accuracy in (3.2, 2.6):  # 1.875° < 0.75 × accuracy ≤ 3.75°: level 5 is fine enough
        params = _search_params(config, state(accuracy), 64, 25.0, 6.0)
        assert params.local and params.last_level == 5
        assert so3_grid_spacing(5) < 0.75 * accuracy <= so3_grid_spacing(4)
    assert fine_enough_level(2.0, 8) == 6 and fine_enough_level(0.5, 8) == 8
    # best poses only (no marginalisation): no spread, so the resolution decides
    assert fine_enough_level(0.0, 8) == 8
    assert _search_params(config, state(0.0), 64, 25.0, 6.0).last_level == 6
    # global searches keep their own limit (max_global_level)
    params = _search_params(config, state(20.0, local=False), 64, 25.0, 6.0)
    assert not params.local and params.last_level == 5


def so3_grid_spacing(level):
    from dask_refine.core import so3_grid

    return so3_grid.spacing_deg(level)
