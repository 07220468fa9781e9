"""The sharpened map and the local resolution every refinement and reconstruction writes beside
its half maps (the numerics are :mod:`..core.postprocess`, RELION's ``relion_postprocess``).

Outputs in the job's (or class's) folder: ``map_sharp.mrc`` (the half maps' average, MTF
corrected, FSC-weighted and sharpened by the Guinier B-factor or ``--bfactor``; RELION's
``postprocess.mrc``), ``map_sharp_masked.mrc`` with a user or automatic mask
(``postprocess_masked.mrc``), ``local_resolution.mrc`` and ``map_locres_filtered.mrc``
(``--locres``), and ``local_resolution.png``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.postprocess import Mtf, local_resolution, sharpen
from ..io.figures import write_local_resolution_png
from ..io.mrc import write_map
from ..io.star import read_mtf


@dataclass(frozen=True)
class PostprocessOptions:
    """``bfactor_A2``: the sharpening B-factor (Å², negative sharpens; None: fitted to the
    Guinier plot from 10 Å on, RELION's ``--auto_bfac``). ``mtf_path``: the detector's MTF in
    RELION's STAR format, its frequencies in 1/pixel of ``mtf_pixel_size_A`` (the micrographs'
    pixel size; None: the map's). ``local_resolution``: write the local resolution, in windows
    ``local_resolution_sampling_A`` apart (RELION's ``--locres_sampling``)."""

    bfactor_A2: float | None = None
    mtf_path: str | None = None
    mtf_pixel_size_A: float | None = None
    local_resolution: bool = True
    local_resolution_sampling_A: float = 25.0


def load_mtf(options: PostprocessOptions, pixel_size_A: float) -> Mtf | None:
    """The options' MTF with its frequencies in 1/Å (None without one)."""
    if not options.mtf_path:
        return None
    per_pixel, value = read_mtf(options.mtf_path)
    return Mtf(per_pixel / (options.mtf_pixel_size_A or pixel_size_A), value)


def write_postprocessed(out_dir, halves, fsc_curve, mask, pixel_size_A: float,
                        options: PostprocessOptions = PostprocessOptions(),
                        title: str = "") -> dict:
    """Sharpen the half maps' average with their (mask-corrected) FSC and, if asked, map their
    local resolution; write the module's files to ``out_dir``. ``mask``: the job's final mask
    (None: the map's own density decides where the local resolutions are summarised).
    Returns the summary's figures and the files written."""
    out = Path(out_dir)
    mtf = load_mtf(options, pixel_size_A)
    average = 0.5 * (np.asarray(halves[0], np.float64) + np.asarray(halves[1], np.float64))
    sharp = sharpen(average, fsc_curve, pixel_size_A, options.bfactor_A2, mtf)
    files = {"map_sharp": sharp.map}
    if mask is not None:
        files["map_sharp_masked"] = (sharp.map * mask).astype(np.float32)
    summary = {"sharpening_bfactor_A2": sharp.bfactor_A2}
    if options.local_resolution:
        local = local_resolution(halves[0], halves[1], pixel_size_A,
                                 options.local_resolution_sampling_A,
                                 bfactor_A2=sharp.bfactor_A2, mtf=mtf)
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
    if options.local_resolution:
        outputs["local_resolution_plot"] = plot
    summary["outputs"] = outputs
    return summary
