"""CTF refinement inside the refinement jobs: which image model each iteration's E-step uses,
and how the evidence it returns updates it (the numerics are :mod:`..core.ctf_refine`).

The store's CTF and optics columns are never changed; a run keeps its refined values beside
them (``State.defocus_offset_A``, ``State.beam_tilt_mrad``), applies them to every later
iteration and writes them to its particle files.
"""

from __future__ import annotations

import numpy as np

from ..core.aberrations import model_aberrations
from ..core.ctf_refine import fit_beam_tilt
from ..io.store import OPTICS_COLUMNS, CTF_COLUMNS, ParticleStore


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


def refined_columns(meta: dict, defocus_offset_A=None, beam_tilt_mrad=None) -> dict:
    """The CTF and optics columns with a run's refined values: ``defocus_u/v_A`` moved by
    ``defocus_offset_A`` (N, 2), ``beam_tilt_mrad`` per particle from the groups' ``(G, 2)``."""
    cols = {k: meta[k] for k in (*CTF_COLUMNS, *OPTICS_COLUMNS) if k in meta}
    if defocus_offset_A is not None:
        cols["defocus_u_A"] = meta["defocus_u_A"] + defocus_offset_A[:, 0]
        cols["defocus_v_A"] = meta["defocus_v_A"] + defocus_offset_A[:, 1]
    if beam_tilt_mrad is not None:
        cols["beam_tilt_mrad"] = np.asarray(beam_tilt_mrad)[group_index(meta)]
    return cols


def image_model(meta: dict, defocus_offset_A=None, beam_tilt_mrad=None) -> dict:
    """The E-step's per-particle image model: CTF columns (refined defocus) and the model's
    aberrations (odd coefficients with the refined tilt folded in, even ones, magnification),
    with ``optics_group`` as a 0-based index."""
    cols = refined_columns(meta, defocus_offset_A, beam_tilt_mrad)
    model = {k: cols[k] for k in CTF_COLUMNS}
    model.update(model_aberrations(cols))
    model["optics_group"] = group_index(meta)
    return model


def refine_from_evidence(meta: dict, defocus_offset_A, beam_tilt_mrad, found_offset_A,
                         phase_sums: dict | None, range_A: float, r_max: float, box_size: int,
                         pixel_size_A: float):
    """The next defocus offsets and beam tilts from one E-step's evidence, with statistics.

    ``found_offset_A`` (N, 2) or None: each particle's best U, V offsets relative to the defocus it was
    searched with; the total stays within ± ``range_A`` of the file's. ``phase_sums``: optics
    group index → ``(D, H)`` sums (None: tilt not refined); each group's tilt moves by the fit
    of its sums over ``|k| < r_max`` (:func:`..core.ctf_refine.fit_beam_tilt`)."""
    stats = {}
    if found_offset_A is not None:
        base = np.zeros_like(found_offset_A) if defocus_offset_A is None else defocus_offset_A
        defocus_offset_A = np.clip(base + found_offset_A, -range_A, range_A)
        stats["mean_defocus_change_A"] = float(np.mean(np.abs(found_offset_A)))
        stats["rms_defocus_offset_A"] = float(np.sqrt(np.mean(defocus_offset_A ** 2)))
    if phase_sums is not None:
        index = group_index(meta)
        tilt = filed_beam_tilt(meta) if beam_tilt_mrad is None else np.array(beam_tilt_mrad)
        for g, z in sorted(phase_sums.items()):
            first = int(np.flatnonzero(index == g)[0])
            mag = meta["mag_matrix"][first] if "mag_matrix" in meta else None
            tilt[g] += fit_beam_tilt(z, box_size, pixel_size_A, float(meta["cs_mm"][first]),
                                     float(meta["voltage_kV"][first]), r_max, mag)
        beam_tilt_mrad = tilt
        stats["beam_tilt_mrad"] = tilt.tolist()
    return defocus_offset_A, beam_tilt_mrad, stats
