"""The ``dask-refine`` command line.

Every command prints one summary line at the end; bad input exits with status 2 and one line
``error: <file/field>: <what was found and what was expected>`` (no traceback).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from .. import __version__
from ..io.errors import InputError
from ..parallel.cluster import ClusterConfig, GPUUnavailable

DEMO_MARKER = ".dask_refine_demo"
# the demo's first-level survivors from SNR 0.5 on (the refinement's default is for low SNR)
DEMO_HIGH_SNR_CANDIDATES = 128


def _progress(label: str):
    state = {"t": 0.0}

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - state["t"] > 1.0:
            state["t"] = now
            if sys.stderr.isatty():
                print(f"\r{label}: {done}/{total}", end="\n" if done == total else "",
                      file=sys.stderr, flush=True)
            else:
                print(f"{label}: {done}/{total}", file=sys.stderr, flush=True)

    return report


def _report_skipped(store) -> None:
    """One line on stderr when an import left out particles (``--skip-bad``)."""
    skipped = store.attrs.get("skipped_particles")
    if skipped:
        print(f"skipped {skipped['count']:,} of {skipped['of']:,} particles with NaN/Inf "
              f"pixels; listed in {skipped['location']}", file=sys.stderr, flush=True)


SKIP_BAD_HELP = ("leave out particles whose image has NaN/Inf pixels (listed in "
                 "STORE/skipped/particles.csv) instead of stopping with an error")
STORE_HELP = "particle store (a Zarr folder, or an fsspec URL such as s3://bucket/p.zarr)"
NEW_STORE_HELP = "new particle store to create (a Zarr folder, or an fsspec URL)"
EXIT_STATUS = """exit status:
  0    success; the last line printed is the result (resolution, files written)
  2    bad input or usage: one line 'error: <file or field>: <found>; <expected>'
  130  interrupted (a refinement resumes with --resume)
  1    an unexpected error: a bug; please report it with the traceback"""


class _Commands:
    """Sub-command registry: each command's one-line help is also its --help description."""

    def __init__(self, subparsers):
        self._sub = subparsers

    def add_parser(self, name: str, help: str) -> argparse.ArgumentParser:
        return self._sub.add_parser(name, help=help, description=help[:1].upper() + help[1:],
                                    epilog=EXIT_STATUS,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)


def _mask_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mask", help="user mask MRC (values 0…1, same box and voxel size as the "
                   "particles) for the mask-corrected FSC; a refinement also masks its "
                   "references with it every iteration (RELION's --solvent_mask with "
                   "--solvent_correct_fsc)")
    p.add_argument("--auto-mask", action="store_true",
                   help="solvent mask from the final map (low-pass 15 Å, threshold 0.2 × max, "
                   "extend 3 px, 6 px soft edge) for a mask-corrected FSC")


    g = p.add_argument_group("sharpening and local resolution (relion_postprocess)")
    g.add_argument("--bfactor", type=float, metavar="Å²",
                   help="sharpen map_sharp.mrc by this B-factor (negative sharpens; default: "
                   "fitted to the Guinier plot from 10 Å on, as --auto_bfac)")
    g.add_argument("--mtf", metavar="STAR", help="detector MTF (RELION's STAR format) to "
                   "divide the sharpened map by")
    g.add_argument("--mtf-pixel-size-A", type=float, metavar="Å",
                   help="pixel size of the micrographs the MTF's 1/pixel frequencies refer to "
                   "(default: the particles')")
    g.add_argument("--no-local-resolution", action="store_true",
                   help="skip local_resolution.mrc and map_locres_filtered.mrc")
    g.add_argument("--local-resolution-sampling-A", type=float, default=25.0, metavar="Å",
                   help="local resolution: windows this far apart, of half this radius "
                   "(default: %(default)s Å, as RELION's --locres_sampling)")


def _masks(args):
    from ..jobs.masking import MaskOptions

    return MaskOptions(mask_path=args.mask, auto_mask=args.auto_mask)


def _dynamic_mask(args):
    from ..jobs.masking import DynamicMask

    if not args.dynamic_mask:
        return None
    return DynamicMask(start_A=args.dynamic_mask_start_A, threshold=args.dynamic_mask_threshold,
                       near_A=args.dynamic_mask_near_A, far_A=args.dynamic_mask_far_A)


def _postprocess(args):
    from ..jobs.postprocess import PostprocessOptions

    return PostprocessOptions(bfactor_A2=args.bfactor, mtf_path=args.mtf,
                              mtf_pixel_size_A=args.mtf_pixel_size_A,
                              local_resolution=not args.no_local_resolution,
                              local_resolution_sampling_A=args.local_resolution_sampling_A)


