"""CTF refinement inside the refinement jobs: which image model each iteration's E-step uses,
and how the evidence it returns updates it (the numerics are :mod:`..core.ctf_refine`).

The store's CTF and optics columns are never changed; a run keeps its refined values beside
them (``State.defocus_offset_A``, ``State.beam_tilt_mrad``), applies them to every later
iteration and writes them to its particle files.
"""

from __future__ import annotations

import numpy as np

from ..core.aberrations import model_aberrations
from ..core.ctf_refine import fit_beam_tilt, fit_even_aberrations
from ..io.store import CTF_COLUMNS, OPTICS_COLUMNS, ParticleStore

#: Even Zernike coefficients a group's refinement fits (RELION's n ≤ 4: 9).
EVEN_COEFFICIENTS = 9
#: A group's even aberrations are refined only in iterations where its beam tilt moved less.
TILT_SETTLED_MRAD = 0.1


def load_optics(store: ParticleStore) -> dict[str, np.ndarray]:
    """Every particle's CTF columns, optics group and the optics columns the store has, as
    filed (beam tilt not yet folded into the odd coefficients)."""
    return store.metadata([*CTF_COLUMNS, "optics_group", *OPTICS_COLUMNS])


def group_index(meta: dict) -> np.ndarray:
    """Each particle's optics group as 0-based index into ``np.unique(optics_group)``."""
    groups = meta.get("optics_group")
    if groups is None:
        return np.zeros(len(meta["defocus_u_A"]), np.int64)
    return np.unique(groups, return_inverse=True)[1].ravel()


def filed_beam_tilt(meta: dict) -> np.ndarray:
    """``(G, 2)`` beam tilt of each optics group as filed (its first particle's; 0 if none)."""
    index = group_index(meta)
    tilt = meta.get("beam_tilt_mrad")
    out = np.zeros((index.max() + 1, 2))
    if tilt is not None:
        for g in range(out.shape[0]):
            out[g] = tilt[np.flatnonzero(index == g)[0]]
    return out


def _added(filed, delta, width: int):
    """Per-particle coefficients ``filed (N, C)`` (or None) plus ``delta (N, width)``, padded."""
    n = delta.shape[0]
    out = np.zeros((n, max(width, 0 if filed is None else np.shape(filed)[1])))
    if filed is not None:
        out[:, :np.shape(filed)[1]] = filed
    out[:, :width] += delta
    return out


def refined_columns(meta: dict, defocus_offset_A=None, beam_tilt_mrad=None, trefoil=None,
                    even_zernike=None) -> dict:
    """The CTF and optics columns with a run's refined values: ``defocus_u/v_A`` moved by
    ``defocus_offset_A`` (N, 2); per optics group (rows of ``(G, …)``) the ``beam_tilt_mrad``,
    the ``trefoil`` added to odd coefficients 2 and 5, the ``even_zernike`` (G, 9) added to the
    filed even coefficients."""
    cols = {k: meta[k] for k in (*CTF_COLUMNS, *OPTICS_COLUMNS) if k in meta}
    if defocus_offset_A is not None:
        cols["defocus_u_A"] = meta["defocus_u_A"] + defocus_offset_A[:, 0]
        cols["defocus_v_A"] = meta["defocus_v_A"] + defocus_offset_A[:, 1]
    index = group_index(meta)
    if beam_tilt_mrad is not None:
        cols["beam_tilt_mrad"] = np.asarray(beam_tilt_mrad)[index]
    if trefoil is not None:
        delta = np.zeros((index.size, 6))
        delta[:, [2, 5]] = np.asarray(trefoil)[index]
        cols["odd_zernike"] = _added(meta.get("odd_zernike"), delta, 6)
    if even_zernike is not None:
        delta = np.asarray(even_zernike)[index]
        cols["even_zernike"] = _added(meta.get("even_zernike"), delta, delta.shape[1])
    return cols


