"""Per-iteration progress events for the live dashboard (:mod:`dask_refine.ui.dashboard`).

Each iteration of a job becomes one plain-data payload (numbers, strings, lists) published on the
scheduler with :func:`dask_refine.parallel.events.publish`: the FSC curve and resolution of every
class, small central slices of the current half maps along the three axes, the distribution of
viewing directions, pose and class changes, class sizes, particles/s and the pose evaluations per
particle against an exhaustive search of the same grid. Slices travel as 8-bit greyscale so that
a payload stays small (≈ 25 kB a class at the default 64-pixel thumbnails).
"""

from __future__ import annotations

import math
import time
import uuid

import numpy as np

from ..core.fsc import shell_resolution_A
from ..core.viewing import viewing_directions

THUMBNAIL_PX = 64
ORIENTATION_BINS = (36, 18)  # azimuth × elevation, 10° bins


def new_run_id(job: str) -> str:
    """A label that tells this run's events from earlier runs' on the same scheduler."""
    return f"{job}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def central_slices(volume, max_px: int = THUMBNAIL_PX) -> list:
    """The central XY, XZ and YZ sections of ``volume (z, y, x)``, block-averaged down to at most
    ``max_px`` pixels a side and scaled to 0…255 together (0.5–99.5 percentiles), as nested lists
    (rows top to bottom = increasing y or z)."""
    vol = np.asarray(volume, dtype=np.float32)
    c = vol.shape[0] // 2
    sections = [vol[c], vol[:, c, :], vol[:, :, c]]
    factor = max(1, math.ceil(vol.shape[0] / max_px))
    if factor > 1:
        n = (vol.shape[0] // factor) * factor
        sections = [s[:n, :n].reshape(n // factor, factor, n // factor, factor).mean(axis=(1, 3))
                    for s in sections]
    lo, hi = np.percentile(np.concatenate([s.ravel() for s in sections]), [0.5, 99.5])
    span = hi - lo if hi > lo else 1.0
    return [np.clip(np.round(255 * (s - lo) / span), 0, 255).astype(np.uint8).tolist()
            for s in sections]


def orientation_histogram(rotation, bins=ORIENTATION_BINS) -> dict:
    """Counts of viewing directions (:func:`..core.viewing.viewing_directions`) in uniform
    azimuth (RELION rot, −180…180°) × elevation (90° − tilt, −90…90°) bins: ``{"counts": (n_el, n_az) nested list, "azimuth_deg", "elevation_deg"
    (bin edges)}``."""
    azimuth, elevation = viewing_directions(rotation)
    az_edges = np.linspace(-180.0, 180.0, bins[0] + 1)
    el_edges = np.linspace(-90.0, 90.0, bins[1] + 1)  # uniform: drawn as an image
    counts, _, _ = np.histogram2d(np.ravel(elevation), np.ravel(azimuth),
                                  bins=(el_edges, az_edges))
    return {"counts": counts.astype(int).tolist(), "azimuth_deg": az_edges.tolist(),
            "elevation_deg": el_edges.tolist()}


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def final_results(summary: dict) -> dict:
    """What the page shows of a finished job: the sharpening B-factor and the local resolution
    (median, 5th and 95th percentiles) of its map (or of its best class)."""
    keys = ("sharpening_bfactor_A2", "local_resolution_A")
    return {k: summary[k] for k in keys if summary.get(k) is not None}


def iteration_event(*, run: str, job: str, out_dir: str, iteration: int, max_iterations: int,
                    box_size: int, pixel_size_A: float, classes: list, rotation=None,
                    stats: dict | None = None) -> dict:
    """One iteration's payload. ``classes``: per class ``None`` (empty) or a dict with
    ``fsc`` (curve), ``resolution_A``, ``halves`` (two volumes) and ``n_particles``.
    ``stats``: the iteration's scalar statistics (pose change, particles/s, evaluations…);
    non-scalar entries are left out."""
    inv_res = (1.0 / shell_resolution_A(box_size, pixel_size_A)).tolist()
    per_class = []
    for k, c in enumerate(classes):
        if c is None:
            per_class.append({"class": k + 1, "empty": True})
            continue
        curve = np.asarray(c["fsc"], dtype=float)
        per_class.append({
            "class": k + 1, "empty": False, "n_particles": int(c.get("n_particles", 0)),
            "resolution_A": _finite(c["resolution_A"]),
            "fsc": curve.tolist(), "shell_inv_A": inv_res[:curve.size],
            "slices_half_A": central_slices(c["halves"][0]),
            "slices_half_B": central_slices(c["halves"][1])})
    resolutions = [c["resolution_A"] for c in per_class if not c["empty"]]
    scalars = {k: (v if isinstance(v, (int, str, bool)) else _finite(v))
               for k, v in (stats or {}).items() if isinstance(v, (int, float, str, bool))}
    lists = {k: v for k, v in (stats or {}).items()
             if k in ("class_sizes", "class_resolutions_A")}
    event = {"run": run, "job": job, "out_dir": str(out_dir), "iteration": int(iteration),
             "max_iterations": int(max_iterations), "box_size": int(box_size),
             "pixel_size_A": float(pixel_size_A), "time": time.time(),
             "resolution_A": min((r for r in resolutions if r is not None), default=None),
             "classes": per_class, "stats": scalars,
             **{k: [_finite(x) for x in v] for k, v in lists.items()}}
    if rotation is not None:
        event["orientations"] = orientation_histogram(rotation)
    return event
