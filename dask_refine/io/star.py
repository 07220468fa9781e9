"""RELION STAR files (3.0 and 3.1) ↔ particle stores, through the ``starfile`` package.

Import reads the particle table (``data_particles`` of RELION 3.1 with its ``data_optics``, or the
single table of RELION 3.0), the ``k@stack.mrcs`` image references (1-based k, paths relative to
the RELION project, looked up from the STAR file's folder and its parents), CTF parameters, and
poses when present (``rlnAngleRot/Tilt/Psi``; origins in Å ``rlnOriginX/YAngst`` or, before 3.1,
in pixels ``rlnOriginX/Y``). Every original particle column is kept in the store's ``star/`` group
and the optics table in its attributes, so that export gives back every field.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from ..core.rotations import euler_to_matrix, matrix_to_euler
from .errors import InputError
from .image_refs import cs_image_names, has_image_files, parse_image_names  # noqa: F401
from .mrc import write_stack
from .stacks import create_store_with_images, optics_groups, resolve_stacks, stack_box_size
from .store import OPTICS_COLUMNS, STAR_GROUP, ParticleStore, assign_half_sets

#: ``starfile.write`` format for floats: shortest repr, so that every value read from a STAR file
#: is written back exactly (``%.6f`` would turn 3.2e-07 into 0.000000).
FLOAT_FORMAT = None

OPTICS_FIELDS = {  # store column → (RELION label, default)
    "voltage_kV": ("rlnVoltage", None),
    "cs_mm": ("rlnSphericalAberration", None),
    "amplitude_contrast": ("rlnAmplitudeContrast", None),
}
CTF_FIELDS = {
    "defocus_u_A": ("rlnDefocusU", None),
    "defocus_v_A": ("rlnDefocusV", "rlnDefocusU"),
    "defocus_angle_deg": ("rlnDefocusAngle", 0.0),
    "phase_shift_deg": ("rlnPhaseShift", 0.0),
    "bfactor_A2": ("rlnCtfBfactor", 0.0),
}
ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")


def read_star(path) -> tuple[pd.DataFrame | None, pd.DataFrame]:
    """Return ``(optics, particles)`` tables of a RELION STAR file (optics is None for 3.0)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file (expected a RELION STAR file)")
    try:
        blocks = starfile.read(path, always_dict=True, parse_as_string=["rlnImageName"])
    except Exception as exc:  # the parser raises many types on malformed text
        raise InputError(path, f"not a readable STAR file ({type(exc).__name__}: {exc})") from None
    tables = {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame)}
    if "particles" in tables:
        particles = tables["particles"]
    else:
        with_images = [t for t in tables.values() if "rlnImageName" in t.columns]
        if not with_images:
            raise InputError(path, "no particle table with an rlnImageName column")
        particles = with_images[0]
    if len(particles) == 0:
        raise InputError(path, "the particle table is empty")
    return tables.get("optics"), particles


