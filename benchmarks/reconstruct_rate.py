"""Reconstruction rate against RELION 3.1 and RELION 5 at box 64, 128 and 256 (issue 19, item 2).

For each box it simulates particles (box 64: ``1tii`` at 2 Å/px; box 128: ``1tii`` at 1 Å/px;
box 256: the box-128 map Fourier-padded to 0.5 Å/px), SNR 0.1, CTF on, exports one RELION 3.1
STAR file and ``.mrcs`` stack, and times on the same cores:

  * **ours, reconstruction**: reading, backprojection and tree reduction (``compute_sums``), the
    half maps and the regularised full map with their padded inverse transforms
    (``reconstruct_halves_and_full``) and writing the three maps: what ``relion_reconstruct``
    does, on a warm LocalCluster of ``--workers`` processes × 1 thread;
  * **ours, whole job**: the Reconstruction Only job with every output it writes by default
    (also the FSC report, figures, sharpened map, local resolution and ``particles.star``);
  * ``relion_reconstruct --ctf`` of RELION 3.1 (Debian, PATH) and of RELION 5 (``--relion-bin``,
    built by ``install_peers.sh --relion5-source``): one process each, as a fresh process.

Every map is scored by its FSC with the truth at 0.5, so that the rates compare at equal FSC.
Each program runs ``--repeat`` times and its best wall is kept (the machine is shared).

    python benchmarks/reconstruct_rate.py --relion-bin benchmarks/.peers/relion5/bin
    python benchmarks/reconstruct_rate.py --boxes 64 --n 64=500   # quick
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from peers import relion_label, relion_program  # noqa: E402

DEFAULT_N = {64: 2000, 128: 1000, 256: 300}


def truth_map(box: int, data_dir: Path):
    """(map, pixel size) of the case's ground truth."""
    from dask_refine.io.mrc import read_map

    if box == 64:
        return read_map(data_dir / "1tii_64_2.0.mrc")
    volume, px = read_map(data_dir / "1tii_128_1.0.mrc")
    if box == 128:
        return volume, px
    # box 256 at half the pixel size: the same transform, zero beyond the old Nyquist
    f = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(volume.astype(np.float64))))
    padded = np.zeros((256,) * 3, np.complex128)
    padded[64:192, 64:192, 64:192] = f
    up = np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(padded))).real * 8.0
    return up.astype(np.float32), px / 2


def best_of(repeat: int, run) -> tuple[float, object]:
    walls, out = [], None
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        out = run()
        walls.append(time.perf_counter() - t0)
    return min(walls), out


def ours_reconstruction(store, out: Path, client) -> dict:
    """The reconstruction proper, phase by phase (seconds)."""
    from dask_refine.io.mrc import write_map
    from dask_refine.jobs.config import ReconstructConfig
    from dask_refine.jobs.reconstruct import (compute_sums, load_pose_metadata,
                                              reconstruct_halves_and_full)

    info = store.info
    config = ReconstructConfig(store=str(store.path), out_dir=str(out))
    t0 = time.perf_counter()
    meta = load_pose_metadata(store, True)
    groups = meta["half_set"].astype(np.int64)
    sums = compute_sums(store, meta, groups, 2, config, client)
    t1 = time.perf_counter()
    halves, _, full = reconstruct_halves_and_full(sums, info.box_size, info.pixel_size_A)
    t2 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    for name, volume in (("half_A", halves[0]), ("half_B", halves[1]), ("map", full)):
        write_map(out / f"{name}.mrc", volume, info.pixel_size_A)
    t3 = time.perf_counter()
    return {"backprojection_s": t1 - t0, "reconstruct_s": t2 - t1, "write_s": t3 - t2,
            "map": full}