def _cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--scheduler", metavar="ADDRESS",
                   help="address of a running Dask scheduler (default: embedded LocalCluster)")
    g.add_argument("--n-workers", type=int, metavar="N", help="embedded cluster: worker processes "
                   "(default: one per core)")
    g.add_argument("--threads-per-worker", type=int, default=1, metavar="N",
                   help="embedded cluster: threads per worker (default: %(default)s)")
    g.add_argument("--processes", action=argparse.BooleanOptionalAction, default=None,
                   help="embedded cluster: worker processes (--processes) or threads in this "
                   "process (--no-processes); default: threads for small jobs, whose start-up "
                   "would cost more than the GIL, else processes")
    g.add_argument("--gpu", action="store_true",
                   help="run the map tasks on GPUs with CuPy: the embedded cluster is dask-cuda's "
                   "LocalCUDACluster, one worker per GPU in CUDA_VISIBLE_DEVICES (default: all); "
                   "with --scheduler the workers must be GPU workers ('dask cuda worker'). Needs "
                   "pip install 'dask-refine[gpu]'")
    g.add_argument("--device-memory-limit", default="0.8", metavar="LIMIT",
                   help="with --gpu: device memory per worker before dask-cuda spills to host, a "
                   "fraction of the GPU or a size such as 40GB (default: %(default)s)")
    g.add_argument("--tls-ca-file", metavar="PEM",
                   help="remote tls:// scheduler: CA certificate (Dask TLS security)")
    g.add_argument("--tls-cert", metavar="PEM", help="remote tls:// scheduler: client certificate")
    g.add_argument("--tls-key", metavar="PEM", help="remote tls:// scheduler: client private key")
    g.add_argument("--dashboard", action="store_true",
                   help="serve the live refinement page in the Dask dashboard and print its URL "
                   "(a remote scheduler needs 'dask scheduler --preload dask_refine.ui.dashboard')")
    g.add_argument("--dashboard-address", default="127.0.0.1:8787", metavar="HOST:PORT",
                   help="embedded cluster with --dashboard: where the dashboard listens (default: "
                   "%(default)s; another free port if that one is taken)")


def _cluster(args) -> ClusterConfig:
    # the embedded cluster serves a dashboard only with --dashboard, which prints where (an
    # unannounced one on a random port would cost its start-up, bokeh's import, for nobody)
    return ClusterConfig(scheduler=args.scheduler, n_workers=args.n_workers, dashboard_address=None,
                         threads_per_worker=args.threads_per_worker, processes=args.processes,
                         tls_ca_file=args.tls_ca_file, tls_cert=args.tls_cert,
                         tls_key=args.tls_key, gpu=args.gpu,
                         device_memory_limit=args.device_memory_limit)


def _run_job(args, job):
    """``job(client)``; with ``--dashboard``, on a client made here whose scheduler serves the
    live page, whose URL is printed on its own line as soon as it is up."""
    if not getattr(args, "dashboard", False):
        return job(None)
    from dataclasses import replace

    from ..parallel.cluster import dask_client
    from . import dashboard

    dashboard.register()
    cluster = replace(_cluster(args), dashboard_address=args.dashboard_address)
    with dask_client(cluster) as client:
        url = dashboard.page_url(client)
        if url:
            print(url, flush=True)
        else:
            print(f"warning: the scheduler does not serve the dask-refine page (start it with "
                  f"'dask scheduler --preload dask_refine.ui.dashboard'); Dask dashboard: "
                  f"{client.dashboard_link}", file=sys.stderr, flush=True)
        return job(client)