def image_model(meta: dict, defocus_offset_A=None, beam_tilt_mrad=None, trefoil=None,
                even_zernike=None) -> dict:
    """The E-step's per-particle image model: CTF columns (refined defocus) and the model's
    aberrations (odd coefficients with the refined tilt and trefoil, even ones with their
    refinement, magnification), with ``optics_group`` as a 0-based index."""
    cols = refined_columns(meta, defocus_offset_A, beam_tilt_mrad, trefoil, even_zernike)
    model = {k: cols[k] for k in CTF_COLUMNS}
    model.update(model_aberrations(cols))
    model["optics_group"] = group_index(meta)
    return model


def refine_from_evidence(meta: dict, state, found_offset_A, phase_sums: dict | None,
                         even_sums: dict | None, range_A: float, r_max: float, box_size: int,
                         pixel_size_A: float, higher_order: bool = True):
    """The next ``(defocus_offset_A, beam_tilt_mrad, trefoil, even_zernike)`` from one
    E-step's evidence (starting from ``state``'s), with statistics.

    ``found_offset_A`` (N, 2) or None: each particle's best U, V offsets relative to the
    defocus it was searched with; the total stays within ± ``range_A`` of the file's.
    ``phase_sums`` / ``even_sums``: optics group index → sums (None: not refined); each
    group's tilt and trefoil move by the fit of its phase sums, its even coefficients by the
    fit of its γ sums, over ``|k| < r_max`` (:mod:`..core.ctf_refine`); the trefoil and even
    terms only with ``higher_order``."""
    defocus_offset_A, beam_tilt_mrad = state.defocus_offset_A, state.beam_tilt_mrad
    trefoil, even_zernike = state.trefoil, state.even_zernike
    stats = {}
    if found_offset_A is not None:
        base = np.zeros_like(found_offset_A) if defocus_offset_A is None else defocus_offset_A
        defocus_offset_A = np.clip(base + found_offset_A, -range_A, range_A)
        stats["mean_defocus_change_A"] = float(np.mean(np.abs(found_offset_A)))
        stats["rms_defocus_offset_A"] = float(np.sqrt(np.mean(defocus_offset_A ** 2)))
    if phase_sums is not None:
        index = group_index(meta)
        n_groups = index.max() + 1
        tilt = filed_beam_tilt(meta) if beam_tilt_mrad is None else np.array(beam_tilt_mrad)
        trefoil = np.zeros((n_groups, 2)) if trefoil is None else np.array(trefoil)
        even_zernike = (np.zeros((n_groups, EVEN_COEFFICIENTS)) if even_zernike is None
                        else np.array(even_zernike))
        for g, z in sorted(phase_sums.items()):
            first = int(np.flatnonzero(index == g)[0])
            mag = meta["mag_matrix"][first] if "mag_matrix" in meta else None
            step = fit_beam_tilt(z, box_size, pixel_size_A, float(meta["cs_mm"][first]),
                                 float(meta["voltage_kV"][first]), r_max, mag,
                                 trefoil=higher_order)
            tilt[g] += step[:2]
            if step.size > 2:
                trefoil[g] += step[2:]
            # the even terms once the tilt has settled: an uncorrected tilt lowers every
            # pixel's in-phase correlation by cos φ(k), an even function the even fit would
            # otherwise take up (RELION refines them in separate passes, tilt first)
            settled = np.abs(step[:2]).max() < TILT_SETTLED_MRAD
            if higher_order and settled and even_sums and g in even_sums:
                even_zernike[g] += fit_even_aberrations(even_sums[g], box_size, pixel_size_A,
                                                        r_max, mag)
        beam_tilt_mrad = tilt
        stats.update(beam_tilt_mrad=tilt.tolist(), trefoil=trefoil.tolist(),
                     even_zernike=even_zernike.tolist())
    return defocus_offset_A, beam_tilt_mrad, trefoil, even_zernike, stats