def _numeric(table: pd.DataFrame, label: str, where: str) -> np.ndarray:
    values = pd.to_numeric(table[label], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise InputError(f"{where}: field {label}", f"row {int(bad[0]) + 1} has "
                         f"{table[label].iloc[bad[0]]!r}; expected a number")
    return values


def _per_particle(particles, optics, label, default, where, optics_index):
    """A value per particle from the particle table, else its optics group, else the default."""
    if label in particles.columns:
        return _numeric(particles, label, where)
    if optics is not None and label in optics.columns:
        return _numeric(optics, label, f"{where} (data_optics)")[optics_index]
    if isinstance(default, str):
        return _per_particle(particles, optics, default, None, where, optics_index)
    if default is None:
        raise InputError(f"{where}: field {label}", "required column is missing")
    return np.full(len(particles), float(default))


#: RELION's labels of the optics beyond the CTF fit, by store column (:data:`.store.OPTICS_COLUMNS`).
BEAM_TILT_FIELDS = ("rlnBeamTiltX", "rlnBeamTiltY")
ZERNIKE_FIELDS = {"odd_zernike": "rlnOddZernike", "even_zernike": "rlnEvenZernike"}
MAG_MATRIX_FIELDS = ("rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11")


def _zernike_lists(table, label, where) -> list[list[float]]:
    """RELION's Zernike vectors (``[c0,c1,…]`` text, or a number for one coefficient)."""
    out = []
    for i, value in enumerate(table[label].to_list()):
        text = str(value).strip()
        try:
            numbers = [float(v) for v in text.strip("[]").split(",") if v.strip()]
        except ValueError:
            numbers = None
        if numbers is None or not all(np.isfinite(numbers)):
            raise InputError(f"{where}: field {label}", f"row {i + 1} has {text!r}; expected a "
                             "list of numbers like [0.1,-0.2,0.0]")
        out.append(numbers)
    return out


def _aberrations(particles, optics, where, optics_index) -> dict[str, np.ndarray]:
    """Beam tilt, Zernike coefficients, magnification and phase flipping per particle (from
    its own row or its optics group), as the store's :data:`.store.OPTICS_COLUMNS`; only those
    present. CTF-premultiplied images are refused (not a model the engine applies)."""
    out = {}
    for label in ("rlnCtfDataArePhaseFlipped", "rlnCtfDataAreCtfPremultiplied"):
        if not any(t is not None and label in t.columns for t in (particles, optics)):
            continue
        flag = _per_particle(particles, optics, label, 0.0, where, optics_index) != 0
        if not flag.any():
            continue
        if label == "rlnCtfDataAreCtfPremultiplied":
            raise InputError(f"{where}: field {label}", "is 1: dask_refine refines images that "
                             "are not multiplied by their CTF; extract the particles without "
                             "CTF premultiplication")
        out["ctf_phase_flipped"] = flag.astype(np.int8)
    if any(label in t.columns for t in (particles, optics) if t is not None
           for label in BEAM_TILT_FIELDS):
        out["beam_tilt_mrad"] = np.stack([
            _per_particle(particles, optics, label, 0.0, where, optics_index)
            for label in BEAM_TILT_FIELDS], axis=1)
    for column, label in ZERNIKE_FIELDS.items():
        for table, name in ((particles, where), (optics, f"{where} (data_optics)")):
            if table is None or label not in table.columns:
                continue
            rows = _zernike_lists(table, label, name)
            width = max(map(len, rows), default=0)
            values = np.zeros((len(rows), width))
            for i, r in enumerate(rows):
                values[i, :len(r)] = r
            out[column] = values if table is particles else values[optics_index]
            break
    if any(label in t.columns for t in (particles, optics) if t is not None
           for label in MAG_MATRIX_FIELDS):
        identity = dict(zip(MAG_MATRIX_FIELDS, (1.0, 0.0, 0.0, 1.0)))
        out["mag_matrix"] = np.stack([
            _per_particle(particles, optics, label, identity[label], where, optics_index)
            for label in MAG_MATRIX_FIELDS], axis=1).reshape(-1, 2, 2)
    return out


def _optics_index(particles, optics, where) -> np.ndarray:
    if optics is None:
        return np.zeros(len(particles), dtype=np.int64)
    if "rlnOpticsGroup" not in optics.columns:
        raise InputError(f"{where} (data_optics)", "field rlnOpticsGroup is missing")
    groups = _numeric(optics, "rlnOpticsGroup", f"{where} (data_optics)").astype(np.int64)
    mine = (_numeric(particles, "rlnOpticsGroup", where).astype(np.int64)
            if "rlnOpticsGroup" in particles.columns else np.full(len(particles), groups[0]))
    lookup = {g: i for i, g in enumerate(groups)}
    unknown = [g for g in np.unique(mine) if g not in lookup]
    if unknown:
        raise InputError(f"{where}: field rlnOpticsGroup", f"optics group {unknown[0]} is not "
                         "in data_optics")
    return np.array([lookup[g] for g in mine], dtype=np.int64)


def _pixel_sizes_A(particles, optics, where, optics_index, override):
    """``(reference, per_particle)``: the pixel size of the store (``override``, else the first
    optics group's, as RELION's reference) and each particle's image pixel size (its optics
    group's; None when all are the reference's). Optics groups may differ in pixel size, not
    in image size."""
    if optics is not None and "rlnImageSize" in optics.columns:
        sizes = _numeric(optics, "rlnImageSize", f"{where} (data_optics)")[np.unique(optics_index)]
        if np.ptp(sizes) > 0:
            raise InputError(f"{where} (data_optics): field rlnImageSize",
                             f"optics groups have different image sizes ({sizes.min():g} and "
                             f"{sizes.max():g} px); expected one box (re-extract or rescale the "
                             "particles to one box, as RELION's relion_image_handler --new_box)")
    if override:
        return float(override), None
    for table, name in ((particles, where), (optics, f"{where} (data_optics)")):
        if table is None:
            continue
        for label in ("rlnImagePixelSize", "rlnPixelSize"):
            if label in table.columns:
                values = _numeric(table, label, name)
                reference = float(values[0])
                values = values[optics_index] if table is optics else values
                if np.ptp(values) > 1e-4 * values.max():
                    return reference, values.astype(np.float64)
                return reference, None
    if {"rlnDetectorPixelSize", "rlnMagnification"} <= set(particles.columns):  # RELION 3.0
        values = (1e4 * _numeric(particles, "rlnDetectorPixelSize", where)
                  / _numeric(particles, "rlnMagnification", where))
        if np.ptp(values) > 1e-4 * values.max():
            return float(values[0]), values.astype(np.float64)
        return float(values[0]), None
    raise InputError(where, "no pixel size (rlnImagePixelSize in data_optics, or "
                     "rlnDetectorPixelSize and rlnMagnification); give --pixel-size-A")


def import_star(star_path, store_path, chunk_size: int = 1000, pixel_size_A: float | None = None,
                images_root=None, seed: int = 0, progress=None,
                storage_options: dict | None = None, skip_bad: bool = False) -> ParticleStore:
    """Import a RELION STAR file and its image stacks into a new particle store (a folder or
    an fsspec URL; ``storage_options`` for the URL, see :class:`ParticleStore`).

    ``skip_bad``: leave out particles whose image has NaN/Inf pixels (listed inside the store,
    see :func:`.stacks.create_store_with_images`) instead of stopping with an error."""
    star_path = Path(star_path)
    where = str(star_path)
    optics, particles = read_star(star_path)
    if "rlnImageName" not in particles.columns:
        raise InputError(f"{where}: field rlnImageName", "required column is missing")
    n = len(particles)
    oidx = _optics_index(particles, optics, where)
    meta = {}
    for column, (label, default) in {**CTF_FIELDS, **OPTICS_FIELDS}.items():
        meta[column] = _per_particle(particles, optics, label, default, where, oidx)
    meta["optics_group"] = (oidx + 1).astype(np.int32)
    if "rlnRandomSubset" in particles.columns:
        subset = _numeric(particles, "rlnRandomSubset", where).astype(np.int64)
        if not np.isin(subset, (1, 2)).all():
            raise InputError(f"{where}: field rlnRandomSubset", "expected 1 or 2")
        meta["half_set"] = (subset - 1).astype(np.int8)
    angpix, image_px = _pixel_sizes_A(particles, optics, where, oidx, pixel_size_A)
    if image_px is not None:  # optics groups at different pixel sizes (docs/design.md §2)
        meta["image_pixel_size_A"] = image_px
    if all(a in particles.columns for a in ANGLES):
        angles = [_numeric(particles, a, where) for a in ANGLES]
        meta["rotation"] = euler_to_matrix(*angles)
        if {"rlnOriginXAngst", "rlnOriginYAngst"} <= set(particles.columns):
            shift = [_numeric(particles, f"rlnOrigin{c}Angst", where) for c in "XY"]
        elif {"rlnOriginX", "rlnOriginY"} <= set(particles.columns):
            shift = [_numeric(particles, f"rlnOrigin{c}", where)
                     * (angpix if image_px is None else image_px) for c in "XY"]
        else:
            shift = [np.zeros(n), np.zeros(n)]
        meta["shift_A"] = np.stack(shift, axis=1)
    meta.update(_aberrations(particles, optics, where, oidx))
    if "rlnCtfScalefactor" in particles.columns:  # multiplies the CTF: our per-particle scale
        meta["scale"] = _numeric(particles, "rlnCtfScalefactor", where)
    if "rlnClassNumber" in particles.columns:
        meta["class_id"] = _numeric(particles, "rlnClassNumber", where).astype(np.int32) - 1

    image_index, image_files = parse_image_names(particles["rlnImageName"], where)
    resolved = resolve_stacks(image_files, star_path, images_root)
    box = stack_box_size(resolved[image_files[0]])

    optics_records = [] if optics is None else optics.to_dict(orient="records")
    store, keep = create_store_with_images(
        store_path, image_index, image_files, resolved, box, angpix, chunk_size,
        optics=optics_groups(meta, oidx),
        provenance={"created_by": "dask_refine.import_star", "star_file": str(star_path.resolve()),
                    "star_version": "3.0" if optics is None else "3.1"},
        where=where, field="rlnImageName", first_image=1, progress=progress,
        storage_options=storage_options, skip_bad=skip_bad,
        refs={"rlnImageName": particles["rlnImageName"].to_numpy()})
    if not keep.all():  # particles left out (skip_bad): the others' rows only
        meta = {name: values[keep] for name, values in meta.items()}
        store.group.attrs["optics"] = optics_groups(meta, oidx[keep])
    if "half_set" not in meta:
        meta["half_set"] = assign_half_sets(int(keep.sum()), seed)
    for name, values in meta.items():
        store.write_column(name, values)
    for label in particles.columns:
        values = particles[label].to_numpy()[keep]
        if values.dtype.kind not in "iuf":
            values = values.astype(str)
        store.write_column(label, values, group=STAR_GROUP)
    store.group.attrs.update({"star_columns": list(particles.columns),
                              "star_optics": _jsonable(optics_records)})
    return store


def _jsonable(records):
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in records]