def run_box(box: int, n: int, args, client, relions) -> dict:
    from dask_refine.core.fsc import fsc, resolution_at_threshold
    from dask_refine.io.mrc import read_map
    from dask_refine.io.simulate import SimulationConfig, simulate_store
    from dask_refine.io.star import export_star
    from dask_refine.jobs.config import ReconstructConfig
    from dask_refine.jobs.reconstruct import run_reconstruct

    truth, px = truth_map(box, Path(args.data_dir))
    work = Path(args.work_dir) / f"box{box}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"[box {box}] simulating {n} particles at {px:g} Å/px …", flush=True)
    store = simulate_store(truth, px, work / "p.zarr",
                           SimulationConfig(n_particles=n, snr=args.snr, seed=args.seed,
                                            chunk_size=max(50, n // (4 * args.workers))),
                           write_poses=True)
    star = export_star(store, work / "star" / "particles.star")

    def truth_A(volume) -> float:
        return resolution_at_threshold(fsc(volume, truth), box, px, 0.5)

    rows = {}
    wall, phases = best_of(args.repeat, lambda: ours_reconstruction(store, work / "ours", client))
    rows["dask_refine reconstruction (backproject, reduce, maps, write)"] = {
        "wall_s": wall, "fsc_truth_05_A": truth_A(phases.pop("map")), **phases}
    wall, summary = best_of(args.repeat, lambda: run_reconstruct(
        ReconstructConfig(store=str(store.path), out_dir=str(work / "job")), client=client,
        log=lambda m: None))
    rows["dask_refine whole job (default outputs)"] = {
        "wall_s": wall, "fsc_truth_05_A": truth_A(read_map(work / "job" / "map.mrc")[0])}
    for label, exe in relions:
        out = work / f"{label.replace(' ', '_')}.mrc"
        cmd = [exe, "--i", star.name, "--o", str(out), "--ctf", "--angpix", f"{px:g}"]

        def run():
            proc = subprocess.run(cmd, cwd=star.parent, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr[-1000:]}")

        wall, _ = best_of(args.repeat, run)
        rows[f"{label} relion_reconstruct --ctf"] = {
            "wall_s": wall, "fsc_truth_05_A": truth_A(read_map(out)[0]), "command": " ".join(cmd)}
    for row in rows.values():
        row["images_per_s"] = n / row["wall_s"]
    return {"box_size": box, "n_particles": n, "pixel_size_A": px, "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--boxes", type=int, nargs="+", default=[64, 128, 256], choices=[64, 128, 256])
    p.add_argument("--n", nargs="*", default=[], metavar="BOX=N",
                   help="particles per box (default: 64=2000 128=1000 256=300)")
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="our worker processes")
    p.add_argument("--repeat", type=int, default=2, help="runs per program (best kept)")
    p.add_argument("--relion-bin", default=None, metavar="DIR",
                   help="RELION 5's binaries (benchmarks/.peers/relion5/bin)")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--work-dir", default=str(HERE / "results" / "reconstruct_rate"))
    p.add_argument("--json", default=str(HERE / "results" / "reconstruct_rate.json"))
    args = p.parse_args(argv)
    counts = dict(DEFAULT_N, **{int(k): int(v) for k, v in (s.split("=") for s in args.n)})

    relions = []
    if relion_program("relion_reconstruct"):
        relions.append((relion_label(), relion_program("relion_reconstruct")))
    if args.relion_bin:
        exe = relion_program("relion_reconstruct", args.relion_bin)
        if exe is None:
            p.error(f"--relion-bin {args.relion_bin}: no relion_reconstruct there")
        relions.append((relion_label(args.relion_bin), exe))

    from distributed import Client, LocalCluster

    from dask_refine.jobs.config import ReconstructConfig
    from dask_refine.jobs.reconstruct import run_reconstruct

    results = {"workers": args.workers, "snr": args.snr, "repeat": args.repeat, "cases": []}
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        # warm-up: worker imports and Numba's kernels are not counted
        warm = Path(args.work_dir) / "warmup"
        shutil.rmtree(warm, ignore_errors=True)
        from dask_refine.io.mrc import read_map
        from dask_refine.io.simulate import SimulationConfig, simulate_store

        volume, px = read_map(Path(args.data_dir) / "1tii_64_2.0.mrc")
        st = simulate_store(volume, px, warm / "p.zarr", SimulationConfig(n_particles=64),
                            write_poses=True)
        run_reconstruct(ReconstructConfig(store=str(st.path), out_dir=str(warm / "o")),
                        client=client, log=lambda m: None)
        for box in args.boxes:
            results["cases"].append(run_box(box, counts[box], args, client, relions))

    print(f"\nReconstruction from known poses, SNR {args.snr:g}, CTF on; ours on {args.workers} "
          f"worker processes × 1 thread (warm), RELION one process (fresh); best of "
          f"{args.repeat}\n")
    print("| program | box | N | wall s | images/s | FSC-truth @0.5 | ours (reconstruction) "
          "÷ this, images/s |\n|---|---:|---:|---:|---:|---:|---:|")
    for case in results["cases"]:
        rows = case["rows"]
        ours = next(iter(rows.values()))["images_per_s"]
        for name, row in rows.items():
            row["ours_rate_over_this"] = ours / row["images_per_s"]
            print(f"| {name} | {case['box_size']} | {case['n_particles']} | {row['wall_s']:.2f} "
                  f"| {row['images_per_s']:.0f} | {row['fsc_truth_05_A']:.2f} Å "
                  f"| {row['ours_rate_over_this']:.2f}× |")
        first = next(iter(rows.values()))
        print(f"|   ours, reconstruction's phases | {case['box_size']} | | backprojection and "
              f"reduction {first['backprojection_s']:.2f} s, maps {first['reconstruct_s']:.2f} s, "
              f"writes {first['write_s']:.2f} s | | | |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
