"""The GPU backend: CUDA kernels, CuPy against NumPy, dask-cuda clusters.

Without a GPU (CI): the CUDA kernels run in Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``,
a separate process because the variable is read when ``numba.cuda`` is first imported) and are
compared with the Numba CPU kernels; the cluster settings, the memory-sized batches and the
``--gpu`` error without CuPy are checked. With CuPy and a device, the ``gpu`` tests compare every
stage on CuPy with NumPy (relative error < 1e-4) and run the jobs on a ``LocalCUDACluster``.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dask_refine.core.backend import (array_module, backend_module, batch_size_for_memory,
                                      free_device_bytes, kernels)
from dask_refine.core.backprojection import FourierSums
from dask_refine.parallel.cluster import ClusterConfig, cuda_cluster_kwargs, gpu_problem
from dask_refine.parallel.mapreduce import _to_host, device_copies

SIMULATOR_CHECK = textwrap.dedent("""
    import numpy as np
    from dask_refine.core.backend import kernels
    from dask_refine.core.fourier import centred_rfftn
    from dask_refine.core.projection import (extract_central_slices_rfft,
                                             insert_central_slices_rfft, prepare_reference_rfft)
    from dask_refine.core.rotations import euler_to_matrix, random_rotations

    assert kernels(np, "cuda").__name__.endswith("_cuda_kernels")
    rng = np.random.default_rng(5)
    box, n = 16, 9
    rotations = random_rotations(n, rng)
    rotations[0] = np.eye(3)  # points on the x = 0 plane (half-weighted, mirrored)
    rotations[1] = euler_to_matrix(90.0, 90.0, 0.0)
    for dtype in (np.float32, np.float64):
        reference = prepare_reference_rfft(rng.standard_normal((box,) * 3).astype(dtype))
        gpu = extract_central_slices_rfft(reference, rotations, box, kernel="cuda")
        cpu = extract_central_slices_rfft(reference, rotations, box, kernel="numba")
        err = np.abs(gpu - cpu).max() / np.abs(cpu).max()
        assert gpu.dtype == cpu.dtype and err < 1e-6, ("extract", dtype, err)
    data = centred_rfftn(rng.standard_normal((n, box, box)), 2).astype(np.complex64)
    weights = rng.random(data.shape).astype(np.float32)
    p = 2 * box
    for with_weights in (True, False):
        sums = {}
        for kernel in ("cuda", "numba"):
            num = np.zeros((p, p, p // 2 + 1), np.complex64)
            wgt = np.zeros(num.shape, np.float32) if with_weights else None
            insert_central_slices_rfft(data, weights if with_weights else None, rotations, num,
                                       wgt, kernel=kernel)
            sums[kernel] = (num, wgt)
        for a, b in zip(sums["cuda"], sums["numba"]):
            if b is not None:
                err = np.abs(a - b).max() / np.abs(b).max()
                assert err < 1e-6, ("insert", with_weights, err)
    # a band-limited extraction (the pose search's) and an r_max insertion
    gpu = extract_central_slices_rfft(reference, rotations, box, r_max=5.5, kernel="cuda")
    cpu = extract_central_slices_rfft(reference, rotations, box, r_max=5.5, kernel="numba")
    assert np.abs(gpu - cpu).max() <= 1e-6 * np.abs(cpu).max()
    print("ok")
""")


def test_cuda_kernels_match_cpu_kernels_in_the_simulator():
    """The CUDA insertion (atomic scatter-add) and extraction kernels, run thread by thread in
    Numba's CUDA simulator, give the CPU kernels' results (which the projection tests check
    against the NumPy reference and the adjoint identity)."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    proc = subprocess.run([sys.executable, "-c", SIMULATOR_CHECK], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_cuda_kernels_compile_to_ptx():
    """The CUDA kernels compile for Ampere and Hopper (sm_80, sm_90) with the float32 atomic adds
    the insertion needs, offline (no device: NVVM from the ``numba-cuda[cu12]`` wheels of the
    ``[gpu]`` extra). Skipped where ``numba-cuda`` and NVVM are not installed (CI)."""
    pytest.importorskip("numba_cuda")
    import re

    from numba import cuda, types

    from dask_refine.core import _cuda_kernels as kernels_src
    f32, f64, i64 = types.float32, types.float64, types.int64
    insert_sig = (f32[:, :], f32[:, :], f64[:, :, :], f64[:], f64[:], i64[:], f64,
                  f32[:, :, :], f32[:, :, :], types.boolean)
    for cc in ((8, 0), (9, 0)):
        try:
            ptx, _ = cuda.compile_ptx(kernels_src._insert_kernel.py_func, insert_sig, cc=cc)
        except Exception as exc:  # NVVM missing: numba-cuda installed without its CUDA wheels
            if "NVVM" in str(exc) or "nvvm" in str(exc):
                pytest.skip(f"no NVVM: {exc}")
            raise
        assert set(re.findall(r"\b(?:atom|red)\.[a-z0-9.]+", ptx)) == {"atom.add.f32"}
        for c in (types.complex64, types.complex128):
            extract_sig = (c[:, :, :], f64[:, :, :], f64[:], f64[:], i64[:], f64, c[:, :])
            ptx, _ = cuda.compile_ptx(kernels_src._extract_kernel.py_func, extract_sig, cc=cc)
            assert ".entry" in ptx


def test_backend_selection():
    assert backend_module("numpy") is np and array_module(np.zeros(2)) is np
    assert kernels(np, "numpy") is None
    assert kernels(np, "auto").__name__.endswith("_numba_kernels")
    with pytest.raises(ValueError, match="numpy' or 'cupy"):
        backend_module("torch")
    assert ClusterConfig().backend == "numpy" and ClusterConfig(gpu=True).backend == "cupy"


def test_batches_are_sized_to_free_device_memory():
    assert free_device_bytes(np) is None
    assert batch_size_for_memory(1000, None, default=8192) == 8192  # host: the default
    # a quarter of 80 GB over 1 MB per rotation
    assert batch_size_for_memory(10 ** 6, 80 * 10 ** 9, default=8192) == 20_000
    assert batch_size_for_memory(10 ** 9, 10 ** 9, default=8192, minimum=64) == 64


def test_cuda_cluster_settings_honour_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    kwargs = cuda_cluster_kwargs(ClusterConfig(gpu=True, device_memory_limit="40GB"))
    assert kwargs["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert kwargs["device_memory_limit"] == "40GB" and kwargs["threads_per_worker"] == 1
    assert kwargs["host"] == "127.0.0.1" and "n_workers" not in kwargs  # one per visible GPU
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert "CUDA_VISIBLE_DEVICES" not in cuda_cluster_kwargs(ClusterConfig(gpu=True))


def test_host_results_of_the_reduction():
    sums = FourierSums.zeros(2, 8)
    sums.data += 1 + 2j
    host = _to_host((sums, [(0, "step")]))
    assert np.array_equal(host[0].data, sums.data) and host[1] == [(0, "step")]
    refs = [np.ones(3), np.zeros(3)]
    assert device_copies(refs, np) is refs


@pytest.mark.skipif(gpu_problem() is None, reason="this machine can run the GPU backend")
def test_gpu_flag_without_cupy_is_a_clear_error(tmp_path, demo_map):
    from dask_refine.io.simulate import SimulationConfig, simulate_store

    simulate_store(*demo_map, tmp_path / "p.zarr", SimulationConfig(n_particles=8, chunk_size=4),
                   write_poses=True)
    proc = subprocess.run([sys.executable, "-m", "dask_refine.ui.cli", "reconstruct",
                           str(tmp_path / "p.zarr"), "--out", str(tmp_path / "out"), "--gpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "--gpu" in proc.stderr and ("dask-refine[gpu]" in proc.stderr
                                       or "CUDA device" in proc.stderr)
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------ on a GPU (skipped elsewhere)
def _rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.gpu
def test_cupy_kernels_match_numpy(rng):
    import cupy as cp

    from dask_refine.core.fourier import centred_irfftn, centred_rfftn
    from dask_refine.core.projection import (extract_central_slices_rfft,
                                             insert_central_slices_rfft, prepare_reference_rfft)
    from dask_refine.core.rotations import random_rotations

    box, n = 64, 50
    vol = rng.standard_normal((box,) * 3).astype(np.float32)
    rot = random_rotations(n, rng)
    ref = prepare_reference_rfft(vol)
    ref_d = prepare_reference_rfft(cp.asarray(vol))
    assert _rel(ref_d.get(), ref) < 1e-4  # cupy.fft against scipy.fft
    assert _rel(centred_irfftn(ref_d, 3, 2 * box).get(), centred_irfftn(ref, 3, 2 * box)) < 1e-4
    for kernel in ("auto", "numpy"):  # CUDA kernels, and gathers + cupyx.scatter_add
        s_d = extract_central_slices_rfft(ref_d, cp.asarray(rot), box, kernel=kernel)
        assert _rel(s_d.get(), extract_central_slices_rfft(ref, rot, box)) < 1e-4
        data = centred_rfftn(rng.standard_normal((n, box, box)).astype(np.float32), 2)
        w = rng.random(data.shape).astype(np.float32)
        p = 2 * box
        num, wgt = np.zeros((p, p, p // 2 + 1), np.complex64), np.zeros((p, p, p // 2 + 1),
                                                                          np.float32)
        num_d, wgt_d = cp.asarray(num), cp.asarray(wgt)
        insert_central_slices_rfft(data, w, rot, num, wgt)
        insert_central_slices_rfft(cp.asarray(data), cp.asarray(w), rot, num_d, wgt_d,
                                   kernel=kernel)
        assert _rel(num_d.get(), num) < 1e-4 and _rel(wgt_d.get(), wgt) < 1e-4


@pytest.mark.gpu
def test_cupy_e_step_matches_numpy(tmp_path, demo_map):
    """Backprojection and one refinement E-step (pose search, scales, noise, insertion) on CuPy
    give NumPy's poses and sums."""
    import cupy as cp

    from dask_refine.core.backprojection import backproject_particles
    from dask_refine.core.noise import noise_weights
    from dask_refine.core.pose_search import SearchParams, amplitude_envelope
    from dask_refine.core.projection import prepare_reference_rfft
    from dask_refine.core.refine_step import refine_particles
    from dask_refine.io.store import CTF_COLUMNS, GROUND_TRUTH
    from helpers import small_refine_dataset

    store = small_refine_dataset(tmp_path, demo_map, 64, 32)
    box, px = store.info.box_size, store.info.pixel_size_A
    meta = store.metadata(["half_set", *CTF_COLUMNS])
    for k in ("rotation", "shift_A", "scale"):
        meta[k] = store.read_column(k, group=GROUND_TRUTH)
    images = store.images[:]
    cpu = backproject_particles(FourierSums.zeros(2, box), images, meta, meta["half_set"], px)
    gpu = backproject_particles(FourierSums.zeros(2, box, xp=cp), images, meta,
                                meta["half_set"], px)
    assert _rel(gpu.data.get(), cpu.data) < 1e-4 and _rel(gpu.weight.get(), cpu.weight) < 1e-4
    from dask_refine.io.mrc import read_map

    ref = prepare_reference_rfft(read_map(tmp_path / "initial.mrc")[0])
    env = amplitude_envelope(ref, box)
    params = SearchParams(r_align=box / 4, particle_radius_px=box / 3)
    step_meta = {k: meta[k] for k in CTF_COLUMNS}
    step_meta["scale"] = np.ones(len(images))
    step_meta["origin_px"] = np.zeros((len(images), 2))
    weights = noise_weights(np.ones(box // 2 + 1), box)
    out = {}
    for name, xp in (("cpu", np), ("gpu", cp)):
        sums = FourierSums.zeros(2, box, xp=xp)
        refs = [xp.asarray(ref), xp.asarray(ref)]
        step = refine_particles(sums, images, step_meta, meta["half_set"], refs, [env, env],
                                weights, params, px, box / 4)
        out[name] = (sums, step)
    same = np.all(np.isclose(out["gpu"][1].rotation, out["cpu"][1].rotation, atol=1e-9),
                  axis=(1, 2))
    assert same.mean() >= 0.95
    assert _rel(out["gpu"][1].error[same], out["cpu"][1].error[same]) < 1e-4
    assert _rel(out["gpu"][1].scale_estimate[same], out["cpu"][1].scale_estimate[same]) < 1e-4
    assert _rel(out["gpu"][1].noise_sums, out["cpu"][1].noise_sums) < 1e-3


@pytest.mark.gpu
def test_jobs_on_a_local_cuda_cluster_match_the_cpu_cluster(tmp_path, demo_map):
    """Reconstruction and two refinement iterations with ``ClusterConfig(gpu=True)`` (dask-cuda,
    one worker per visible GPU) give the CPU cluster's maps."""
    from dask_refine.io.mrc import read_map
    from dask_refine.jobs.reconstruct import ReconstructConfig, run_reconstruct
    from dask_refine.jobs.refine import RefineConfig, run_refine
    from helpers import small_refine_dataset

    store = small_refine_dataset(tmp_path, demo_map, 400, 100, write_poses=True)
    maps = {}
    for name, gpu in (("cpu", False), ("gpu", True)):
        cluster = ClusterConfig(gpu=gpu, n_workers=None if gpu else 2)
        run_reconstruct(ReconstructConfig(store=str(store.path),
                                          out_dir=str(tmp_path / f"rec_{name}"), cluster=cluster))
        run_refine(RefineConfig(store=str(store.path), initial_map=str(tmp_path / "initial.mrc"),
                                out_dir=str(tmp_path / f"ref_{name}"), max_iterations=2,
                                cluster=cluster))
        maps[name] = [read_map(tmp_path / f"{job}_{name}" / "map.mrc")[0]
                      for job in ("rec", "ref")]
    assert _rel(maps["gpu"][0], maps["cpu"][0]) < 1e-4
    corr = np.corrcoef(maps["gpu"][1].ravel(), maps["cpu"][1].ravel())[0, 1]
    assert corr > 0.999


@pytest.mark.gpu
def test_local_cuda_cluster_has_one_worker_per_visible_gpu():
    import cupy as cp

    from dask_refine.parallel.cluster import dask_client

    n = cp.cuda.runtime.getDeviceCount()
    with dask_client(ClusterConfig(gpu=True)) as client:
        client.wait_for_workers(n)
        assert len(client.scheduler_info()["workers"]) == n
        assert all(v is None for v in client.run(
            __import__("dask_refine.parallel.cluster", fromlist=["x"])._worker_gpu_problem
        ).values())


def test_gpu_benchmark_runs_on_the_cpu_backend(tmp_path):
    """benchmarks/gpu.py (the particles/s per GPU figures) at a tiny size on NumPy: the script
    runs, its table has both tasks, the searches find poses close to the truth."""
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.py"
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(script), "--backends", "numpy", "--boxes", "64",
                           "--n-recon", "40", "--n-refine", "4", "--chunk", "16", "--json",
                           str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {r["task"] for r in rows} == {"reconstruction", "refinement E-step"}
    assert all(r["particles_per_s"] > 0 for r in rows)
    refine = next(r for r in rows if r["task"] == "refinement E-step")
    assert refine["median_angular_error_deg"] < 10.0


def test_gpu_check_script_says_no_gpu_in_one_line_and_exits_2(tmp_path):
    """benchmarks/gpu_check.sh on a machine without an NVIDIA GPU: one line, exit status 2,
    nothing installed (with a stand-in nvidia-smi that lists no GPU, whatever this machine has)."""
    import os
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    (fake / "nvidia-smi").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}",
               GPU_CHECK_VENV=str(tmp_path / "venv"))
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env,
                          timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stdout.strip().count("\n") == 0 and "no NVIDIA GPU" in done.stdout
    assert not (tmp_path / "venv").exists()