def _simulation_args(p: argparse.ArgumentParser, n_default: int,
                     snr_default: float | None = None) -> None:
    from ..io.simulation_config import NOISE_COLORS, SimulationConfig

    d = SimulationConfig()
    p.add_argument("--n-particles", type=int, default=n_default, metavar="N",
                   help="particles to simulate (default: %(default)s)")
    p.add_argument("--snr", type=float, default=d.snr if snr_default is None else snr_default,
                   metavar="SNR",
                   help="signal-to-noise ratio (variance); inf for noise-free (default: %(default)s)")
    p.add_argument("--defocus-range-A", type=float, nargs=2, default=(d.defocus_min_A,
                   d.defocus_max_A), metavar=("MIN", "MAX"),
                   help="defocus range in Å, drawn uniformly (default: %(default)s)")
    p.add_argument("--no-ctf", action="store_true", help="simulate without a CTF")
    p.add_argument("--shift-sigma-A", type=float, default=d.shift_sigma_A, metavar="Å",
                   help="std of random origins in Å (default: %(default)s)")
    p.add_argument("--chunk-size", type=int, default=d.chunk_size, metavar="N",
                   help="particles per Zarr chunk (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, metavar="N",
                   help="random seed (default: %(default)s)")
    g = p.add_argument_group("real-data nuisances (all off by default; the truth stays under "
                             "STORE/ground_truth/)")
    g.add_argument("--junk-fraction", type=float, default=d.junk_fraction, metavar="F",
                   help="fraction of the particles that are junk, in [0, 1): half empty ice, "
                   "half projections of random blobs; recorded as ground_truth/is_junk "
                   "(default: %(default)s)")
    g.add_argument("--preferred-view-fraction", type=float, default=d.preferred_view_fraction,
                   metavar="F", help="fraction of the non-junk particles viewed near the top "
                   "view (+z), in [0, 1); the others are uniform (default: %(default)s)")
    g.add_argument("--preferred-view-spread-deg", type=float,
                   default=d.preferred_view_spread_deg, metavar="DEG",
                   help="angular spread σ of the preferred views about +z in degrees, > 0 "
                   "(von Mises-Fisher, κ = 1/σ²) (default: %(default)s)")
    g.add_argument("--noise-color", choices=NOISE_COLORS, default=d.noise_color,
                   help="noise power spectrum: white, or ice (more power at low frequency, "
                   "falling toward Nyquist), unit variance per pixel either way "
                   "(default: %(default)s)")
    g.add_argument("--envelope-bfactor-A2", type=float, default=d.envelope_bfactor_A2,
                   metavar="Å²", help="B-factor in Å² of an amplitude envelope exp(-B|k|²/4) "
                   "on the signal that the store's CTF bfactor_A2 column does not declare, ≥ 0 "
                   "(default: %(default)s)")
    g.add_argument("--defocus-error-A", type=float, default=d.defocus_error_A, metavar="SD",
                   help="file each particle's defocus off by a Gaussian error of this standard "
                   "deviation in Å (the images keep the true one, kept under ground_truth/), "
                   "as a CTF fit on thick ice would (default: %(default)s)")
    g.add_argument("--beam-tilt-mrad", type=float, nargs=2, default=d.beam_tilt_mrad,
                   metavar=("TX", "TY"), help="beam tilt in mrad, applied to every image and "
                   "written into the store as RELION's rlnBeamTiltX/Y would be "
                   "(default: none)")
    g.add_argument("--mag-matrix", type=float, nargs=4, default=d.mag_matrix,
                   metavar=("M00", "M01", "M10", "M11"), help="anisotropic magnification "
                   "matrix (RELION's rlnMagMat00…11), applied and written into the store "
                   "(default: the identity)")


def _simulation_config(args):
    """The simulation options as a :class:`SimulationConfig`; a bad value is an InputError
    naming its option."""
    from dataclasses import fields

    from ..io.simulate import SimulationConfig

    try:
        return SimulationConfig(
            n_particles=args.n_particles, snr=args.snr, defocus_min_A=args.defocus_range_A[0],
            defocus_max_A=args.defocus_range_A[1], ctf=not args.no_ctf,
            shift_sigma_A=args.shift_sigma_A, chunk_size=args.chunk_size, seed=args.seed,
            junk_fraction=args.junk_fraction, preferred_view_fraction=args.preferred_view_fraction,
            preferred_view_spread_deg=args.preferred_view_spread_deg,
            noise_color=args.noise_color, envelope_bfactor_A2=args.envelope_bfactor_A2,
            beam_tilt_mrad=tuple(args.beam_tilt_mrad), mag_matrix=tuple(args.mag_matrix),
            defocus_error_A=args.defocus_error_A)
    except InputError as exc:
        if exc.where not in {f.name for f in fields(SimulationConfig)}:
            raise
        raise InputError("--" + exc.where.replace("_", "-"), exc.message) from None


def cmd_simulate(args) -> int:
    from ..io.mrc import read_map
    from ..io.simulate import simulate_store

    config = _simulation_config(args)
    volume, pixel = read_map(args.map)
    store = simulate_store(volume, pixel, args.store, config,
                           write_poses=args.write_poses, source=args.map,
                           progress=_progress("simulating"))
    info = store.info
    print(f"simulated {info.n_particles} particles (box {info.box_size}, {info.pixel_size_A:g} Å/px,"
          f" SNR {args.snr:g}) into {args.store}")
    return 0