#: Per-particle statistics of a refinement's last E-step, under RELION's labels.
POSTERIOR_FIELDS = {"log_likelihood": ("rlnLogLikeliContribution", np.float64),
                    "max_posterior": ("rlnMaxValueProbDistribution", np.float64),
                    "n_significant": ("rlnNrOfSignificantSamples", np.int64)}


def _optics_aberrations(store: ParticleStore, members: np.ndarray) -> dict:
    """An optics group's beam tilt, Zernike, magnification and (where the groups differ)
    pixel size fields (its first particle's values) for a written optics table; empty when the
    store has none."""
    first = int(np.flatnonzero(members)[0])
    extra = store.metadata(OPTICS_COLUMNS, rows=slice(first, first + 1))
    fields = {}
    if "beam_tilt_mrad" in extra:
        fields.update(zip(BEAM_TILT_FIELDS, map(float, extra["beam_tilt_mrad"][0])))
    for column, label in ZERNIKE_FIELDS.items():
        if column in extra:
            fields[label] = "[" + ",".join(repr(float(v)) for v in extra[column][0]) + "]"
    if "mag_matrix" in extra:
        fields.update(zip(MAG_MATRIX_FIELDS, map(float, extra["mag_matrix"][0].ravel())))
    if "ctf_phase_flipped" in extra:
        fields["rlnCtfDataArePhaseFlipped"] = int(extra["ctf_phase_flipped"][0])
    if "image_pixel_size_A" in extra:
        fields["rlnImagePixelSize"] = float(extra["image_pixel_size_A"][0])
    return fields


