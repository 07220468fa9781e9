"""CTF refinement inside the refinement jobs: which image model each iteration's E-step uses,
and how the evidence it returns updates it (the numerics are :mod:`..core.ctf_refine`).

The store's CTF and optics columns are never changed; a run keeps its refined values beside
them (the State fields named in :data:`CTF_STATE`), applies them to every later iteration and
writes them to its particle files.
"""

from __future__ import annotations

import numpy as np

from ..core.aberrations import model_aberrations
from ..core.ctf_refine import fit_beam_tilt, fit_even_aberrations, fit_magnification
from ..io.store import CTF_COLUMNS, OPTICS_COLUMNS, ParticleStore

#: A run's refined CTF and optics, as State fields (saved in each iteration's poses.npz):
#: per particle the defocus offset from the file's (N, 2: U, V); per optics group (rows in
#: the order of ``np.unique(optics_group)``) the beam tilt (G, 2) mrad, the trefoil (G, 2)
#: added to odd coefficients 2 and 5, the even coefficients (G, 9) added to the filed ones,
#: and the magnification matrix (G, 2, 2) that replaces the filed one. None: as filed.
CTF_STATE = ("defocus_offset_A", "beam_tilt_mrad", "trefoil", "even_zernike", "mag_matrix")
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
                    even_zernike=None, mag_matrix=None) -> dict:
    """The CTF and optics columns with a run's refined values (:data:`CTF_STATE`):
    ``defocus_u/v_A`` moved by ``defocus_offset_A`` (N, 2); per optics group (rows of
    ``(G, …)``) the ``beam_tilt_mrad``, the ``trefoil`` added to odd coefficients 2 and 5, the
    ``even_zernike`` (G, 9) added to the filed even coefficients, the ``mag_matrix``
    (G, 2, 2)."""
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
    if mag_matrix is not None:
        cols["mag_matrix"] = np.asarray(mag_matrix, np.float64)[index]
    return cols


def image_model(meta: dict, pixel_size_A: float | None = None, **refined) -> dict:
    """The E-step's per-particle image model: CTF columns (refined defocus) and the model's
    aberrations (odd coefficients with the refined tilt and trefoil, even ones with their
    refinement, the refined magnification, the optics groups' pixel sizes against the
    reference's ``pixel_size_A``), with ``optics_group`` as a 0-based index.
    ``refined``: a run's values by their :data:`CTF_STATE` names."""
    cols = refined_columns(meta, **refined)
    model = {k: cols[k] for k in CTF_COLUMNS}
    model.update(model_aberrations(cols, pixel_size_A))
    model["optics_group"] = group_index(meta)
    return model


def filed_mag_matrix(meta: dict) -> np.ndarray:
    """``(G, 2, 2)`` magnification matrix of each optics group as filed (identity if none)."""
    index = group_index(meta)
    out = np.tile(np.eye(2), (index.max() + 1, 1, 1))
    if meta.get("mag_matrix") is not None:
        for g in range(out.shape[0]):
            out[g] = np.asarray(meta["mag_matrix"][np.flatnonzero(index == g)[0]]).reshape(2, 2)
    return out


def anisotropy_percent(matrix) -> float:
    """RELION's anisotropic magnification of a 2×2 matrix: the difference of its singular
    values over their mean, in percent."""
    sv = np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)
    return float(100.0 * (sv[0] - sv[1]) / sv.mean())


def refine_from_evidence(meta: dict, state, found_offset_A, phase_sums: dict | None,
                         even_sums: dict | None, range_A: float, r_max: float, box_size: int,
                         pixel_size_A: float, higher_order: bool = True,
                         mag_sums: dict | None = None):
    """The next CTF state (:data:`CTF_STATE` name → value, starting from ``state``'s) from one
    E-step's evidence, with statistics.

    ``found_offset_A`` (N, 2) or None: each particle's best U, V offsets relative to the
    defocus it was searched with; the total stays within ± ``range_A`` of the file's.
    ``phase_sums`` / ``even_sums`` / ``mag_sums``: optics group index → sums (None: not
    refined); each group's tilt and trefoil move by the fit of its phase sums, its even
    coefficients by the fit of its γ sums, its magnification matrix ``M`` to ``M (I + D)`` by
    the fit of its gradient sums, over ``|k| < r_max`` (:mod:`..core.ctf_refine`); the trefoil
    and even terms only with ``higher_order``."""
    new = {name: getattr(state, name) for name in CTF_STATE}
    stats = {}
    if found_offset_A is not None:
        base = (np.zeros_like(found_offset_A) if new["defocus_offset_A"] is None
                else new["defocus_offset_A"])
        new["defocus_offset_A"] = np.clip(base + found_offset_A, -range_A, range_A)
        stats["mean_defocus_change_A"] = float(np.mean(np.abs(found_offset_A)))
        stats["rms_defocus_offset_A"] = float(np.sqrt(np.mean(new["defocus_offset_A"] ** 2)))
    index = group_index(meta)
    n_groups = index.max() + 1

    def group_optics(g):
        first = int(np.flatnonzero(index == g)[0])
        mag = meta["mag_matrix"][first] if "mag_matrix" in meta else None
        return first, mag

    if phase_sums is not None:
        tilt = (filed_beam_tilt(meta) if new["beam_tilt_mrad"] is None
                else np.array(new["beam_tilt_mrad"]))
        trefoil = np.zeros((n_groups, 2)) if new["trefoil"] is None else np.array(new["trefoil"])
        even_zernike = (np.zeros((n_groups, EVEN_COEFFICIENTS)) if new["even_zernike"] is None
                        else np.array(new["even_zernike"]))
        for g, z in sorted(phase_sums.items()):
            first, mag = group_optics(g)
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
        new.update(beam_tilt_mrad=tilt, trefoil=trefoil, even_zernike=even_zernike)
        stats.update(beam_tilt_mrad=tilt.tolist(), trefoil=trefoil.tolist(),
                     even_zernike=even_zernike.tolist())
    if mag_sums is not None:
        mag = (filed_mag_matrix(meta) if new["mag_matrix"] is None
               else np.array(new["mag_matrix"], np.float64))
        for g, sums in sorted(mag_sums.items()):
            mag[g] = mag[g] @ (np.eye(2) + fit_magnification(sums, box_size, r_max))
        new["mag_matrix"] = mag
        stats.update(mag_matrix=mag.tolist(),
                     anisotropic_magnification_percent=[anisotropy_percent(m) for m in mag])
    return new, stats