def _imported(store, where: str) -> int:
    """The import commands' last lines: skipped particles (if any), then the result."""
    _report_skipped(store)
    info = store.info
    print(f"imported {info.n_particles} particles (box {info.box_size}, "
          f"{info.pixel_size_A:g} Å/px) into {where}")
    return 0


def _exported(export, store_path: str, out: str) -> int:
    from ..io.store import ParticleStore

    print(f"wrote {export(ParticleStore.open(store_path), out)}")
    return 0


def cmd_import_star(args) -> int:
    from ..io.star import import_star

    return _imported(import_star(args.star, args.store, args.chunk_size, args.pixel_size_A,
                                 args.images_root, progress=_progress("importing"),
                                 skip_bad=args.skip_bad), args.store)


def cmd_export_star(args) -> int:
    from ..io.star import export_star

    return _exported(export_star, args.store, args.star)


def cmd_import_cs(args) -> int:
    from ..io.cryosparc import import_cs

    return _imported(import_cs(args.cs, args.store, args.chunk_size, args.images_root,
                               args.pixel_size_A, progress=_progress("importing"),
                               skip_bad=args.skip_bad), args.store)


def cmd_export_cs(args) -> int:
    from ..io.cryosparc import export_cs

    return _exported(export_cs, args.store, args.cs)


def cmd_expand_symmetry(args) -> int:
    from ..io.expand import expand_symmetry
    from ..io.store import ParticleStore

    expanded = expand_symmetry(ParticleStore.open(args.store), args.out, args.symmetry)
    print(f"wrote {args.out}: {expanded.info.n_particles} rows "
          f"({expanded.attrs['provenance']['copies']} per particle, images shared)")
    return 0


def cmd_reconstruct(args) -> int:
    from ..jobs.reconstruct import ReconstructConfig, run_reconstruct

    config = ReconstructConfig(store=args.store, out_dir=args.out, use_ctf=not args.no_ctf,
                               mask_diameter_A=args.mask_diameter_A, chunk_size=args.chunk_size,
                               symmetry=args.symmetry, masks=_masks(args),
                               postprocess=_postprocess(args),
                               classes=args.classes, cluster=_cluster(args))
    summary = _run_job(args, lambda client: run_reconstruct(
        config, client=client, log=lambda m: print(m, file=sys.stderr)))
    if args.classes:
        for k, c in summary["per_class"].items():
            res = f"{c['resolution_A']:.2f} Å" if "resolution_A" in c else "no map"
            print(f"class {k}: {res} from {sum(c['n_particles_per_half'])} particles")
        print(f"{summary['n_classes']} classes in {summary['time_s']:.1f} s; maps in "
              f"{args.out}/class_*/")
        return 0
    print(f"resolution {summary['resolution_A']:.2f} Å (FSC 0.143) from "
          f"{summary['n_particles']} particles in {summary['time_s']:.1f} s; "
          f"maps in {args.out}")
    return 0


def _progress_bar(future) -> None:
    """Dask's text progress bar for one iteration's tasks (on the console, when interactive)."""
    if sys.stderr.isatty():
        from distributed import progress

        progress(future)