def export_star(store: ParticleStore, star_path, poses: dict | None = None,
                write_images: bool | None = None) -> Path:
    """Write the store's particles (with ``poses``, or the store's own pose columns) as a RELION
    3.1 STAR file. Original columns of an imported STAR are kept; pose, class and CTF columns are
    written from the store/poses; the per-particle scale goes to ``rlnCtfScalefactor`` (it
    multiplies the CTF in RELION's image model, as our scale does), and a refinement's
    posterior statistics (``log_likelihood``, ``max_posterior``, ``n_significant``) to RELION's
    :data:`POSTERIOR_FIELDS`. Images are referred to where
    they came from: an imported STAR's ``rlnImageName``, or an imported .cs's ``blob/idx`` and
    ``blob/path`` as ``NNNNNN@path`` (1-based, the path relative to the cryoSPARC project, as
    pyem's ``csparc2star`` writes it). Stores without original image files (simulated) get their
    images written to ``<star stem>.mrcs`` beside the STAR, block by block (``write_images``,
    default: when needed).
    """
    star_path = Path(star_path)
    info = store.info
    n = info.n_particles
    attrs = store.attrs
    poses = store.poses(poses)

    columns: dict[str, np.ndarray] = {}
    for label in attrs.get("star_columns", []):
        columns[label] = store.read_column(label, group=STAR_GROUP)
    if "rlnImageName" not in columns:
        names = cs_image_names(store)
        if names is not None:
            columns["rlnImageName"] = names
    if write_images is None:
        write_images = "rlnImageName" not in columns
    if write_images:
        stack = star_path.with_suffix(".mrcs")
        write_stack(stack, store.images, info.pixel_size_A)
        columns["rlnImageName"] = np.array([f"{i + 1:06d}@{stack.name}" for i in range(n)])
    optics_group = store.read_column("optics_group")
    columns["rlnOpticsGroup"] = optics_group.astype(np.int64)
    for column, (label, _) in CTF_FIELDS.items():  # a refinement's refined values, or the filed
        columns[label] = poses[column] if column in poses else store.read_column(column)
    if "rotation" in poses:
        rot, tilt, psi = matrix_to_euler(np.asarray(poses["rotation"], dtype=np.float64))
        columns.update(rlnAngleRot=rot, rlnAngleTilt=tilt, rlnAnglePsi=psi)
    if "shift_A" in poses:
        shift = np.asarray(poses["shift_A"], dtype=np.float64)
        columns.pop("rlnOriginX", None)
        columns.pop("rlnOriginY", None)
        columns.update(rlnOriginXAngst=shift[:, 0], rlnOriginYAngst=shift[:, 1])
    if "class_id" in poses:
        columns["rlnClassNumber"] = np.asarray(poses["class_id"], dtype=np.int64) + 1
    if "scale" in poses:
        columns["rlnCtfScalefactor"] = np.asarray(poses["scale"], dtype=np.float64)
    for key, (label, dtype) in POSTERIOR_FIELDS.items():  # a refinement's posterior statistics
        if key in poses:
            columns[label] = np.asarray(poses[key]).astype(dtype)
    columns["rlnRandomSubset"] = store.read_column("half_set").astype(np.int64) + 1

    optics = pd.DataFrame(attrs.get("star_optics") or [])
    if optics.empty or "rlnImagePixelSize" not in optics.columns:
        groups = [o for o in attrs.get("optics", [])] or [{"optics_group": 1}]
        optics = pd.DataFrame([{
            "rlnOpticsGroupName": f"opticsGroup{g['optics_group']}",
            "rlnOpticsGroup": int(g["optics_group"]),
            "rlnVoltage": float(store.read_column("voltage_kV")[optics_group == g["optics_group"]][0]),
            "rlnSphericalAberration": float(store.read_column("cs_mm")[optics_group == g["optics_group"]][0]),
            "rlnAmplitudeContrast": float(store.read_column("amplitude_contrast")[optics_group == g["optics_group"]][0]),
            "rlnImagePixelSize": info.pixel_size_A,
            "rlnImageSize": info.box_size,
            "rlnImageDimensionality": 2,
            **_optics_aberrations(store, optics_group == g["optics_group"]),
        } for g in groups])
        group_of_row = optics["rlnOpticsGroup"].to_numpy(dtype=np.int64)
    else:  # the imported table: its row i is the store's optics group i + 1
        group_of_row = np.arange(1, len(optics) + 1)
        columns["rlnOpticsGroup"] = optics["rlnOpticsGroup"].to_numpy()[optics_group - 1]
    # a refinement's beam tilt and Zernike coefficients, per optics group (table row)
    refined = {name: np.asarray(poses[name], np.float64) for name in
               ("beam_tilt_mrad", *ZERNIKE_FIELDS, "mag_matrix") if name in poses}
    for row, group in enumerate(group_of_row):
        members = np.flatnonzero(optics_group == group)
        if not members.size:
            continue
        first = members[0]
        if "beam_tilt_mrad" in refined:
            for axis, label in enumerate(BEAM_TILT_FIELDS):
                optics.loc[row, label] = refined["beam_tilt_mrad"][first, axis]
        if "mag_matrix" in refined:
            for value, label in zip(refined["mag_matrix"][first].ravel(), MAG_MATRIX_FIELDS):
                optics.loc[row, label] = value
        for name, label in ZERNIKE_FIELDS.items():
            if name in refined:
                if label not in optics.columns:
                    optics[label] = "[]"
                optics.loc[row, label] = ("[" + ",".join(repr(float(v))
                                                         for v in refined[name][first]) + "]")
    particles = pd.DataFrame(columns)
    star_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = star_path.with_name(f".{star_path.name}.tmp{os.getpid()}")
    starfile.write({"optics": optics, "particles": particles}, tmp, float_format=FLOAT_FORMAT)
    os.replace(tmp, star_path)
    return star_path


