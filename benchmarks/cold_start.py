"""Cold-start benchmark: each command as a fresh process, the way a user runs it (issue 19).

It simulates one dataset (1,500 box-64 particles of ``1tii`` at 2 Å/px, SNR 0.1, CTF on), exports
it as a RELION 3.1 STAR file and ``.mrcs`` stack, and then times, as fresh processes interleaved
round by round (``--repeat`` rounds, median reported):

  * ``dask-refine reconstruct STORE --out …``           the whole job, as a user types it
  * ``relion_reconstruct --i particles.star --ctf …``   RELION 3.1 (Debian) on the same particles
  * the same with RELION 5 (``--relion-bin DIR``, optional)
  * ``dask-refine refine --help`` and ``dask-refine --help``

Our reconstruct row is split into where its wall time goes, read from the job's
``summary.json``: reading and backprojection with the cluster's start
(``backprojection_time_s``), the outputs after it (maps, FSC, figures, sharpening, local
resolution, ``particles.star``), and what is left of the wall (interpreter, imports, exit).

Goal (issue 19): ``reconstruct`` cold ≤ ``relion_reconstruct``'s wall on the same machine, and
``refine --help`` under 1 s.

    python benchmarks/cold_start.py                      # ~1 minute on 2 cores
    python benchmarks/cold_start.py --repeat 5 --json benchmarks/results/cold_start.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from peers import relion_label, relion_program  # noqa: E402


def dask_refine_cmd() -> list[str]:
    """The console script next to this interpreter (a venv's), else ``python -m``."""
    script = Path(sys.executable).with_name("dask-refine")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dask_refine.ui.cli"]


def timed(cmd, cwd=None) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                           f"{(proc.stderr or proc.stdout)[-2000:]}")
    return wall, proc


def prepare(work: Path, n: int, snr: float, seed: int) -> tuple[Path, Path, float]:
    """Simulate the store and export its STAR; returns (store, star, pixel size)."""
    from dask_refine.data import demo_map_path
    from dask_refine.io.mrc import read_map
    from dask_refine.io.simulate import SimulationConfig, simulate_store
    from dask_refine.io.star import export_star

    truth, px = read_map(demo_map_path())
    store = simulate_store(truth, px, work / "particles.zarr",
                           SimulationConfig(n_particles=n, snr=snr, seed=seed),
                           write_poses=True)
    star = export_star(store, work / "star" / "particles.star")
    return work / "particles.zarr", star, px


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--particles", type=int, default=1500)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=3, help="rounds of every command (median)")
    p.add_argument("--relion-bin", default=None, metavar="DIR",
                   help="also time RELION 5's relion_reconstruct from DIR "
                   "(benchmarks/.peers/relion5/bin, built by install_peers.sh --relion5-source)")
    p.add_argument("--work-dir", default=str(HERE / "results" / "cold_start_work"))
    p.add_argument("--json", default=str(HERE / "results" / "cold_start.json"))
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="more options for our reconstruct (after everything else)")
    args = p.parse_args(argv)

    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"simulating {args.particles} box-64 particles …", flush=True)
    store, star, px = prepare(work, args.particles, args.snr, args.seed)

    ours = dask_refine_cmd()
    commands: dict[str, list] = {}
    relion3 = relion_program("relion_reconstruct")
    relion5 = relion_program("relion_reconstruct", args.relion_bin) if args.relion_bin else None
    if args.relion_bin and relion5 is None:
        p.error(f"--relion-bin {args.relion_bin}: no relion_reconstruct there")
    label5 = relion_label(args.relion_bin) if relion5 else ""

    def reconstruct_cmd(k):
        return [*ours, "reconstruct", str(store), "--out", str(work / f"ours_{k}"), *args.extra]

    def relion_cmd(exe, tag, k):
        return [exe, "--i", star.name, "--o", str(work / f"{tag}_{k}.mrc"), "--ctf",
                "--angpix", f"{px:g}"]

    walls: dict[str, list[float]] = {}
    parts: dict[str, list[float]] = {"job_s": [], "backprojection_s": [], "outputs_s": [],
                                     "startup_s": []}
    for k in range(args.repeat):
        wall, proc = timed(reconstruct_cmd(k))
        walls.setdefault("dask-refine reconstruct", []).append(wall)
        summary = json.loads((work / f"ours_{k}" / "summary.json").read_text())
        parts["job_s"].append(summary["time_s"])
        parts["backprojection_s"].append(summary["backprojection_time_s"])
        parts["outputs_s"].append(summary["time_s"] - summary["backprojection_time_s"])
        parts["startup_s"].append(wall - summary["time_s"])
        for exe, tag, name in ((relion3, "relion3", f"{relion_label()} relion_reconstruct --ctf"),
                               (relion5, "relion5", f"{label5} relion_reconstruct --ctf")):
            if exe:
                walls.setdefault(name, []).append(
                    timed(relion_cmd(exe, tag, k), cwd=star.parent)[0])
        walls.setdefault("dask-refine refine --help", []).append(
            timed([*ours, "refine", "--help"])[0])
        walls.setdefault("dask-refine --help", []).append(timed([*ours, "--help"])[0])
        print(f"round {k + 1}/{args.repeat}: " + ", ".join(
            f"{name} {v[-1]:.2f} s" for name, v in walls.items()), flush=True)

    rows = {name: {"median_s": statistics.median(v), "all_s": v} for name, v in walls.items()}
    ours_s = rows["dask-refine reconstruct"]["median_s"]
    print(f"\n{args.particles} particles, box 64, {px:g} Å/px; fresh processes, median of "
          f"{args.repeat}\n")
    print(f"| command | wall s (median) | vs ours |\n|---|---:|---:|")
    for name, row in rows.items():
        ratio = ours_s / row["median_s"] if "reconstruct" in name else float("nan")
        row["ours_over_this"] = ratio
        print(f"| {name} | {row['median_s']:.2f} | "
              f"{'' if ratio != ratio else f'{ratio:.2f}×'} |")
    split = {k: statistics.median(v) for k, v in parts.items()}
    print(f"\nours: job {split['job_s']:.2f} s (summary.json time_s: reading and backprojection "
          f"with the cluster's start {split['backprojection_s']:.2f} s, then maps, FSC, figures, "
          f"sharpening, local resolution, particles.star {split['outputs_s']:.2f} s); "
          f"interpreter, imports and exit {split['startup_s']:.2f} s")
    result = {"particles": args.particles, "box_size": 64, "pixel_size_A": px,
              "snr": args.snr, "repeat": args.repeat, "extra": args.extra, "rows": rows,
              "ours_split_median_s": split,
              "relion": {"path": relion3, "relion_bin": args.relion_bin}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