def cmd_refine(args) -> int:
    from ..jobs.refine import RefineConfig, run_refine

    hetero = isinstance(args.initial, list)
    if hetero and len(args.initial) == 1 and (args.classes or 0) < 2:
        raise InputError("--initial", "one map for hetero-refine: give --classes K (K ≥ 2) "
                         "to start K classes from it, or one map per class")
    config = RefineConfig(
        store=args.store, initial_map=tuple(args.initial) if hetero else args.initial,
        out_dir=args.out, soft_classes=not getattr(args, "hard", False),
        cross_half_classes=not getattr(args, "own_half_classes", False),
        n_classes=getattr(args, "classes", None),
        per_class_noise=getattr(args, "per_class_noise", False),
        marginalize=not args.no_marginalize, non_uniform=args.non_uniform,
        initial_lowpass_A=args.initial_lowpass_A, max_iterations=args.max_iterations,
        mask_diameter_A=args.mask_diameter_A, max_shift_A=args.max_shift_A,
        local_search=not args.global_only, first_level_candidates=args.first_level_candidates,
        alignment_folds=args.alignment_folds, use_ctf=not args.no_ctf, symmetry=args.symmetry,
        per_particle_defocus=args.per_particle_defocus,
        per_particle_astigmatism=args.per_particle_astigmatism,
        defocus_range_A=args.defocus_range_A,
        per_group_ctf=args.per_group_ctf, ctf_refine_from_A=args.ctf_refine_from_A,
        higher_order_aberrations_from_A=args.higher_order_aberrations_from_A,
        chunk_size=args.chunk_size, resume=args.resume, masks=_masks(args),
        postprocess=_postprocess(args), dynamic_mask=_dynamic_mask(args),
        local_refinement=getattr(args, "local_refinement", False),
        prior_sigma_deg=getattr(args, "prior_sigma_deg", 5.0),
        prior_sigma_shift_A=getattr(args, "prior_sigma_shift_A", 3.0),
        focus_mask=getattr(args, "focus_mask", None),
        fulcrum_A=tuple(args.fulcrum) if getattr(args, "fulcrum", None) else None,
        relax_symmetry=getattr(args, "relax_symmetry", None),
        cluster=_cluster(args))
    summary = _run_job(args, lambda client: run_refine(
        config, client=client, log=lambda m: print(m, file=sys.stderr), progress=_progress_bar))
    state = "converged" if summary["converged"] else "stopped at the iteration limit"
    print(f"resolution {summary['resolution_A']:.2f} Å (gold-standard FSC 0.143"
          f"{', mask-corrected' if config.masks.mask_path or config.masks.auto_mask else ''}) after "
          f"{summary['iterations']} iterations ({state}) in {summary['time_s']:.0f} s; "
          f"outputs in {args.out}")
    for k, c in summary.get("classes", {}).items():
        res = f"{c['resolution_A']:.2f} Å" if c["resolution_A"] else "empty"
        print(f"class {k}: {c['n_particles']} particles, {res}, {c['map']}")
    return 0