#: RELION's MTF file columns (the ``mtf_*.star`` files shipped for each detector).
MTF_FIELDS = ("rlnResolutionInversePixel", "rlnMtfValue")


def read_mtf(path) -> tuple[np.ndarray, np.ndarray]:
    """A detector MTF in RELION's STAR format: ``(frequency in 1/pixel, MTF value)``, ascending
    frequencies, positive values (errors name the file and field)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file (expected a RELION MTF STAR file)")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # the parser raises many types on malformed text
        raise InputError(path, f"not a readable STAR file ({type(exc).__name__}: {exc})") from None
    tables = [t for t in blocks.values() if isinstance(t, pd.DataFrame)
              and set(MTF_FIELDS) <= set(t.columns)]
    if not tables:
        raise InputError(path, f"no table with {' and '.join(MTF_FIELDS)} (expected RELION's "
                         "MTF STAR format)")
    frequency, value = (_numeric(tables[0], label, str(path)) for label in MTF_FIELDS)
    if np.any(np.diff(frequency) <= 0):
        raise InputError(f"{path}: field {MTF_FIELDS[0]}", "expected ascending frequencies")
    if np.any(value <= 1e-10):
        row = int(np.flatnonzero(value <= 1e-10)[0]) + 1
        raise InputError(f"{path}: field {MTF_FIELDS[1]}", f"row {row} has {value[row - 1]:g}; "
                         "expected a positive MTF value")
    return frequency, value
