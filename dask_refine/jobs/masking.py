"""Masks for the jobs and the final FSC report (unmasked, masked, phase-randomised, corrected).

Shared by every job: a user mask (MRC, values in [0, 1], same box and voxel size as the
particles), an automatic solvent mask from the full map (``relion_mask_create`` steps: low-pass,
threshold, extend, soft edge), or the soft sphere of the job's mask diameter. During a
refinement the user mask, or a dynamic mask rebuilt every iteration, masks the references and
gives the per-iteration, solvent-corrected FSC (:func:`refinement_mask`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.filters import lowpass_filter
from ..core.fsc import (mask_corrected_fsc, resolution_at_threshold, shell_resolution_A,
                        within_band)
from ..core.masks import solvent_mask
from ..io.errors import InputError
from ..io.figures import write_fsc_png
from ..io.mrc import read_map, write_map
from ..io.outputs import write_csv
from .config import DynamicMask, MaskOptions  # noqa: F401  (their home is .config)


def read_user_mask(path, box_size: int, pixel_size_A: float) -> np.ndarray:
    """A user mask checked against the particles: same box and voxel size, values in [0, 1]."""
    mask, px = read_map(path)
    if mask.shape[0] != box_size:
        raise InputError(path, f"mask box {mask.shape[0]} differs from the particles' box "
                         f"{box_size}; expected a ({box_size},)*3 mask")
    if abs(px - pixel_size_A) > 0.01 * pixel_size_A:
        raise InputError(path, f"mask voxel size {px:.4g} Å differs from the particles' pixel "
                         f"size {pixel_size_A:.4g} Å")
    if mask.min() < -1e-3 or mask.max() > 1 + 1e-3:
        raise InputError(path, f"mask values span [{mask.min():.3g}, {mask.max():.3g}]; "
                         "expected values in [0, 1]")
    if mask.max() <= 0:
        raise InputError(path, "mask is empty (no value above 0)")
    return np.clip(mask, 0.0, 1.0)


def job_mask(options: MaskOptions, full_map, pixel_size_A: float) -> np.ndarray | None:
    """The mask a job's final FSC uses: the user's, an automatic solvent mask, or None."""
    box = full_map.shape[0]
    if options.mask_path:
        return read_user_mask(options.mask_path, box, pixel_size_A)
    if options.auto_mask:
        smooth = lowpass_filter(np.asarray(full_map, np.float64),
                                max(options.auto_mask_lowpass_A, 2 * pixel_size_A), pixel_size_A)
        return solvent_mask(smooth, options.auto_mask_threshold * float(smooth.max()),
                            options.auto_mask_extend_px, options.auto_mask_soft_edge_px)
    return None


def refinement_mask(halves, resolution_A: float, pixel_size_A: float, user_mask=None,
                    dynamic: DynamicMask | None = None):
    """The solvent mask of one class's references in an iteration (RELION's
    ``--solvent_mask``): the user's, else the dynamic mask once the resolution (with the
    spherical mask) reaches its start, else None (the sphere stays)."""
    if user_mask is not None:
        return user_mask
    if dynamic is None or not resolution_A <= dynamic.start_A:
        return None
    average = 0.5 * (np.asarray(halves[0], np.float64) + np.asarray(halves[1], np.float64))
    smooth = lowpass_filter(average, max(resolution_A, 2 * pixel_size_A), pixel_size_A)
    try:
        return solvent_mask(smooth, dynamic.threshold * float(smooth.max()),
                            dynamic.near_A / pixel_size_A,
                            (dynamic.far_A - dynamic.near_A) / pixel_size_A)
    except ValueError:  # a map with no density above the threshold: keep the sphere
        return None


def final_mask(options: MaskOptions, full_map, pixel_size_A: float, out_dir, fallback=None):
    """The mask for a class's final FSC: the user's or an automatic one (also written to
    ``out_dir/mask.mrc``), else ``fallback`` (the job's soft sphere, or None)."""
    mask = job_mask(options, full_map, pixel_size_A)
    if mask is None:
        return fallback
    write_map(Path(out_dir) / "mask.mrc", mask, pixel_size_A)
    return mask


def write_fsc_report(out_dir, halves, mask, pixel_size_A: float, title: str = "",
                     max_shell: float | None = None) -> dict:
    """``fsc.csv`` and ``fsc.png`` in ``out_dir`` for two half maps. With a mask: unmasked,
    masked, phase-randomised masked and corrected curves; the resolution is the corrected curve's
    0.143 crossing. Without: the unmasked curve. ``max_shell``: the half maps were reconstructed
    from Fourier data inside this radius only; every curve is 0 beyond it
    (:func:`..core.fsc.within_band`). Returns the curves and resolutions."""
    out = Path(out_dir)
    box = halves[0].shape[0]
    ones = np.ones_like(halves[0]) if mask is None else mask
    curves = mask_corrected_fsc(halves[0], halves[1], ones)
    curves.update({k: within_band(curves[k], max_shell)
                   for k in ("unmasked", "masked", "randomized_masked", "corrected")})
    final = curves["corrected"]
    shells = np.arange(final.size)
    columns = {"shell": shells.tolist(),
               "frequency_invA": (shells / (box * pixel_size_A)).tolist(),
               "resolution_A": shell_resolution_A(box, pixel_size_A).tolist(),
               "fsc": final.tolist(), "fsc_unmasked": curves["unmasked"].tolist()}
    if mask is not None:
        columns.update(fsc_masked=curves["masked"].tolist(),
                       fsc_phase_randomized_masked=curves["randomized_masked"].tolist(),
                       fsc_corrected=final.tolist())
    write_csv(out / "fsc.csv", columns)
    resolution = resolution_at_threshold(final, box, pixel_size_A, 0.143)
    plotted = ({"corrected (masked)": final, "unmasked": curves["unmasked"],
                "phase-randomised masked": curves["randomized_masked"]}
               if mask is not None else {"half A vs half B": final})
    write_fsc_png(out / "fsc.png", plotted, box, pixel_size_A, resolution,
                  **({"title": title} if title else {}))
    return {"resolution_A": resolution,
            "resolution_fsc05_A": resolution_at_threshold(final, box, pixel_size_A, 0.5),
            "resolution_unmasked_A": resolution_at_threshold(curves["unmasked"], box,
                                                             pixel_size_A, 0.143),
            "randomize_at_shell": curves["randomize_at_shell"] if mask is not None else None,
            "curves": curves}
