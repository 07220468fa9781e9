"""The sharpened map and the local resolution every refinement and reconstruction writes beside
its half maps (the numerics are :mod:`..core.postprocess`, RELION's ``relion_postprocess``).

Outputs in the job's (or class's) folder: ``map_sharp.mrc`` (the half maps' average, MTF
corrected, FSC-weighted and sharpened by the Guinier B-factor or ``--bfactor``; RELION's
``postprocess.mrc``), ``map_sharp_masked.mrc`` with a user or automatic mask
(``postprocess_masked.mrc``), ``local_resolution.mrc`` and ``map_locres_filtered.mrc``
(``--locres``), and ``local_resolution.png``.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.postprocess import LocalResolution, Mtf, Sharpened, local_resolution, sharpen
from ..io.figures import write_local_resolution_png
from ..io.mrc import write_map
from ..io.star import read_mtf
from .config import PostprocessOptions


def load_mtf(options: PostprocessOptions, pixel_size_A: float) -> Mtf | None:
    """The options' MTF with its frequencies in 1/Å (None without one)."""
    if not options.mtf_path:
        return None
    per_pixel, value = read_mtf(options.mtf_path)
    return Mtf(per_pixel / (options.mtf_pixel_size_A or pixel_size_A), value)


@dataclass(frozen=True)
class Postprocessed:
    """The numbers :func:`write_postprocessed` writes: the half maps' average ``(D, D, D)``
    float64, its sharpening and, when asked, its local resolution."""

    average: np.ndarray
    sharp: Sharpened
    local: LocalResolution | None


def postprocess_maps(halves, fsc_curve, pixel_size_A: float,
                     options: PostprocessOptions = PostprocessOptions()) -> Postprocessed:
    """Sharpen the half maps' average with their (mask-corrected) FSC and, if asked, map their
    local resolution (no files)."""
    mtf = load_mtf(options, pixel_size_A)
    average = 0.5 * (np.asarray(halves[0], np.float64) + np.asarray(halves[1], np.float64))
    sharp = sharpen(average, fsc_curve, pixel_size_A, options.bfactor_A2, mtf)
    local = (local_resolution(halves[0], halves[1], pixel_size_A,
                              options.local_resolution_sampling_A,
                              bfactor_A2=sharp.bfactor_A2, mtf=mtf)
             if options.local_resolution else None)
    return Postprocessed(average, sharp, local)


def start_postprocess(halves, fsc_curve, pixel_size_A: float,
                      options: PostprocessOptions = PostprocessOptions()) -> Future:
    """:func:`postprocess_maps` in a thread of its own, to overlap its FFTs (which release the
    GIL) with the drawing of a job's figures; hand the future to :func:`write_postprocessed`."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="postprocess")
    try:
        return pool.submit(postprocess_maps, halves, fsc_curve, pixel_size_A, options)
    finally:
        pool.shutdown(wait=False)


def write_postprocessed(out_dir, halves, fsc_curve, mask, pixel_size_A: float,
                        options: PostprocessOptions = PostprocessOptions(),
                        title: str = "", computed: Future | None = None) -> dict:
    """Write the files of :func:`postprocess_maps` to ``out_dir`` (``computed``: its result on
    the way, from :func:`start_postprocess` with the same arguments; None: computed here).
    ``mask``: the job's final mask (None: the map's own density decides where the local
    resolutions are summarised). Returns the summary's figures and the files written."""
    out = Path(out_dir)
    done = (computed.result() if computed is not None
            else postprocess_maps(halves, fsc_curve, pixel_size_A, options))
    average, sharp, local = done.average, done.sharp, done.local
    files = {"map_sharp": sharp.map}
    if mask is not None:
        files["map_sharp_masked"] = (sharp.map * mask).astype(np.float32)
    summary = {"sharpening_bfactor_A2": sharp.bfactor_A2}
    if local is not None:
        files.update(local_resolution=local.resolution_A, map_locres_filtered=local.filtered)
        region = (np.asarray(mask) if mask is not None
                  else (average > np.percentile(average, 90)).astype(np.float32))
        inside = (region > 0.5) & (local.resolution_A > 0)
        values = local.resolution_A[inside]
        if values.size:
            summary["local_resolution_A"] = {
                "median": float(np.median(values)),
                "p5": float(np.percentile(values, 5)), "p95": float(np.percentile(values, 95))}
        prefix = f"{title}: " if title else ""
        plot = str(write_local_resolution_png(
            out / "local_resolution.png", average, local.resolution_A, region, pixel_size_A,
            f"{prefix}Local resolution (half-map FSC in {options.local_resolution_sampling_A:g} Å "
            "windows)"))
    outputs = {}
    for name, volume in files.items():
        write_map(out / f"{name}.mrc", volume, pixel_size_A)
        outputs[name] = str(out / f"{name}.mrc")
    if local is not None:
        outputs["local_resolution_plot"] = plot
    summary["outputs"] = outputs
    return summary