def cmd_demo(args) -> int:
    """Simulate particles of the shipped map, refine them from the map low-passed to 30 Å
    (Homogeneous Refinement, the main job) and score the result against the truth."""
    import numpy as np

    from ..core.filters import lowpass_filter
    from ..core.fsc import fsc, resolution_at_threshold
    from ..core.rotations import angular_distance_deg, euler_to_matrix
    from ..data import demo_map_path
    from ..io.mrc import read_map, write_map
    from ..io.simulate import simulate_store
    from ..io.star import read_star
    from ..io.store import GROUND_TRUTH
    from ..jobs.refine import RefineConfig, run_refine

    simulation = _simulation_config(args)  # bad options stop before anything is written
    out = Path(args.out)
    if out.exists():
        if not (out / DEMO_MARKER).exists():
            raise InputError(out, "exists and was not made by 'dask-refine demo'; choose --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / DEMO_MARKER).write_text("made by dask-refine demo\n")
    volume, pixel = read_map(demo_map_path())
    store_path = out / "particles.zarr"
    store = simulate_store(volume, pixel, store_path, simulation,
                           source="dask_refine/data/1tii_64_2.0.mrc",
                           progress=_progress("simulating"))
    initial = out / "initial_30A.mrc"  # as an ab-initio model would start the refinement
    write_map(initial, lowpass_filter(volume, 30.0, pixel), pixel)
    print(f"simulated {args.n_particles} particles of PDB 1TII (box 64, {pixel:g} Å/px, "
          f"SNR {args.snr:g}) into {store_path}; refining from {initial}", file=sys.stderr)
    candidates = args.first_level_candidates or (DEMO_HIGH_SNR_CANDIDATES if args.snr >= 0.5
                                                 else RefineConfig.first_level_candidates)
    config = RefineConfig(store=str(store_path), initial_map=str(initial),
                          out_dir=str(out / "refine"), max_iterations=args.max_iterations,
                          first_level_candidates=candidates, cluster=_cluster(args))
    summary = _run_job(args, lambda client: run_refine(
        config, client=client, log=lambda m: print(m, file=sys.stderr)))
    refined, _ = read_map(summary["outputs"]["map"])
    _, particles = read_star(summary["outputs"]["particles"])
    rotation = euler_to_matrix(*(particles[f"rlnAngle{a}"].to_numpy(float)
                                 for a in ("Rot", "Tilt", "Psi")))
    error_deg = angular_distance_deg(rotation, store.read_column("rotation", GROUND_TRUTH))
    print(f"resolution {summary['resolution_A']:.2f} Å (gold-standard FSC 0.143) after "
          f"{summary['iterations']} iterations in {summary['time_s']:.0f} s; against the truth: "
          f"FSC 0.5 at {resolution_at_threshold(fsc(refined, volume), 64, pixel, 0.5):.2f} Å, "
          f"median pose error {float(np.median(error_deg)):.2f}° ({args.n_particles} particles)")
    width = max(map(len, summary["outputs"]))
    for key, path in summary["outputs"].items():
        print(f"  {key:{width}s} {path}")
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    print(write_report(args.dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dask-refine", description=__doc__.splitlines()[0], epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dask-refine {__version__}")
    sub = _Commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))

    p = sub.add_parser("demo", help="simulate particles of a shipped map and refine them from "
                       "the map low-passed to 30 Å (Homogeneous Refinement; about 2 minutes on "
                       "2 cores)")
    p.add_argument("--out", default="dask_refine_demo", help="output folder (default: %(default)s)")
    p.add_argument("--max-iterations", type=int, default=6, metavar="N",
                   help="refinement iterations at most (default: %(default)s)")
    p.add_argument("--first-level-candidates", type=int, metavar="N",
                   help=f"survivors of the pose search's first level (default: "
                   f"{DEMO_HIGH_SNR_CANDIDATES} from SNR 0.5 on, the refinement's default below)")
    _simulation_args(p, n_default=240, snr_default=0.5)
    _cluster_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("simulate", help="simulate particles from a map into a new store")
    p.add_argument("map", help="3D map (MRC) to project")
    p.add_argument("store", help=NEW_STORE_HELP)
    p.add_argument("--write-poses", action="store_true",
                   help="also store the true poses as the particles' poses (for reconstruct)")
    _simulation_args(p, n_default=2000)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("import-star", help="import a RELION 3.0/3.1 STAR file and its stacks")
    p.add_argument("star", help="RELION 3.0 or 3.1 particle STAR file")
    p.add_argument("store", help=NEW_STORE_HELP)
    p.add_argument("--chunk-size", type=int, default=1000, metavar="N",
                   help="particles per Zarr chunk (default: %(default)s)")
    p.add_argument("--pixel-size-A", type=float, metavar="Å",
                   help="override the STAR file's pixel size, in Å")
    p.add_argument("--images-root", help="folder the rlnImageName paths are relative to")
    p.add_argument("--skip-bad", action="store_true", help=SKIP_BAD_HELP)
    p.set_defaults(func=cmd_import_star)

    p = sub.add_parser("export-star", help="write a store's particles and poses as RELION 3.1 STAR")
    p.add_argument("store", help=STORE_HELP)
    p.add_argument("star", help="STAR file to write (images of a simulated store go to an "
                   ".mrcs beside it)")
    p.set_defaults(func=cmd_export_star)

    p = sub.add_parser("import-cs", help="import a cryoSPARC .cs particle file and its stacks")
    p.add_argument("cs", help="cryoSPARC particle file (.cs)")
    p.add_argument("store", help=NEW_STORE_HELP)
    p.add_argument("--chunk-size", type=int, default=1000, metavar="N",
                   help="particles per Zarr chunk (default: %(default)s)")
    p.add_argument("--pixel-size-A", type=float, metavar="Å",
                   help="override the .cs pixel size (blob/psize_A), in Å")
    p.add_argument("--images-root", help="folder the blob/path entries are relative to (the "
                   "cryoSPARC project folder; default: the .cs file's folder and its parents)")
    p.add_argument("--skip-bad", action="store_true", help=SKIP_BAD_HELP)
    p.set_defaults(func=cmd_import_cs)

    p = sub.add_parser("export-cs", help="write a store's particles and poses as a cryoSPARC .cs")
    p.add_argument("store", help=STORE_HELP)
    p.add_argument("cs", help=".cs file to write")
    p.set_defaults(func=cmd_export_cs)

    p = sub.add_parser("expand-symmetry", help="symmetry-expand a store's particles (RELION's "
                       "relion_particle_symmetry_expand): |G| rows per particle, one per "
                       "symmetry-related pose, the images shared with the source store")
    p.add_argument("store", help=STORE_HELP)
    p.add_argument("out", help="the new store (export it with export-star / export-cs)")
    p.add_argument("--symmetry", "--sym", required=True,
                   help="point group: Cn, Dn, T, O, I (RELION's axis conventions)")
    p.set_defaults(func=cmd_expand_symmetry)

    from ..jobs.config import RefineConfig

    d = RefineConfig(store="", initial_map="", out_dir="")
    for name in ("refine", "hetero-refine"):
        hetero = name == "hetero-refine"
        p = sub.add_parser(name, help="Heterogeneous Refinement (K classes, one initial map each)"
                           if hetero else "Homogeneous Refinement (gold-standard, branch and bound)")
        p.add_argument("store", help=STORE_HELP)
        if hetero:
            p.add_argument("--initial", required=True, nargs="+", metavar="MAP",
                           help="one initial map per class (MRC; greyscales are normalised)")
            p.add_argument("--hard", action="store_true",
                           help="hard class assignment: each particle to its most probable "
                           "class (default: soft, the joint posterior over classes and poses)")
            p.add_argument("--classes", type=int, metavar="K",
                           help="K classes from a single --initial map: the first iteration "
                           "puts each particle into a random class (RELION's random subsets)")
            p.add_argument("--per-class-noise", action="store_true",
                           help="one noise model per class (default: one shared model; "
                           "per-class models bias subtle classes toward the larger one)")
            p.add_argument("--own-half-classes", action="store_true",
                           help="judge each particle's classes on its own half set's maps "
                           "(default: on the other half's, so that no particle is classified "
                           "by a map it is part of)")
        else:
            p.add_argument("--initial", required=True, metavar="MAP", help="initial map (MRC)")
            g = p.add_argument_group("local refinement (cryoSPARC's Local Refinement, "
                                     "RELION's --sigma_ang)")
            g.add_argument("--local-refinement", action="store_true",
                           help="start from the store's poses and origins (an imported STAR/.cs "
                           "or a previous job's particles.star) and search locally under "
                           "Gaussian priors centred on them")
            g.add_argument("--prior-sigma-deg", type=float, default=d.prior_sigma_deg,
                           metavar="DEG", help="σ of the rotation prior (default: %(default)s°)")
            g.add_argument("--prior-sigma-shift-A", type=float, default=d.prior_sigma_shift_A,
                           metavar="Å", help="σ of the origin prior (default: %(default)s Å)")
            g.add_argument("--focus-mask", metavar="MRC",
                           help="mask the references with it every iteration: the particles are "
                           "aligned on the masked region (the rest of each image stays, as "
                           "structured noise; subtract it first for a small region)")
            g.add_argument("--relax-symmetry", metavar="G",
                           help="symmetry relaxation: each local search starts from the best of "
                           "the particle's poses related by G (poses from a refinement in G, "
                           "the map now in a lower group; cryoSPARC's, RELION's --relax_sym)")
            g.add_argument("--fulcrum", type=float, nargs=3, metavar=("X", "Y", "Z"),
                           help="centre of rotation of the local searches, Å from the box "
                           "centre (default: the focus mask's centre of mass)")
        p.add_argument("--out", required=True, help="output folder (also the checkpoint), or an "
                       "object-store URL (s3://…, gs://…) the outputs are uploaded to")
        p.add_argument("--initial-lowpass-A", type=float, default=d.initial_lowpass_A, metavar="Å",
                       help="low-pass the initial map to this resolution (default: %(default)s Å)")
        p.add_argument("--max-iterations", type=int, default=d.max_iterations, metavar="N",
                       help="most EM iterations (default: %(default)s)")
        p.add_argument("--mask-diameter-A", type=float, metavar="Å",
                       help="soft spherical mask diameter in Å (default: 80%% of the box)")
        p.add_argument("--max-shift-A", type=float, metavar="Å",
                       help="half-extent of the shift search in Å (default: 10%% of the box)")
        p.add_argument("--global-only", action="store_true",
                       help="global pose search in every iteration (default: local searches, "
                       "±3× the angular accuracy, once the median pose change has fallen below "
                       f"the angular sampling, after at least {d.min_global_iterations} global "
                       "iterations)")
        p.add_argument("--first-level-candidates", type=int, default=d.first_level_candidates,
                       metavar="N", help="poses a global search carries out of its first "
                       "(15°) level (default: %(default)s; 256 suffice on high-SNR data, fewer "
                       "make flips likelier at low SNR)")
        p.add_argument("--alignment-folds", type=int, default=d.alignment_folds, metavar="F",
                       help="split each half set into F folds and align each particle against "
                       "its half's map rebuilt without its fold, so that no particle is aligned "
                       "against a map that holds its own noise (default: 4, fewer where their "
                       "sums would pass 2 GiB per E-step chain, e.g. 1 at box 256; 1: the half "
                       "map itself, as RELION)")
        g = p.add_argument_group("CTF refinement (once an iteration starts at "
                                 "--ctf-refine-from-A or better)")
        g.add_argument("--per-particle-defocus", action="store_true",
                       help="refit each particle's defocus (U and V together) at its refined "
                       "pose against the current reference")
        g.add_argument("--per-particle-astigmatism", action="store_true",
                       help="with --per-particle-defocus, then also refit U and V apart "
                       "(±300 Å about the common offset; the astigmatism angle kept)")
        g.add_argument("--defocus-range-A", type=float, default=d.defocus_range_A, metavar="Å",
                       help="how far a particle's defocus may move from its file's value "
                       "(default: ±%(default)s)")
        g.add_argument("--per-group-ctf", action="store_true",
                       help="refit each optics group's beam tilt from the phases its particles "
                       "leave against the reference (RELION's CtfRefine --fit_beamtilt) and its "
                       "anisotropic magnification from the reference's gradient (--fit_aniso)")
        g.add_argument("--higher-order-aberrations-from-A", type=float,
                       default=d.higher_order_aberrations_from_A, metavar="Å",
                       help="with --per-group-ctf, also fit trefoil, C_s and tetrafoil once the "
                       "alignment band reaches this resolution, where significant "
                       "(default: %(default)s Å)")
        g.add_argument("--ctf-refine-from-A", type=float, default=d.ctf_refine_from_A,
                       metavar="Å", help="start CTF refinement once the resolution reaches "
                       "this (default: %(default)s Å)")
        p.add_argument("--no-marginalize", action="store_true",
                       help="backproject each particle at its best pose only (default: over "
                       "its significant poses with their posterior weights, as RELION)")
        g = p.add_argument_group("dynamic mask (cryoSPARC's)")
        g.add_argument("--dynamic-mask", action="store_true",
                       help="mask the references with a solvent mask rebuilt from each "
                       "iteration's map once the resolution reaches --dynamic-mask-start-A "
                       "(and use it for a solvent-corrected FSC)")
        for flag, default, text in (("start-A", 12.0, "resolution to start at (Å)"),
                                    ("threshold", 0.2, "threshold × the map's maximum"),
                                    ("near-A", 6.0, "dilation of the thresholded region (Å)"),
                                    ("far-A", 14.0, "where the soft edge reaches 0 (Å)")):
            g.add_argument(f"--dynamic-mask-{flag}", type=float, default=default,
                           help=f"{text} (default: %(default)s)")
        p.add_argument("--non-uniform", action="store_true",
                       help="Non-Uniform Refinement: adaptive local filtering of the references "
                       "by cross-validation between half maps; also writes map_nu.mrc and "
                       "nu_cutoff_resolution.mrc")
        p.add_argument("--symmetry", "--sym", default=d.symmetry,
                       help="point group: C1, Cn, Dn, T, O, I (= I2), I1–I4, RELION's axis "
                       "conventions (default: %(default)s)")
        p.add_argument("--no-ctf", action="store_true", help="ignore the CTF")
        p.add_argument("--chunk-size", type=int, metavar="N",
                       help="particles per task (default: the store's chunks)")
        p.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its last finished iteration")
        _mask_args(p)
        _cluster_args(p)
        p.set_defaults(func=cmd_refine)

    p = sub.add_parser("reconstruct", help="Reconstruction Only: half maps, FSC, full map")
    p.add_argument("store", help=STORE_HELP)
    p.add_argument("--out", required=True, help="output folder, or an object-store URL "
                       "(s3://…, gs://…) the outputs are uploaded to")
    p.add_argument("--no-ctf", action="store_true", help="ignore the CTF")
    p.add_argument("--mask-diameter-A", type=float, metavar="Å",
                   help="soft spherical mask diameter for the FSC, in Å (default: no mask)")
    p.add_argument("--classes", metavar="labels|FILE.npy",
                   help="heterogeneous reconstruction: 'labels' backprojects by the store's "
                   "class labels (rlnClassNumber); FILE.npy holds (N, K) class probabilities "
                   "for soft, weighted backprojection. Maps go to OUT/class_NNN/")
    p.add_argument("--symmetry", "--sym", default="C1",
                   help="point group: C1, Cn, Dn, T, O, I (= I2), I1–I4, RELION's axis conventions "
                   "(default: %(default)s)")
    p.add_argument("--chunk-size", type=int, metavar="N",
                   help="particles per task (default: the store's chunks)")
    _mask_args(p)
    _cluster_args(p)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("report", help="one self-contained HTML page of a job's results "
                       "(DIR/report.html: key figures, plots, iterations, classes, outputs)")
    p.add_argument("dir", metavar="DIR", help="a job's output folder (with summary.json), or "
                   "its object-store URL (the page is uploaded there)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (InputError, GPUUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
