"""Throughput per device: particles/s per GPU (CuPy) and per CPU core (NumPy + Numba) for the two
map tasks, reconstruction (backprojection) and refinement (an E-step: branch-and-bound pose
search, scales, noise, backprojection), at box 128 and 256 (issue 6).

What it times: the map task's kernel-level work on one device, as a Dask worker runs it
(``core.backprojection.backproject_particles`` and ``core.refine_step.refine_particles`` on chunks
of ``--chunk`` particles, host images copied to the device inside the timing, a warm-up chunk
first so that JIT compilation and FFT plans are not counted, the device synchronised before the
clock stops). Not timed: Zarr reads, the Dask reduction and the M-step (see benchmarks/scaling.py
for those). One process: a CPU figure is per core (Numba kernels and scipy.fft single-threaded).

Data: the 1TII map from ../shared/data (box 128, 1 Å/px; Fourier-padded to box 256 at 0.5 Å/px),
particles simulated in memory with CTF, shifts, scales and SNR 0.1. Refinement searches from the
true map with the settings of a first global iteration (Hopf grid levels 2–4, band limit D/8,
shifts ±5% of the box).

    python benchmarks/gpu.py                                   # cupy if it has a device, numpy too
    python benchmarks/gpu.py --backends numpy --boxes 64 128  # CPU only
Results: a table on stdout and benchmarks/results/gpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MAPS = [HERE.parent.parent / "shared" / "data" / "1tii_128_1.0.mrc",
        HERE.parent / "dask_refine" / "data" / "1tii_64_2.0.mrc"]


def resample(volume: np.ndarray, pixel_size_A: float, box_size: int):
    """The map at ``box_size`` by Fourier cropping or zero-padding (pixel size scaled)."""
    from dask_refine.core.fourier import centred_fftn, centred_ifftn, crop_centred, pad_centred

    d = volume.shape[-1]
    f = centred_fftn(volume.astype(np.float64), 3)
    f = crop_centred(f, box_size, 3) if box_size < d else pad_centred(f, box_size, 3)
    out = (centred_ifftn(f, 3).real * (box_size / d) ** 3).astype(np.float32)
    return out, pixel_size_A * d / box_size


def dataset(box_size: int, n: int, seed: int = 0):
    """(volume, pixel size, meta, truth, noisy images) simulated in memory."""
    from dask_refine.core.projection import prepare_reference_rfft
    from dask_refine.io.mrc import read_map
    from dask_refine.io.simulate import SimulationConfig, render_particles, simulate_metadata

    volume, px = read_map(next(p for p in MAPS if p.exists()))
    volume, px = resample(volume, px, box_size)
    sim = simulate_metadata(SimulationConfig(n_particles=n, seed=seed), box_size, px)
    clean = render_particles(prepare_reference_rfft(volume), sim["meta"], sim["truth"],
                             slice(0, n), box_size, px)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(clean.shape).astype(np.float32) * np.sqrt(clean.var() / 0.1)
    return volume, px, sim["meta"], sim["truth"], clean + noise


def _sync(xp):
    if xp is not np:
        xp.cuda.Device().synchronize()


def _chunks(n: int, size: int):
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def time_reconstruction(xp, images, meta, truth, px, chunk: int) -> float:
    """Seconds to backproject every particle (after one warm-up chunk)."""
    from dask_refine.core.backprojection import FourierSums, backproject_particles

    box = images.shape[-1]
    cols = {**{k: v for k, v in meta.items() if k != "half_set"}, **truth}
    halves = meta["half_set"]

    def run(rows):
        sums = FourierSums.zeros(2, box, xp=xp)
        for sl in rows:
            backproject_particles(sums, images[sl], {k: v[sl] for k, v in cols.items()},
                                  halves[sl], px)
        _sync(xp)

    run(_chunks(min(chunk, len(images)), chunk))
    t0 = time.perf_counter()
    run(_chunks(len(images), chunk))
    return time.perf_counter() - t0


def search_params(box: int):
    from dask_refine.core.pose_search import SearchParams

    return SearchParams(r_align=box / 8, particle_radius_px=0.35 * box, first_level=2,
                        last_level=4, max_shift_px=max(2.0, 0.05 * box))


def time_refinement(xp, volume, images, meta, truth, px, chunk: int) -> tuple[float, float]:
    """Seconds for one E-step over every particle (after a warm-up), and the median angular
    error of the poses found (a check that the GPU and CPU searches do the same work)."""
    from dask_refine.core.backprojection import FourierSums
    from dask_refine.core.noise import noise_weights
    from dask_refine.core.pose_search import amplitude_envelope
    from dask_refine.core.projection import prepare_reference_rfft
    from dask_refine.core.refine_step import refine_particles
    from dask_refine.core.rotations import angular_distance_deg
    from dask_refine.io.store import CTF_COLUMNS

    box = images.shape[-1]
    ref = prepare_reference_rfft(volume)
    env = amplitude_envelope(ref, box)
    refs = [xp.asarray(ref), xp.asarray(ref)]
    weights = noise_weights(np.full(box // 2 + 1, float(images.var() * box * box)), box)
    params = search_params(box)
    step_meta = {k: meta[k] for k in CTF_COLUMNS}
    step_meta["scale"] = truth["scale"]
    step_meta["origin_px"] = np.zeros((len(images), 2))
    rotations = np.zeros((len(images), 3, 3))

    def run(rows):
        sums = FourierSums.zeros(2, box, xp=xp)
        for sl in rows:
            step = refine_particles(sums, images[sl], {k: v[sl] for k, v in step_meta.items()},
                                    meta["half_set"][sl], refs, [env, env], weights, params, px,
                                    box / 8)
            rotations[sl] = step.rotation
        _sync(xp)

    run(_chunks(min(2, len(images)), chunk))
    t0 = time.perf_counter()
    run(_chunks(len(images), chunk))
    seconds = time.perf_counter() - t0
    return seconds, float(np.median(angular_distance_deg(rotations, truth["rotation"])))


def device_name(xp) -> str:
    if xp is np:
        return f"CPU core ({platform.processor() or platform.machine()})"
    props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def available_backends() -> list[str]:
    from dask_refine.parallel.cluster import gpu_problem

    return (["cupy"] if gpu_problem(need_dask_cuda=False) is None else []) + ["numpy"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", nargs="+", choices=["cupy", "numpy"], default=None,
                   help="default: cupy when a GPU is usable, and numpy")
    p.add_argument("--boxes", nargs="+", type=int, default=[128, 256])
    p.add_argument("--n-recon", type=int, default=None,
                   help="particles backprojected (default: 4000 on a GPU, 200 on a CPU core)")
    p.add_argument("--n-refine", type=int, default=None,
                   help="particles refined (default: 500 on a GPU, 8 on a CPU core)")
    p.add_argument("--chunk", type=int, default=500, help="particles per map task")
    p.add_argument("--json", default=str(HERE / "results" / "gpu.json"))
    args = p.parse_args(argv)
    from dask_refine.core.backend import backend_module

    rows = []
    for box in args.boxes:
        for backend in args.backends or available_backends():
            xp = backend_module(backend)
            on_gpu = xp is not np
            n_rec = args.n_recon or (4000 if on_gpu else 200)
            n_ref = args.n_refine or (500 if on_gpu else 8)
            volume, px, meta, truth, images = dataset(box, max(n_rec, n_ref))
            t_rec = time_reconstruction(xp, images[:n_rec], {k: v[:n_rec] for k, v in
                                                             meta.items()},
                                        {k: v[:n_rec] for k, v in truth.items()}, px, args.chunk)
            sub = slice(0, n_ref)
            t_ref, err = time_refinement(xp, volume, images[sub],
                                         {k: v[sub] for k, v in meta.items()},
                                         {k: v[sub] for k, v in truth.items()}, px, args.chunk)
            for task, n, t in (("reconstruction", n_rec, t_rec), ("refinement E-step", n_ref,
                                                                     t_ref)):
                rows.append(dict(backend=backend, device=device_name(xp), box=box, task=task,
                                 particles=n, seconds=round(t, 3),
                                 particles_per_s=round(n / t, 2),
                                 median_angular_error_deg=round(err, 2)
                                 if task.startswith("ref") else None))
                r = rows[-1]
                print(f"{r['backend']:>5} | {r['device'][:28]:<28} | box {box:>3} | "
                      f"{task:<17} | {n:>5} | {t:8.2f} s | {r['particles_per_s']:>9.1f} /s",
                      flush=True)
    print("\n| backend | device | box | task | particles | s | particles/s | median ang. err. ° |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        err = "" if r["median_angular_error_deg"] is None else r["median_angular_error_deg"]
        print(f"| {r['backend']} | {r['device']} | {r['box']} | {r['task']} | {r['particles']} "
              f"| {r['seconds']} | {r['particles_per_s']} | {err} |")
    for box in args.boxes:
        by = {(r["backend"], r["task"]): r["particles_per_s"] for r in rows if r["box"] == box}
        for task in ("reconstruction", "refinement E-step"):
            if ("cupy", task) in by and ("numpy", task) in by:
                print(f"box {box} {task}: one GPU = {by[('cupy', task)] / by[('numpy', task)]:.0f}"
                      " CPU cores")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
