"""Heterogeneous and Non-Uniform Refinement benchmarks (issue 4).

* ``--case hetero``: a two-class mixture simulated from the 1TII map and the same map with a
  domain removed (x > centre + 3 px). dask_refine ``hetero-refine`` (K = 2, hard) side by side
  with RELION 3.1 Class3D (K = 2, same particles via STAR, same two initial maps, each program
  low-passing them to 30 Å). Prints classification accuracy (best matching of labels), per-class
  FSC-to-truth resolution, iterations and wall time.
* ``--case nu``: half the particles carry a domain shifted by 2 px (flexible). dask_refine
  Homogeneous vs Non-Uniform Refinement: FSC to the consensus (the average of the two states) of
  ``map.mrc`` and of ``map_nu.mrc``.
* ``--case conformational``: a subtle two-state mixture, two conformations of one protein (a
  domain closes by a hinge), 3,000 particles (1,500 per state), SNR 0.05, CTF on, origins within
  ±4 Å (σ 2 Å, as ``refine.py --low-snr``); ``hetero-refine`` (K = 2, soft classes, the
  default; ``--compare-hard`` adds a ``--hard`` run) from both true states low-passed to 30 Å.
  State 1 is the map of ``--map`` (default the shipped 1TII map); state 2 moves one domain of
  it rigidly (:func:`conformational_state`):

  - the density's centre of mass and principal axes come from its inertia tensor (the
    voxels carrying 95% of the mass); the plane cutting off the domain is perpendicular to the
    longest axis (least moment of inertia), on the side of the longer tail (positive third
    moment), placed so that the domain holds ``--domain-fraction`` (0.35) of the mass;
  - the domain mask is a sigmoid of the signed distance to that plane (10–90% over
    ``--mask-edge-px``, 3 px) times a soft density mask (the voxels carrying 99% of the mass,
    dilated by 2 px, with a raised-cosine edge of ``--mask-edge-px``);
  - the hinge axis lies in the plane, through the plane's point nearest the centre of mass,
    along the shortest principal axis (made perpendicular to the normal); the domain turns by
    ``--hinge-deg`` (8°) about it in the sense that brings the domain's centre of mass nearer
    the rest's (it closes onto the rest), then moves by ``--domain-shift-A`` (0 Å) along that
    same closing direction; ``scipy.ndimage.affine_transform`` (order 3) moves the masked
    domain and ``state2 = (1 − mask)·map + moved(mask·map)``.

  The plane is thus perpendicular to the longest axis through the centre of mass, shifted along
  it as far as that share of the mass needs (1.1 Å on 1tii_64_2.0, 13.2 Å on 7pbl_64_2.4;
  reported as ``plane_offset_from_com_A``). The work folder
  gets ``map_a.mrc``, ``map_b.mrc``, ``domain_mask.mrc`` and ``domain_region.mrc`` (the mask
  before and after the motion); the table and JSON report how subtle the difference is: the
  RMS displacement of the domain's density-weighted voxels in Å, and the FSC between the two
  states, of the whole maps (the unmoved ~65% of the mass keeps it above 0.5 to Nyquist, so its
  minimum is given) and inside the domain's region (its 0.5 and 0.143 crossings). At the
  default 8° the RMS displacement is 3.7 Å on 1tii_64_2.0 and 4.3 Å on 7pbl_64_2.4, the
  region's FSC 0.5 crossing 11.0 Å and 12.2 Å. Then, per run, the accuracy under the better
  label matching, the accuracy within each state, class sizes (hard, and soft: the summed class
  posteriors), each class's FSC-to-truth 0.5 crossing, iterations and wall time. RELION
  Class3D runs as in ``--case hetero`` where ``relion_refine_mpi`` is installed (unless
  ``--skip-relion``).

    python benchmarks/hetero.py --case hetero --n 1000 --relion-timeout-min 15
    python benchmarks/hetero.py --case nu --n 1000
    python benchmarks/hetero.py --case conformational --compare-hard --skip-relion
    python benchmarks/hetero.py --case conformational --map ../shared/data/7pbl_64_2.4.mrc
    python benchmarks/hetero.py --case conformational --n 300 --max-iterations 1 --skip-relion

Results: a table on stdout and ``benchmarks/results/hetero_<case>.json``.
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
sys.path.insert(0, str(HERE))
from peers import relion_label, relion_program  # noqa: E402
from refine import fsc_truth, run_ours  # noqa: E402  (the homogeneous benchmark's helpers)

MAP = HERE.parent / "dask_refine" / "data" / "1tii_64_2.0.mrc"


def mixture(work: Path, n: int, snr: float, second, map_path=MAP, **simulation):
    """Store of ``n`` particles: first half from the map at ``map_path``, second half from
    ``second(map)``; ``simulation``: further :class:`SimulationConfig` fields."""
    from dask_refine.io.mrc import read_map, write_map
    from dask_refine.io.simulate import SimulationConfig, resimulate_rows, simulate_store

    a, px = read_map(map_path)
    b = second(a)
    store = simulate_store(a, px, work / "particles.zarr",
                           SimulationConfig(n_particles=n, snr=snr, chunk_size=250, seed=7,
                                            **simulation), source=str(map_path))
    resimulate_rows(work / "particles.zarr", b, slice(n // 2, n), seed=8)
    write_map(work / "map_a.mrc", a, px)
    write_map(work / "map_b.mrc", b, px)
    labels = np.r_[np.zeros(n // 2, int), np.ones(n - n // 2, int)]
    return store, a, b, px, labels


def accuracy(assigned, labels) -> float:
    """Fraction right under the better of the two label matchings."""
    same = float(np.mean(assigned == labels))
    return max(same, 1.0 - same)


def classification(assigned, labels, n_classes: int = 2) -> dict:
    """Accuracy under the better label matching (``match[k]``: the state class k stands for),
    the accuracy within each state and the class sizes."""
    assigned, labels = np.asarray(assigned, int), np.asarray(labels, int)
    match = [0, 1] if np.mean(assigned == labels) >= 0.5 else [1, 0]
    as_state = np.asarray(match)[assigned]
    return {"accuracy": float(np.mean(as_state == labels)),
            "per_state_accuracy": [float(np.mean(as_state[labels == s] == s))
                                   for s in range(n_classes)],
            "class_to_state": [m + 1 for m in match],
            "class_sizes": np.bincount(assigned, minlength=n_classes).tolist()}


def oracle_classification(store, maps, px: float, labels, batch: int = 250) -> dict:
    """What the data allow: each particle assigned to the state whose *true* map, at the
    particle's *true* pose, shift, scale and CTF, explains it better under the simulation's own
    noise model (white, unit variance per pixel) — the Bayes classifier with equal priors,
    which no refinement can beat on average. Same report as :func:`classification`."""
    from dask_refine.core.backprojection import particle_ctfs
    from dask_refine.core.fourier import centred_rfftn, rfft_multiplicity, translate_rfft
    from dask_refine.core.projection import extract_central_slices_rfft, prepare_reference_rfft
    from dask_refine.io.store import CTF_COLUMNS, GROUND_TRUTH

    box = store.info.box_size
    sigma = float(store.attrs["provenance"]["noise_sigma"])
    refs = [prepare_reference_rfft(np.asarray(m, np.float32)) for m in maps]
    meta = store.metadata(list(CTF_COLUMNS))
    truth = {k: store.read_column(k, group=GROUND_TRUTH) for k in ("rotation", "shift_A",
                                                                   "scale")}
    mult = rfft_multiplicity(box, 2)
    n = labels.size
    errors = np.zeros((n, len(maps)))
    for start in range(0, n, batch):
        rows = np.arange(start, min(start + batch, n))
        images = np.asarray(store.images.get_orthogonal_selection((rows, slice(None),
                                                                    slice(None))))
        x = translate_rfft(centred_rfftn(images, 2), truth["shift_A"][rows] / px)
        ctf = particle_ctfs({k: v[rows] for k, v in meta.items()}, box, px)
        weight = (truth["scale"][rows] / sigma).reshape(-1, 1, 1) * ctf
        for k, ref in enumerate(refs):
            model = weight * extract_central_slices_rfft(ref, truth["rotation"][rows], box)
            errors[rows, k] = (mult * np.abs(x - model) ** 2).sum(axis=(1, 2))
    return classification(np.argmin(errors, axis=1), labels)


def pose_marginalised_oracle(store, maps, px: float, labels, level: int = 6,
                             band_px: float | None = None, sample: int = 400) -> dict:
    """The Bayes classifier with the *true* maps but poses *unknown*: each particle's evidence
    for a state is ``log Σ_j exp(−E_j/2)`` over the poses the engine's local search keeps
    around its true pose (grid ``level``, origins ±1 px, the jobs' posterior window), under the
    noise measured from the residuals at the truth. A refinement never knows the poses, and
    a subtle state difference can partly be fitted by a slightly different pose, so this, not
    :func:`oracle_classification`, is what classification can reach; computed on ``sample``
    particles, half from each state. ``band_px``: alignment band (default 0.375 × box)."""
    from dask_refine.core.backprojection import FourierSums, particle_ctfs
    from dask_refine.core.fourier import centred_rfftn, rfft_multiplicity, translate_rfft
    from dask_refine.core.noise import image_shells, noise_weights
    from dask_refine.core.pose_search import SearchParams, amplitude_envelope
    from dask_refine.core.projection import extract_central_slices_rfft, prepare_reference_rfft
    from dask_refine.core.refine_step import EStepOptions, refine_particles
    from dask_refine.io.store import CTF_COLUMNS, GROUND_TRUTH

    box = store.info.box_size
    band = band_px or 0.375 * box
    rows = np.r_[np.flatnonzero(labels == 0)[:sample // 2],
                 np.flatnonzero(labels == 1)[:sample // 2]]
    refs = [prepare_reference_rfft(np.asarray(m, np.float32)) for m in maps]
    meta = {k: v[rows] for k, v in store.metadata(list(CTF_COLUMNS)).items()}
    truth = {k: store.read_column(k, group=GROUND_TRUTH)[rows]
             for k in ("rotation", "shift_A", "scale")}
    images = np.asarray(store.images.get_orthogonal_selection((rows, slice(None), slice(None))))
    x = translate_rfft(centred_rfftn(images, 2), truth["shift_A"] / px)
    model = (particle_ctfs(meta, box, px) * truth["scale"].reshape(-1, 1, 1)
             * extract_central_slices_rfft(refs[0], truth["rotation"], box))
    state_a = labels[rows] == 0  # the noise from residuals against each particle's own truth
    shells = image_shells(box)
    mult = np.broadcast_to(rfft_multiplicity(box, 2), shells.shape)
    power = (np.abs(x[state_a] - model[state_a]) ** 2 * mult).sum(axis=0)
    sigma2 = np.bincount(shells.ravel(), power.ravel()) / (
        state_a.sum() * np.bincount(shells.ravel(), mult.ravel()))
    params = SearchParams(r_align=band, particle_radius_px=0.4 * box, first_level=level - 1,
                          last_level=level, max_shift_px=1.0, local=True, local_level=level - 1,
                          posterior_window=float(2.0 * np.log(1e4)))
    envelopes = [amplitude_envelope(r, box) for r in refs]
    step = refine_particles(
        FourierSums.zeros(4, box), images,
        {**meta, "scale": truth["scale"], "origin_px": truth["shift_A"] / px,
         "rotation": truth["rotation"]}, np.zeros(rows.size, int),
        [refs[0], refs[0], refs[1], refs[1]], [envelopes[0]] * 2 + [envelopes[1]] * 2,
        noise_weights(sigma2, box), params, px, band,
        options=EStepOptions(n_classes=2, soft_classes=True, cross_half_classes=False))
    out = classification(step.class_id, labels[rows])
    out.update(level=level, band_px=band, particles=int(rows.size))
    return out


def estimated_map_ceiling(store, px: float, labels, folds: int = 2,
                          mask_diameter_fraction: float = 0.8) -> dict:
    """What maps *estimated from these particles* allow: each state's map reconstructed from
    the particles' true poses and true states (CTF, scales, Wiener filter from its half maps'
    FSC, the jobs' soft spherical mask), leaving out the particle's own fold (``folds`` = 2:
    the other half set, as the jobs judge classes), and each particle assigned to the state
    whose map, at its true pose, explains it better under the noise measured from the
    residuals. The :func:`oracle_classification` uses the noise-free truths; a refinement's
    maps carry the reconstruction noise of a few hundred particles per state, so this is the
    ceiling a refinement can approach. Same report as :func:`classification`."""
    from dask_refine.core.backprojection import FourierSums, backproject_particles, particle_ctfs
    from dask_refine.core.fourier import centred_rfftn, rfft_multiplicity, translate_rfft
    from dask_refine.core.fsc import fsc, ssnr_from_fsc
    from dask_refine.core.masks import soft_sphere_mask
    from dask_refine.core.noise import image_shells
    from dask_refine.core.projection import extract_central_slices_rfft, prepare_reference_rfft
    from dask_refine.core.reconstruction import reconstruct
    from dask_refine.io.store import CTF_COLUMNS, GROUND_TRUTH

    box, n = store.info.box_size, labels.size
    meta = store.metadata(list(CTF_COLUMNS) + ["half_set"])
    truth = {k: store.read_column(k, group=GROUND_TRUTH) for k in ("rotation", "shift_A",
                                                                   "scale")}
    images = np.asarray(store.images[:], np.float32)
    fold = meta["half_set"].astype(int) * (folds // 2) + np.arange(n) % (folds // 2)
    mask = soft_sphere_mask(box, 0.5 * mask_diameter_fraction * box,
                            soft_edge_px=max(3.0, 0.05 * box))
    columns = {**{k: meta[k] for k in CTF_COLUMNS}, "rotation": truth["rotation"],
               "shift_A": truth["shift_A"], "scale": truth["scale"]}
    x = translate_rfft(centred_rfftn(images, 2), truth["shift_A"] / px)
    c = particle_ctfs(meta, box, px) * truth["scale"].reshape(-1, 1, 1)
    residual = np.zeros((n, 2, box, box // 2 + 1), np.float32)
    for state in (0, 1):
        sums = FourierSums.zeros(folds, box)
        member = (labels == state).astype(float)[:, None]
        backproject_particles(sums, images, {**columns, "class_weight": member}, fold, px)
        per_half = folds // 2  # folds 0 … F/2 − 1 are half set A's
        half = [reconstruct(sums.data[h * per_half:(h + 1) * per_half].sum(0),
                            sums.weight[h * per_half:(h + 1) * per_half].sum(0), box)
                for h in (0, 1)]
        # the Wiener filter of a map from (folds − 1)/folds of the particles
        ssnr = ssnr_from_fsc(fsc(half[0] * mask, half[1] * mask)) * 2 * (folds - 1) / folds
        for f in range(folds):
            others = [g for g in range(folds) if g != f]
            ref = prepare_reference_rfft((reconstruct(sums.data[others].sum(0),
                                                      sums.weight[others].sum(0), box,
                                                      ssnr=ssnr) * mask).astype(np.float32))
            rows = np.flatnonzero(fold == f)
            model = c[rows] * extract_central_slices_rfft(ref, truth["rotation"][rows], box)
            residual[rows, state] = np.abs(x[rows] - model) ** 2
    shells = image_shells(box)
    mult = np.broadcast_to(rfft_multiplicity(box, 2), shells.shape)
    own = residual[np.arange(n), labels] * mult
    sigma2 = np.bincount(shells.ravel(), own.sum(0).ravel()) / (
        n * np.bincount(shells.ravel(), mult.ravel()))
    errors = np.einsum("nkij,ij->nk", residual, mult / sigma2[shells])
    return classification(np.argmin(errors, axis=1), labels)


def relion_class3d(star: Path, refs, out: Path, px: float, box: int, timeout_s: float,
                   relion_bin: str | None = None):
    """RELION Class3D, K = len(refs), 3 MPI ranks × 1 thread; stopped after ``timeout_s``;
    RELION from ``relion_bin`` or ``PATH`` (:func:`peers.relion_program`)."""
    import os
    import signal

    import starfile
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    refs_star = out / "references.star"
    starfile.write({"": pd.DataFrame({"rlnReferenceImage": [str(Path(r).resolve())
                                                           for r in refs]})}, refs_star)
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "3",
           relion_program("relion_refine_mpi", relion_bin),
           "--i", star.name, "--o", str(out.resolve() / "run"), "--ref", str(refs_star),
           "--ini_high", "30", "--ctf", "--particle_diameter", f"{0.8 * box * px:.1f}",
           "--flatten_solvent", "--zero_mask", "--oversampling", "1", "--healpix_order", "2",
           "--offset_range", "5", "--offset_step", "2", "--sym", "C1", "--norm", "--scale",
           "--iter", "25", "--tau2_fudge", "4", "--pad", "2", "--pool", "30", "--j", "1",
           "--firstiter_cc", "--dont_combine_weights_via_disc"]
    t0 = time.perf_counter()
    with open(out / "stdout.txt", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=star.parent,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
            finished = proc.returncode == 0
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            finished = False
    wall = time.perf_counter() - t0
    data = sorted(out.glob("run_it*_data.star"))
    if not data:
        return {"error": (out / "stdout.txt").read_text()[-1500:], "wall_s": wall}
    last = data[-1]
    it = last.name.split("_")[1]
    parts = starfile.read(last, always_dict=True)["particles"]
    return {"wall_s": wall, "finished": finished, "iterations": int(it[2:]),
            "class_number": parts["rlnClassNumber"].to_numpy() - 1,
            "maps": [str(out / f"run_{it}_class{k:03d}.mrc") for k in (1, 2)],
            "command": " ".join(cmd)}


def relion_row(args, store, work: Path, a, b, px, labels):
    """RELION 3.1 Class3D on the store from ``map_a.mrc`` and ``map_b.mrc`` (None with
    ``--skip-relion`` or without ``relion_refine_mpi``): accuracy, per-state accuracy, each
    truth's FSC against its better class map."""
    if args.skip_relion:
        return None
    if not (relion_program("relion_refine_mpi", args.relion_bin) and shutil.which("mpirun")):
        print("relion_refine_mpi/mpirun not found: run benchmarks/install_peers.sh; "
              "skipping RELION")
        return None
    from dask_refine.io.star import export_star

    star = work / "relion_in" / "particles.star"
    export_star(store, star)
    rel = relion_class3d(star, [work / "map_a.mrc", work / "map_b.mrc"], work / "relion",
                         px, a.shape[0], 60 * args.relion_timeout_min, args.relion_bin)
    if "class_number" in rel:
        cls = rel.pop("class_number")
        rel.update(classification(cls, labels))
        # RELION's class order is its own: score each truth against its better map
        fscs = [[fsc_truth(m, t, px) for m in rel["maps"]] for t in (a, b)]
        rel["class_fsc_truth_05_A"] = [min(f) for f in fscs]
    return rel


def case_hetero(args, work: Path) -> dict:
    import starfile

    from dask_refine.jobs.refine import RefineConfig, run_refine

    def remove_domain(m):
        out = m.copy()
        out[:, :, m.shape[0] // 2 + 3:] = 0.0
        return out

    store, a, b, px, labels = mixture(work, args.n, args.snr, remove_domain)
    box = a.shape[0]
    rows = {}
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        t0 = time.perf_counter()
        summary = run_refine(RefineConfig(
            store=str(work / "particles.zarr"), out_dir=str(work / "ours"),
            initial_map=(str(work / "map_a.mrc"), str(work / "map_b.mrc")),
            max_iterations=args.max_iterations), client=client, log=print)
        wall = time.perf_counter() - t0
    assigned = starfile.read(work / "ours" / "particles.star",
                             always_dict=True)["particles"]["rlnClassNumber"].to_numpy() - 1
    rows["dask_refine hetero-refine"] = {
        "accuracy": accuracy(assigned, labels), "iterations": summary["iterations"],
        "wall_s": wall, "class_fsc_truth_05_A": [
            fsc_truth(work / "ours" / f"class_{k:03d}" / "map.mrc", t, px)
            for k, t in ((1, a), (2, b))]}
    rel = relion_row(args, store, work, a, b, px, labels)
    if rel is not None:
        rows[f"{relion_label(args.relion_bin)} Class3D"] = rel
    print(f"\nHeterogeneous: 2 classes, box {box}, {args.n} particles, SNR {args.snr:g}, "
          f"{args.workers} cores")
    print_classes(rows, per_state=False)
    return rows


def print_classes(rows: dict, per_state: bool) -> None:
    """The table of a classification case: accuracy (per state and class sizes with
    ``per_state``), each class map's FSC-to-truth, iterations and wall time of every row."""
    state_head = f"{'state 1':>7s} {'state 2':>7s} {'sizes':>11s} " if per_state else ""
    print(f"{'method':34s} {'accuracy':>8s} {state_head}{'class 1 Å':>9s} {'class 2 Å':>9s} "
          f"{'iters':>5s} {'wall s':>7s}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:34s} failed: {r['error'][-200:]}")
            continue
        states = ""
        if per_state:
            s1, s2 = r["per_state_accuracy"]
            sizes = "/".join(str(c) for c in r["class_sizes"])
            states = f"{s1:7.3f} {s2:7.3f} {sizes:>11s} "
        c1, c2 = r["class_fsc_truth_05_A"]
        print(f"{name:34s} {r['accuracy']:8.3f} {states}{c1:9.2f} {c2:9.2f} "
              f"{r['iterations']:5d} {r['wall_s']:7.0f}"
              + ("" if r.get("finished", True) else "  (stopped)"))


def _mass_threshold(density, fraction: float) -> float:
    """The density value above which the voxels carry ``fraction`` of the (positive) mass."""
    values = np.sort(np.clip(density, 0, None).ravel())[::-1]
    mass = np.cumsum(values)
    return float(values[min(np.searchsorted(mass, fraction * mass[-1]), values.size - 1)])


def principal_axes(density):
    """Centre of mass ``(3,)`` and principal axes ``(3, 3)`` (columns, longest first: the
    inertia tensor's axes from least to largest moment) of a non-negative density, in voxel
    index coordinates (z, y, x), with the spreads (variances, px²) along them."""
    grid = np.indices(density.shape).reshape(3, -1).T.astype(np.float64)
    w = density.ravel().astype(np.float64)
    w = w / w.sum()
    com = w @ grid
    d = grid - com
    covariance = (d * w[:, None]).T @ d  # the inertia tensor is trace(C)·I − C: same axes
    spreads, axes = np.linalg.eigh(covariance)
    order = np.argsort(spreads)[::-1]
    return com, spreads[order], axes[:, order]


def rotation_about(axis, angle_deg: float) -> np.ndarray:
    """Rotation matrix by ``angle_deg`` about ``axis`` (Rodrigues, :mod:`oracle`)."""
    from oracle import _rotvec_matrix

    u = np.asarray(axis, np.float64) / np.linalg.norm(axis)
    return _rotvec_matrix(np.deg2rad(angle_deg) * u)


def conformational_state(volume, px: float, hinge_deg: float = 8.0, shift_A: float = 0.0,
                         domain_fraction: float = 0.35, edge_px: float = 3.0,
                         dilate_px: int = 2):
    """The second conformation of ``volume``: one domain turned about a hinge (see the module
    docstring). Returns ``(state2, mask, info)``: the moved map, the soft domain mask and the
    geometry and displacement figures (Å); ``info["region"]`` (popped by callers that save it)
    is the domain's mask before and after the motion, ``max(mask, moved(mask))``."""
    from scipy import ndimage
    from scipy.special import expit

    v = np.asarray(volume, np.float64)
    positive = np.clip(v, 0, None)
    core = np.where(positive >= _mass_threshold(positive, 0.95), positive, 0.0)
    com, spreads, axes = principal_axes(core)
    grid = np.indices(v.shape).reshape(3, -1).T.astype(np.float64)
    normal = axes[:, 0]
    s = (grid - com) @ normal
    w = core.ravel()
    if np.sum(w * s ** 3) < 0:  # the domain on the side of the longer tail
        normal, s = -normal, -s
    order = np.argsort(s)
    cum = np.cumsum(w[order]) / w.sum()
    offset = float(s[order][np.searchsorted(cum, 1.0 - domain_fraction)])
    plane = expit((s - offset) / (edge_px / (2 * np.log(9)))).reshape(v.shape)  # 10–90%: edge
    envelope = ndimage.binary_dilation(positive > _mass_threshold(positive, 0.99),
                                       iterations=dilate_px)
    outside = ndimage.distance_transform_edt(~envelope)
    envelope = np.where(outside < edge_px, 0.5 * (1 + np.cos(np.pi * outside / edge_px)), 0.0)
    mask = plane * envelope
    pivot = com + offset * normal  # the plane's point nearest the centre of mass
    hinge = axes[:, 2] - (axes[:, 2] @ normal) * normal
    hinge /= np.linalg.norm(hinge)
    m = mask.ravel() * w
    com_domain = (m @ grid) / m.sum()
    rest = (1 - mask.ravel()) * w
    com_rest = (rest @ grid) / rest.sum()
    closing = np.cross(hinge, normal)  # where a positive turn about the hinge takes the domain
    if closing @ (com_rest - pivot) < 0:
        hinge, closing = -hinge, -closing
    rot = rotation_about(hinge, hinge_deg)
    shift_px = (shift_A / px) * closing
    # y = R (x − pivot) + pivot + shift: affine_transform samples the input at R⁻¹ (y − …)
    motion = {"matrix": rot.T, "offset": pivot - rot.T @ (pivot + shift_px), "order": 3,
              "mode": "constant", "cval": 0.0}
    moved = ndimage.affine_transform(mask * v, **motion)
    region = np.maximum(mask, np.clip(ndimage.affine_transform(mask, **motion), 0, 1))
    state2 = (1 - mask) * v + moved
    displacement = (grid - pivot) @ (rot - np.eye(3)).T + shift_px
    weight = mask.ravel() * positive.ravel()
    rms = float(np.sqrt(np.sum(weight * (displacement ** 2).sum(1)) / weight.sum())) * px
    moved_com = rot @ (com_domain - pivot) + pivot + shift_px
    info = {
        "hinge_deg": hinge_deg, "domain_shift_A": shift_A,
        "domain_mass_fraction": float(np.sum(mask * positive) / positive.sum()),
        "plane_offset_from_com_A": offset * px,
        "principal_spreads_A": (np.sqrt(spreads) * px).tolist(),
        "normal_zyx": normal.tolist(), "hinge_axis_zyx": hinge.tolist(),
        "pivot_zyx_px": pivot.tolist(),
        "domain_com_to_hinge_A": float(np.linalg.norm(com_domain - pivot)) * px,
        "rms_displacement_A": rms,
        "max_displacement_A": float(np.sqrt((displacement ** 2).sum(1)[weight > 0].max())) * px,
        "domain_com_displacement_A": float(np.linalg.norm(moved_com - com_domain)) * px,
        "domain_to_rest_com_change_A": float(np.linalg.norm(moved_com - com_rest)
                                             - np.linalg.norm(com_domain - com_rest)) * px,
        "relative_difference": float(np.linalg.norm(state2 - v) / np.linalg.norm(v)),
        "region": region.astype(np.float32),
    }
    return state2.astype(np.float32), mask.astype(np.float32), info


def state_difference(a, b, px: float, region=None) -> dict:
    """How alike two states are: the FSC between the whole maps and (with ``region``) between
    the maps inside the domain's region, each curve's 0.5 and 0.143 crossings in Å (None: it
    never falls below, the whole map's case where the unmoved part alone keeps it above) and
    its minimum over the shells past the first."""
    from dask_refine.core.fsc import fsc, resolution_at_threshold

    box = a.shape[0]
    out = {}
    pairs = [("fsc_between_states", a, b)]
    if region is not None:
        pairs.append(("fsc_between_domains", a * region, b * region))
    for name, x, y in pairs:
        curve = fsc(x, y)
        for label, threshold in (("05", 0.5), ("0143", 0.143)):
            below = bool(np.any(curve[1:] < threshold))
            out[f"{name}_{label}_A"] = (resolution_at_threshold(curve, box, px, threshold)
                                        if below else None)
        out[f"{name}_min"] = float(curve[1:].min())
        out[name] = curve.tolist()
    return out


def _crossing(value) -> str:
    return "never (beyond Nyquist)" if value is None else f"{value:.2f} Å"


def describe_motion(m: dict) -> str:
    """One paragraph: how the second state differs from the first."""
    return (f"state 2: a domain of {100 * m['domain_mass_fraction']:.0f}% of the mass turned "
            f"{m['hinge_deg']:g}° about its hinge (+ {m['domain_shift_A']:g} Å): RMS "
            f"displacement {m['rms_displacement_A']:.2f} Å (max {m['max_displacement_A']:.2f} "
            f"Å, centre of mass {m['domain_com_displacement_A']:.2f} Å); FSC between states "
            f"0.5 {_crossing(m['fsc_between_states_05_A'])} (min "
            f"{m['fsc_between_states_min']:.2f}), 0.143 "
            f"{_crossing(m['fsc_between_states_0143_A'])}; inside the domain's region 0.5 "
            f"{_crossing(m.get('fsc_between_domains_05_A'))}, 0.143 "
            f"{_crossing(m.get('fsc_between_domains_0143_A'))}")


def case_conformational(args, work: Path):
    from dask_refine.io.mrc import read_map, write_map

    truth, px = read_map(args.map)
    b, mask, motion = conformational_state(truth, px, args.hinge_deg, args.domain_shift_A,
                                           args.domain_fraction, args.mask_edge_px)
    region = motion.pop("region")
    motion.update(state_difference(truth, b, px, region))
    write_map(work / "domain_mask.mrc", mask, px)
    write_map(work / "domain_region.mrc", region, px)
    print(describe_motion(motion))
    store, a, b, px, labels = mixture(work, args.n, args.snr, lambda _: b, args.map,
                                      shift_sigma_A=2.0)  # origins within ±4 Å (refine.py)
    box = a.shape[0]
    rows = {}
    import csv

    import starfile

    chosen = ({} if args.alignment_folds is None
              else {"alignment_folds": args.alignment_folds})
    variants = [] if args.ceilings_only else [("dask_refine hetero-refine", "ours", chosen)]
    if args.compare_hard and not args.ceilings_only:
        variants.append(("dask_refine hetero-refine --hard", "ours_hard",
                         {**chosen, "soft_classes": False}))
    for name, folder, options in variants:
        out = work / folder
        summary = run_ours(work / "particles.zarr", [work / "map_a.mrc", work / "map_b.mrc"],
                           out, args.workers, args.max_iterations, **options)
        assigned = starfile.read(out / "particles.star", always_dict=True)[
            "particles"]["rlnClassNumber"].to_numpy() - 1
        row = classification(assigned, labels)
        with np.load(out / "iterations" / f"iter_{summary['iterations']:03d}"
                     / "poses.npz") as arrays:
            weight = arrays["class_weight"]  # (N, 2) posterior over classes
        state_of = np.asarray(row["class_to_state"]) - 1
        right = weight[np.arange(labels.size), np.argsort(state_of)[labels]]
        with open(out / "iterations.csv") as f:
            per_it = list(csv.DictReader(f))
        row.update({
            "soft_class_sizes": weight.sum(0).tolist(),
            "mean_posterior_right_class_per_state": [float(right[labels == s].mean())
                                                     for s in (0, 1)],
            # each class map against the truth of the state it stands for
            "class_fsc_truth_05_A": [fsc_truth(out / f"class_{k + 1:03d}" / "map.mrc",
                                               (a, b)[state_of[k]], px) for k in (0, 1)],
            "class_gold_standard_A": [c["resolution_A"] for c in summary["classes"].values()],
            "iterations": summary["iterations"], "converged": summary["converged"],
            "wall_s": summary["wall_s"],
            "class_sizes_by_iteration": [[int(float(r[f"class_{k}_particles"]))
                                          for k in (1, 2)] for r in per_it]})
        rows[name] = row
    rel = None if args.ceilings_only else relion_row(args, store, work, a, b, px, labels)
    if rel is not None:
        rows[f"{relion_label(args.relion_bin)} Class3D"] = rel
    oracle = oracle_classification(store, (a, b), px, labels)
    ceiling = estimated_map_ceiling(store, px, labels)
    marginal = pose_marginalised_oracle(store, (a, b), px, labels)
    print(f"\nConformational mixture ({Path(args.map).name}): 2 states, box {box}, {args.n} "
          f"particles, SNR {args.snr:g}, {args.workers} cores")
    print(describe_motion(motion))
    print_classes(rows, per_state=True)
    s1, s2 = oracle["per_state_accuracy"]
    print(f"{'oracle (true maps and poses)':34s} {oracle['accuracy']:8.3f} {s1:7.3f} {s2:7.3f} "
          f"{'/'.join(str(c) for c in oracle['class_sizes']):>11s}")
    s1, s2 = ceiling["per_state_accuracy"]
    print(f"{'maps from the other half, true poses':34s} {ceiling['accuracy']:8.3f} {s1:7.3f} "
          f"{s2:7.3f} {'/'.join(str(c) for c in ceiling['class_sizes']):>11s}")
    s1, s2 = marginal["per_state_accuracy"]
    print(f"{'true maps, poses marginalised':34s} {marginal['accuracy']:8.3f} {s1:7.3f} "
          f"{s2:7.3f} {'/'.join(str(c) for c in marginal['class_sizes']):>11s}")
    return rows, {"map": str(args.map), "state_2": motion, "oracle": oracle,
                  "estimated_map_ceiling": ceiling, "pose_marginalised_oracle": marginal}


def case_nu(args, work: Path) -> dict:
    from dask_refine.io.mrc import read_map

    def move_domain(m):
        out = m.copy()
        c = m.shape[0] // 2
        out[:, :, c + 2:] = np.roll(m, 2, axis=1)[:, :, c + 2:]
        return out

    _, a, b, px, _ = mixture(work, args.n, args.snr, move_domain)
    consensus = (a + b) / 2
    from dask_refine.core.fsc import fsc

    rows = {}
    for name, nu in (("homogeneous", False), ("non-uniform", True)):
        summary = run_ours(work / "particles.zarr", work / "map_a.mrc", work / name,
                           args.workers, args.max_iterations,
                           **({"non_uniform": True} if nu else {}))
        final = work / name / ("map_nu.mrc" if nu else "map.mrc")
        volume = read_map(final)[0]
        rows[name] = {"fsc_consensus_05_A": fsc_truth(final, consensus, px),
                      "mean_fsc_consensus_shells_4_to_28": float(fsc(volume, consensus)[4:28]
                                                                 .mean()),
                      "gold_standard_A": summary["resolution_A"], "wall_s": summary["wall_s"],
                      "iterations": summary["iterations"]}
    print(f"\nNon-uniform: flexible domain in half the particles, box {a.shape[0]}, {args.n} "
          f"particles, SNR {args.snr:g}")
    print(f"{'method':14s} {'gold-std Å':>10s} {'consensus@0.5 Å':>15s} {'mean FSC':>8s} "
          f"{'wall s':>7s}")
    for name, r in rows.items():
        print(f"{name:14s} {r['gold_standard_A']:10.2f} {r['fsc_consensus_05_A']:15.2f} "
              f"{r['mean_fsc_consensus_shells_4_to_28']:8.3f} {r['wall_s']:7.0f}")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=("hetero", "nu", "conformational"), required=True)
    p.add_argument("--n", type=int, default=None,
                   help="particles (default 1,000; 3,000 for --case conformational)")
    p.add_argument("--snr", type=float, default=None,
                   help="default 0.1; 0.05 for --case conformational")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-iterations", type=int, default=10)
    p.add_argument("--skip-relion", action="store_true")
    p.add_argument("--relion-timeout-min", type=float, default=15.0)
    p.add_argument("--relion-bin", default=None, metavar="DIR",
                   help="RELION's binaries from DIR (e.g. benchmarks/.peers/relion5/bin) instead "
                   "of PATH (Debian's RELION 3.1)")
    p.add_argument("--work", default=str(HERE / "results" / "hetero"))
    conf = p.add_argument_group("--case conformational")
    conf.add_argument("--map", default=str(MAP),
                      help="state 1 (default the shipped 1TII map); state 2 moves a domain of it")
    conf.add_argument("--hinge-deg", type=float, default=8.0,
                      help="turn of the domain about its hinge, degrees (default 8)")
    conf.add_argument("--domain-shift-A", type=float, default=0.0,
                      help="then a shift of the domain along its closing direction, Å "
                      "(default 0)")
    conf.add_argument("--domain-fraction", type=float, default=0.35,
                      help="share of the mass on the domain's side of the plane (default 0.35)")
    conf.add_argument("--mask-edge-px", type=float, default=3.0,
                      help="soft edge of the domain mask, px (default 3)")
    conf.add_argument("--compare-hard", action="store_true",
                      help="also run hetero-refine --hard")
    conf.add_argument("--alignment-folds", type=int, default=None, metavar="F",
                      help="the job's alignment_folds (default: the job's default)")
    conf.add_argument("--ceilings-only", action="store_true",
                      help="simulate and print only what the case allows (the oracles and the "
                      "other-half ceiling), no refinement: minutes instead of an hour")
    args = p.parse_args()
    conformational = args.case == "conformational"
    args.n = args.n or (3000 if conformational else 1000)
    args.snr = args.snr if args.snr is not None else (0.05 if conformational else 0.1)
    name = f"{args.case}_n{args.n}_snr{args.snr:g}"
    if conformational:
        name = (f"{args.case}_{Path(args.map).stem}_hinge{args.hinge_deg:g}_n{args.n}"
                f"_snr{args.snr:g}")
    work = Path(args.work) / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    extra = {}
    if conformational:
        rows, extra = case_conformational(args, work)
    else:
        rows = case_hetero(args, work) if args.case == "hetero" else case_nu(args, work)
    print(f"total {time.perf_counter() - t0:.0f} s (simulation, refinement, scoring)")
    suffix = "_ceilings" if args.ceilings_only else ""
    out = HERE / "results" / f"hetero_{args.case}{suffix}.json"
    out.write_text(json.dumps({"args": vars(args), **extra, "rows": rows}, indent=2,
                              default=str))


if __name__ == "__main__":
    main()
