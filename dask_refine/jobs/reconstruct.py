"""Homogeneous Reconstruction Only: known poses → half maps, FSC, Wiener-filtered full map.

Outputs in ``out_dir``: ``half_A.mrc``, ``half_B.mrc``, ``map.mrc`` (full map, regularised by the
SSNR that the half-map FSC implies, RELION-style), ``fsc.csv``, ``fsc.png``, ``summary.json`` and
the resolved ``config.json``; figures ``orientations.png``, ``slices.png`` and ``guinier.png``
(the B-factor goes into ``summary.json``; :func:`..io.figures.write_job_figures`). The particle
store is opened read-only.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..core.backend import fft_workers
from ..core.backprojection import CTF_PARAMETERS, FourierSums
from ..core.fsc import fsc, ssnr_from_fsc
from ..core.masks import soft_sphere_mask
from ..core.reconstruction import reconstruct
from ..core.symmetry import symmetry_operators
from ..io.errors import InputError
from ..io.figures import write_job_figures
from ..io.mrc import write_map
from ..io.outputs import write_json
from ..io.star import export_star
from ..io.store import ParticleStore
from ..parallel.cluster import dask_client, reconstruction_work_s
from ..parallel.events import publish
from ..parallel.mapreduce import backproject_graph
from .checkpoint import output_dir
from .progress import final_results, iteration_event, new_run_id
from .config import ReconstructConfig  # noqa: F401  (its home is .config)
from .masking import final_mask, read_user_mask, write_fsc_report
from .postprocess import start_postprocess, write_postprocessed

HALF_NAMES = ("A", "B")


def check_symmetry(name: str) -> None:
    """Refuse an unknown point group before any work starts."""
    try:
        symmetry_operators(name)
    except ValueError as exc:
        raise InputError("--symmetry", str(exc)) from None


def load_pose_metadata(store: ParticleStore, use_ctf: bool) -> dict[str, np.ndarray]:
    """The columns a backprojection needs, checked for presence and finiteness."""
    missing = [c for c in ("rotation", "shift_A") if not store.has_column(c)]
    if missing:
        raise InputError(store.path, f"no {', '.join(missing)} column(s); Reconstruction Only "
                         "needs poses (import a STAR file with angles and origins, or simulate "
                         "with --write-poses)")
    names = ["rotation", "shift_A", "scale", "half_set"] + (list(CTF_PARAMETERS) if use_ctf else [])
    for name in names:
        if name != "scale" and not store.has_column(name):
            raise InputError(f"{store.path}/{name}", "required column is missing")
    meta = store.metadata(names)
    if use_ctf:  # with the beam tilt, Zernike terms and magnification the store carries
        meta.update(store.optics_metadata())
    for name, values in meta.items():
        bad = np.flatnonzero(~np.isfinite(values.reshape(values.shape[0], -1)).all(axis=1))
        if bad.size:
            raise InputError(f"{store.path}/{name}", f"particle {int(bad[0])} has a non-finite "
                             "value; expected finite numbers")
    return meta


def compute_sums(store: ParticleStore, meta: dict, groups: np.ndarray, n_groups: int,
                 config: ReconstructConfig, client) -> FourierSums:
    """Run the backprojection graph on ``client`` and return the reduced sums."""
    n_threads = sum(client.nthreads().values()) if client is not None else 1
    graph = backproject_graph(
        store.images, {k: v for k, v in meta.items() if k != "half_set"}, groups, n_groups,
        store.info.pixel_size_A, config.pad, config.use_ctf,
        n_chains=config.n_chains or max(1, n_threads), split_every=config.split_every,
        source=str(store.path), chunk_size=config.chunk_size, backend=config.cluster.backend)
    if client is None:
        return graph.compute(scheduler="sync")
    return client.compute(graph).result()


def reconstruct_halves_and_full(sums: FourierSums, box_size: int, pixel_size_A: float,
                                mask=None, symmetry: str = "C1"):
    """Half maps (lightly regularised), their FSC, and the FSC-Wiener-regularised full map."""
    sums = sums.completed(box_size, symmetry)
    halves = [reconstruct(sums.data[h], sums.weight[h], box_size, complete_planes=False)
              for h in range(2)]
    if mask is not None:
        curve = fsc(halves[0] * mask, halves[1] * mask)
    else:
        curve = fsc(halves[0], halves[1])
    full = reconstruct(sums.data[0] + sums.data[1], sums.weight[0] + sums.weight[1], box_size,
                       ssnr=ssnr_from_fsc(curve, full_map=True), complete_planes=False)
    return halves, curve, full


def _class_groups(classes: str, store: ParticleStore, meta: dict, halves: np.ndarray):
    """Groups for a heterogeneous reconstruction: ``"labels"`` uses the store's ``class_id``
    (hard, from ``rlnClassNumber``); a ``.npy`` file of ``(N, K)`` posterior probabilities gives
    soft, weighted backprojection. Returns ``(groups, K, description)``; may add
    ``meta["class_weight"]``."""
    n = halves.size
    if classes == "labels":
        if not store.has_column("class_id"):
            raise InputError(f"{store.path}/class_id", "no class labels; import a STAR file with "
                             "rlnClassNumber or pass --classes FILE.npy with (N, K) weights")
        labels = store.read_column("class_id").astype(np.int64)
        if labels.min() < 0:
            raise InputError(f"{store.path}/class_id", f"class {labels.min() + 1} found; "
                             "expected class numbers ≥ 1")
        return labels * 2 + halves, int(labels.max()) + 1, "hard labels"
    path = Path(classes)
    try:
        weights = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(path, "file not found; expected 'labels' or a .npy file") from None
    except (ValueError, OSError) as exc:
        raise InputError(path, f"cannot read it as a NumPy .npy array ({exc})") from None
    if weights.ndim != 2 or weights.shape[0] != n:
        raise InputError(path, f"shape {weights.shape}; expected ({n}, K) class weights")
    if not np.isfinite(weights).all() or weights.min() < 0:
        raise InputError(path, "expected finite, non-negative class weights")
    meta["class_weight"] = weights.astype(np.float32)
    return halves, weights.shape[1], "soft weights"


def _class_poses(meta: dict, groups: np.ndarray, k: int):
    """Rotations (and soft class weights) of class ``k``'s particles, for its orientation plot."""
    if "class_weight" in meta:
        return meta["rotation"], meta["class_weight"][:, k]
    return meta["rotation"][groups // 2 == k], None


def _write_maps(out: Path, sums: FourierSums, info, config: ReconstructConfig, mask,
                rotation=None, weights=None) -> tuple[dict, dict]:
    """Half maps, full map, mask, FSC report and figures of one class into ``out``. Returns
    their summary, and the class's view for the dashboard (half maps, FSC, resolution)."""
    px = info.pixel_size_A
    with fft_workers():  # the padded inverse transforms on every core
        halves, _, full = reconstruct_halves_and_full(sums, info.box_size, px, mask,
                                                      config.symmetry)
    for name, vol in zip(HALF_NAMES, halves):
        write_map(out / f"half_{name}.mrc", vol, px)
    write_map(out / "map.mrc", full, px)
    job_mask = final_mask(config.masks, full, px, out, mask)
    report = write_fsc_report(out, halves, job_mask, px)
    pending = start_postprocess(halves, report["curves"]["corrected"], px, config.postprocess)
    figures = write_job_figures(out, halves, full, report["curves"]["corrected"],
                                report["resolution_A"], px, rotation, weights, config.symmetry)
    solvent = job_mask if (config.masks.mask_path or config.masks.auto_mask) else None
    post = write_postprocessed(out, halves, report["curves"]["corrected"], solvent, px,
                               config.postprocess, computed=pending)
    figures["outputs"].update(post.pop("outputs"))
    view = {"halves": halves, "fsc": report["curves"]["corrected"],
            "resolution_A": report["resolution_A"]}
    return {
        "resolution_A": report["resolution_A"],
        "bfactor_A2": figures["bfactor_A2"],
        **post,
        "resolution_fsc05_A": report["resolution_fsc05_A"],
        "resolution_unmasked_A": report["resolution_unmasked_A"],
        "mask": ("user" if config.masks.mask_path else "auto" if config.masks.auto_mask
                 else "sphere" if mask is not None else None),
        "n_particles_per_half": sums.count.tolist(),
        "outputs": {**{k: str(out / f) for k, f in (("map", "map.mrc"), ("half_A", "half_A.mrc"),
                                                      ("half_B", "half_B.mrc"), ("fsc", "fsc.csv"),
                                                      ("fsc_plot", "fsc.png"))},
                    **figures["outputs"]},
    }, view


def run_reconstruct(config: ReconstructConfig, client=None, log=print) -> dict:
    """Run the job; returns the summary written to ``summary.json``.

    ``client``: an existing ``distributed.Client`` (else one is made from ``config.cluster``).
    ``config.out_dir`` may be an object-store URL: the outputs are staged on this machine and
    uploaded at the end, ``summary.json`` last.
    """
    with output_dir(config.out_dir) as outputs:
        summary, event = _reconstruct(config, client, log, outputs)
        outputs.publish(last="summary.json")
    if client is not None:  # an embedded cluster is gone by now: nobody to tell
        publish(client, event)
    return summary


def _reconstruct(config: ReconstructConfig, client, log, outputs) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    check_symmetry(config.symmetry)
    out = outputs.local
    store = ParticleStore.open(config.store)
    info = store.info
    meta = load_pose_metadata(store, config.use_ctf)
    if config.masks.mask_path:  # refuse a bad mask before any work
        read_user_mask(config.masks.mask_path, info.box_size, info.pixel_size_A)
    groups = meta["half_set"].astype(np.int64)
    if not np.isin(groups, (0, 1)).all():
        raise InputError(f"{store.path}/half_set", "expected values 0 (half A) or 1 (half B)")
    n_classes, class_note = 1, None
    if config.classes:
        groups, n_classes, class_note = _class_groups(config.classes, store, meta, groups)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", asdict(config))
    log(f"reconstructing {info.n_particles} particles (box {info.box_size}, "
        f"{info.pixel_size_A:.3f} Å/px)" + (f", {n_classes} classes ({class_note})"
                                            if class_note else ""))
    if client is None:
        with dask_client(config.cluster, reconstruction_work_s(
                info.n_particles, info.box_size)) as own_client:
            sums = compute_sums(store, meta, groups, 2 * n_classes, config, own_client)
    else:
        sums = compute_sums(store, meta, groups, 2 * n_classes, config, client)
    t_backproject = time.perf_counter() - t0
    mask = None
    if config.mask_diameter_A:
        mask = soft_sphere_mask(info.box_size, 0.5 * config.mask_diameter_A / info.pixel_size_A)
    views = []  # per class, for the dashboard (None: an empty half set)
    if config.classes:
        results = {}
        for k in range(n_classes):
            pair = FourierSums(sums.data[2 * k:2 * k + 2], sums.weight[2 * k:2 * k + 2],
                               sums.count[2 * k:2 * k + 2])
            folder = out / f"class_{k + 1:03d}"
            folder.mkdir(exist_ok=True)
            if pair.count.min() == 0:
                log(f"class {k + 1}: a half set is empty; no map")
                results[k + 1] = {"n_particles_per_half": pair.count.tolist()}
                views.append(None)
                continue
            results[k + 1], view = _write_maps(folder, pair, info, config, mask,
                                               *_class_poses(meta, groups, k))
            views.append(view)
        summary = {"job": "reconstruct", "classes": class_note, "n_classes": n_classes,
                   "per_class": results}
    else:
        written, view = _write_maps(out, sums, info, config, mask, meta["rotation"])
        summary = {"job": "reconstruct", **written}
        views.append(view)
    summary.update({
        "n_particles": info.n_particles, "box_size": info.box_size,
        "pixel_size_A": info.pixel_size_A, "symmetry": config.symmetry,
        "time_s": time.perf_counter() - t0, "backprojection_time_s": t_backproject})
    summary["outputs_particles"] = str(export_star(store, out / "particles.star"))
    summary = outputs.names(summary)
    write_json(out / "summary.json", summary)
    event = iteration_event(
        run=new_run_id("reconstruct"), job="reconstruct", out_dir=outputs.location,
        iteration=1, max_iterations=1, box_size=info.box_size, pixel_size_A=info.pixel_size_A,
        classes=views, rotation=meta["rotation"])
    event["final"] = final_results(summary)
    return summary, event
