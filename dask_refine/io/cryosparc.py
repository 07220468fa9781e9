"""cryoSPARC ``.cs`` particle files ↔ particle stores.

A ``.cs`` file is a NumPy structured array written by ``numpy.save`` (cryoSPARC's default
format; cryosparc-tools ``Dataset.save``), one row per particle, with cryoSPARC's field names:
``blob/path`` (the stack, relative to the cryoSPARC project folder, sometimes with a leading
``>``), ``blob/idx`` (0-based image in that stack), ``blob/psize_A``, ``blob/shape``; ``ctf/*``;
``alignments3D/*`` (pose, shift, psize_A, split, alpha, class). The compressed CSDAT format of
cryosparc-tools is read too (converted by ``cryosparc.dataset.Dataset`` in a child process).

Conventions (docs/design.md §2; the same as pyem
``metadata/cryosparc2.py::parse_cryosparc_2_cs`` and cryoDRGN ``commands/parse_pose_csparc.py``,
checked in tests/test_cryosparc.py):

* ``alignments3D/pose`` is a rotation vector v (unit axis × angle in radians). Its Rodrigues
  matrix exp([v]×) is the *transpose* of RELION's Euler matrix: ``A = exp([v]×)ᵀ``.
* ``alignments3D/shift`` is RELION's origin (``rlnOriginX/Y``, same axes and sign) in pixels of
  ``alignments3D/psize_A``: ``shift_A = shift · psize_A``.
* ``ctf/df1_A``, ``ctf/df2_A`` are rlnDefocusU/V (Å); ``ctf/df_angle_rad`` and
  ``ctf/phase_shift_rad`` are RELION's angles in radians; ``ctf/accel_kv``, ``ctf/cs_mm``,
  ``ctf/amp_contrast``, ``ctf/bfactor`` as RELION; ``ctf/exp_group_id`` is the optics group.
* ``alignments3D/split`` is the half set (0/1), ``alignments3D/alpha`` the per-particle scale,
  ``alignments3D/class`` the 0-based class.
* ``ctf/tilt_A`` is the beam tilt as C_s · sin τ in Å (pyem's ``csparc2star``). RELION's optics
  that cryoSPARC has no documented field for travel under RELION's names in :data:`RLN_FIELDS`
  (``rln/odd_zernike``, ``rln/even_zernike``, ``rln/mag_matrix``, ``rln/ctf_phase_flipped``),
  so that STAR → .cs → STAR loses none of them.

Images are copied verbatim (``blob/sign`` is kept but not applied, as pyem and cryoDRGN do).
Every field of the input is kept raw in the store's ``cs/`` group (``cs/blob/path`` … numbers as
they are, strings and other non-numeric fields as their bytes) with the input's dtype in the
attribute ``cs_dtype``; export writes each field back unchanged wherever the store's value is
still the one imported, so .cs → store → .cs gives back every field with identical values and
dtypes. Reading never unpickles: the NumPy header is parsed and checked (object fields are
refused) before the rows are memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from .errors import InputError
from .image_refs import (CS_GROUP, is_native, parse_image_names, raw_cs_dtype,  # noqa: F401
                         raw_cs_key, read_raw_cs)
from .mrc import write_stack
from .stacks import create_store_with_images, optics_groups, resolve_stacks, stack_box_size
from .store import STAR_GROUP, ParticleStore, assign_half_sets, remove_store

NUMPY_MAGIC = b"\x93NUMPY"
CSDAT_MAGIC = b"\x95CSDAT"  # cryosparc-tools ≥ 4.4 compressed stream format
MAX_HEADER_BYTES = 1 << 20
CSDAT_TIMEOUT_S = 600

#: store CTF column → (cs field, default). A default of None means the field is required; a
#: string names the column it defaults to. Units are the same except for ``RADIANS``.
CTF_FIELDS = {
    "defocus_u_A": ("ctf/df1_A", None),
    "defocus_v_A": ("ctf/df2_A", "defocus_u_A"),
    "defocus_angle_deg": ("ctf/df_angle_rad", 0.0),
    "phase_shift_deg": ("ctf/phase_shift_rad", 0.0),
    "bfactor_A2": ("ctf/bfactor", 0.0),
    "voltage_kV": ("ctf/accel_kv", None),
    "cs_mm": ("ctf/cs_mm", None),
    "amplitude_contrast": ("ctf/amp_contrast", None),
}
#: RELION optics with no cryoSPARC field: store column → .cs field (written only when present).
RLN_FIELDS = {"odd_zernike": "rln/odd_zernike", "even_zernike": "rln/even_zernike",
              "mag_matrix": "rln/mag_matrix", "ctf_phase_flipped": "rln/ctf_phase_flipped"}
#: cryoSPARC's higher-order optics, refused when not zero (never silently dropped).
UNAPPLIED_CS_OPTICS = {"ctf/shift_A": (2,), "ctf/trefoil_A": (2,), "ctf/tetra_A": (4,),
                       "ctf/anisomag": (4,)}
RADIANS = ("defocus_angle_deg", "phase_shift_deg")  # degrees in the store, radians in .cs

_NAME_PART = re.compile(r"[A-Za-z0-9_]+\Z")


# ---- reading ----------------------------------------------------------------------------------
def read_cs(path) -> np.ndarray:
    """The particle table of a ``.cs`` file: a read-only structured array ``(N,)`` with the
    file's own dtype (memory-mapped for the NumPy format).

    Never unpickles: object fields are refused with :class:`InputError`, as are non-structured,
    empty or truncated arrays and field names that are not cryoSPARC's (``prefix/name``).
    """
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise InputError(path, "no such file (expected a cryoSPARC .cs particle file)")
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic == CSDAT_MAGIC:
        table = _read_csdat(path, where)
    elif magic == NUMPY_MAGIC:
        table = _read_numpy(path, where, mmap=True)
    else:
        raise InputError(path, f"not a cryoSPARC .cs file (starts with {magic!r}; expected a "
                         "NumPy structured array, b'\\x93NUMPY', or cryosparc-tools' CSDAT "
                         "format, b'\\x95CSDAT')")
    _check_names(table.dtype.names, where)
    return table


def _read_numpy(path: Path, where: str, mmap: bool) -> np.ndarray:
    fmt = np.lib.format
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            version = fmt.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(fh, max_header_size=MAX_HEADER_BYTES)
            elif version == (2, 0):
                shape, _, dtype = fmt.read_array_header_2_0(fh, max_header_size=MAX_HEADER_BYTES)
            else:
                raise InputError(where, f"NumPy format version {version[0]}.{version[1]}; "
                                 "expected 1.0 or 2.0 (cryoSPARC field names are ASCII)")
            offset = fh.tell()
    except InputError:
        raise
    except Exception as exc:  # numpy raises several types for a damaged header
        raise InputError(where, f"not a readable .cs file (NumPy header: {type(exc).__name__}: "
                         f"{exc})") from None
    if dtype.hasobject:
        bad = [k for k in dtype.names or () if dtype.fields[k][0].hasobject]
        raise InputError(f"{where}: field {bad[0]}" if bad else where,
                         "holds Python objects (dtype object), which would have to be unpickled;"
                         " refused (.cs files are read with allow_pickle=False); expected numbers"
                         " or fixed-length strings")
    if dtype.names is None:
        raise InputError(where, f"holds a plain {dtype} array; expected a structured array with "
                         "cryoSPARC fields (blob/path, ctf/df1_A, …)")
    if len(shape) != 1:
        raise InputError(where, f"array shape is {shape}; expected one row per particle (N,)")
    if shape[0] == 0:
        raise InputError(where, "has no particles (0 rows)")
    if dtype.itemsize == 0:
        raise InputError(where, "rows hold no data (0 bytes per row)")
    expected = offset + shape[0] * dtype.itemsize
    if size < expected:
        raise InputError(where, f"is truncated: {size} bytes; its header promises {expected} "
                         f"({shape[0]} rows of {dtype.itemsize} bytes)")
    try:
        if mmap:
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(shape[0],))
        with open(path, "rb") as fh:
            fh.seek(offset)
            return np.fromfile(fh, dtype=dtype, count=shape[0])
    except Exception as exc:
        raise InputError(where, f"not a readable .cs file ({type(exc).__name__}: {exc})") from None


_CSDAT_TO_NUMPY = ("import sys; from cryosparc.dataset import Dataset, NUMPY_FORMAT; "
                   "Dataset.load(sys.argv[1]).save(sys.argv[2], format=NUMPY_FORMAT)")


def _read_csdat(path: Path, where: str) -> np.ndarray:
    """CSDAT → NumPy format by cryosparc-tools in a child process: its compiled reader can crash
    on a damaged file, which must end as an InputError, not end this process."""
    with tempfile.TemporaryDirectory(prefix="dask_refine_csdat_") as tmp:
        out = Path(tmp) / "table.cs"
        try:
            run = subprocess.run([sys.executable, "-P", "-c", _CSDAT_TO_NUMPY, str(path), str(out)],
                                 capture_output=True, text=True, timeout=CSDAT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise InputError(where, f"reading the CSDAT .cs file took over {CSDAT_TIMEOUT_S} s; "
                             "expected a readable cryosparc-tools dataset") from None
        if run.returncode != 0 or not out.is_file():
            lines = [ln for ln in run.stderr.strip().splitlines() if ln.strip()]
            why = (f"its reader crashed (signal {-run.returncode})" if run.returncode < 0 else
                   lines[-1] if lines else f"its reader exited with status {run.returncode}")
            raise InputError(where, f"not a readable CSDAT .cs file (cryosparc-tools: {why})")
        return _read_numpy(out, where, mmap=False)


def _check_names(names, where: str) -> None:
    seen = set(names)
    for name in names:
        parts = name.split("/")
        if not all(_NAME_PART.match(p) and not p.startswith("__") for p in parts):
            raise InputError(f"{where}: field {name!r}", "is not a cryoSPARC field name; expected "
                             "names like 'ctf/df1_A' (letters, digits and '_', separated by '/')")
        for k in range(1, len(parts)):
            if "/".join(parts[:k]) in seen:
                raise InputError(f"{where}: field {name!r}", f"clashes with field "
                                 f"{'/'.join(parts[:k])!r}; expected distinct field paths")


def _describe(ft: np.dtype) -> str:
    return f"{ft.base} {ft.shape}" if ft.shape else str(ft.base)


def _field(table: np.ndarray, name: str, where: str, kinds: str = "iuf", shape=(),
           expected: str = "a number", required: bool = False) -> np.ndarray | None:
    """One field as an in-memory array, after checking its dtype (None when absent)."""
    if name not in table.dtype.names:
        if required:
            raise InputError(f"{where}: field {name}", "required field is missing")
        return None
    ft = table.dtype.fields[name][0]
    if ft.base.kind not in kinds or ft.base.fields is not None or ft.shape != shape:
        raise InputError(f"{where}: field {name}", f"has dtype {_describe(ft)}; expected "
                         f"{expected}")
    return np.array(table[name])


def _finite(table, name, where, shape=(), expected="a number", required=False, positive=False):
    values = _field(table, name, where, "iuf", shape, expected, required)
    if values is None:
        return None
    values = values.astype(np.float64)
    ok = np.isfinite(values).reshape(len(values), -1).all(axis=1)
    if positive:
        ok &= (values > 0).reshape(len(values), -1).all(axis=1)
    bad = np.flatnonzero(~ok)
    if bad.size:
        raise InputError(f"{where}: field {name}", f"row {int(bad[0]) + 1} has "
                         f"{table[name][bad[0]].tolist()!r}; expected "
                         f"{'a positive' if positive else 'a'}"
                         f" finite {expected.removeprefix('a ')}")
    return values


def _integers(table, name, where, low=0, high=2**31 - 1, expected="an integer"):
    values = _field(table, name, where, "iu", (), expected)
    if values is None:
        return None
    bad = np.flatnonzero((values < low) | (values > high))
    if bad.size:
        raise InputError(f"{where}: field {name}", f"row {int(bad[0]) + 1} has "
                         f"{values[bad[0]].tolist()!r}; expected {expected}")
    return values.astype(np.int64)


def rotation_from_pose(pose) -> np.ndarray:
    """cryoSPARC rotation vectors ``(N, 3)`` (radians) → RELION matrices ``(N, 3, 3)``:
    ``A = exp([v]×)ᵀ`` (pyem ``geom.expmap`` builds the transposed matrix directly; cryoDRGN
    ``parse_pose_csparc`` transposes ``lie_tools.expmap``)."""
    return Rotation.from_rotvec(np.asarray(pose, np.float64)).as_matrix().transpose(0, 2, 1)


def pose_from_rotation(rotation) -> np.ndarray:
    """RELION matrices ``(N, 3, 3)`` → cryoSPARC rotation vectors ``(N, 3)``, angle in [0, π]."""
    return Rotation.from_matrix(np.asarray(rotation, np.float64).transpose(0, 2, 1)).as_rotvec()


def _columns(table: np.ndarray, where: str, pixel_size_A) -> dict[str, np.ndarray]:
    """Store columns from a .cs table (only those the table has; no half sets if no split);
    ``pixel_size_A`` (a number or one per particle) converts shifts without their own."""
    n = len(table)
    meta: dict[str, np.ndarray] = {}
    for column, (field, default) in CTF_FIELDS.items():
        values = _finite(table, field, where, required=default is None)
        if values is None:
            values = meta[default] if isinstance(default, str) else np.full(n, float(default))
        elif column in RADIANS:
            values = np.rad2deg(values)
        meta[column] = values
    tilt = _finite(table, "ctf/tilt_A", where, (2,), "a beam tilt (2 numbers, Å)")
    if tilt is not None and np.any(tilt != 0):
        # cryoSPARC's tilt in Å is Cs·sin(τ) (pyem csparc2star's conversion to mrad)
        meta["beam_tilt_mrad"] = 1e3 * np.arcsin(
            tilt / (meta["cs_mm"][:, None] * 1e7))
    for field, shape in UNAPPLIED_CS_OPTICS.items():
        values = _finite(table, field, where, shape, f"{shape[0]} numbers")
        if values is not None and np.any(values != 0):
            raise InputError(f"{where}: field {field}", "is not zero, and dask_refine cannot "
                             "apply it yet (cryoSPARC's convention for it is not published); "
                             "refine without it, or convert the file to a RELION STAR with "
                             "CtfRefine's Zernike coefficients")
    for column, field in RLN_FIELDS.items():  # RELION's optics, as our export writes them
        if field in table.dtype.names:
            shape = table.dtype.fields[field][0].shape
            meta[column] = _finite(table, field, where, shape, "numbers")
    groups = _integers(table, "ctf/exp_group_id", where, high=2**32 - 1)
    meta["optics_group"] = (np.ones(n, np.int32) if groups is None else
                            (np.unique(groups, return_inverse=True)[1] + 1).astype(np.int32))
    split = _integers(table, "alignments3D/split", where, high=1, expected="0 or 1 (half set)")
    if split is not None:
        meta["half_set"] = split.astype(np.int8)
    pose = _finite(table, "alignments3D/pose", where, (3,), "a rotation vector (3 numbers)")
    if pose is not None:
        meta["rotation"] = rotation_from_pose(pose)
        shift = _finite(table, "alignments3D/shift", where, (2,), "a shift (2 numbers, pixels)")
        psize = _finite(table, "alignments3D/psize_A", where, expected="a pixel size (Å)",
                        positive=True)
        psize = np.full(n, pixel_size_A) if psize is None else psize
        meta["shift_A"] = np.zeros((n, 2)) if shift is None else shift * psize[:, None]
    alpha = _finite(table, "alignments3D/alpha", where, expected="a scale factor")
    if alpha is not None:
        meta["scale"] = alpha
    cls = _integers(table, "alignments3D/class", where, expected="a class number ≥ 0")
    if cls is not None:
        meta["class_id"] = cls.astype(np.int32)
    return meta


def _pixel_sizes(table, where) -> np.ndarray | None:
    return _finite(table, "blob/psize_A", where, expected="a pixel size (Å)", positive=True)


def _pixel_sizes_A(table, where, override):
    """``(reference, per_particle)``: the store's pixel size (``override``, else the first
    particle's ``blob/psize_A``) and each particle's (None when all are the reference's), as
    :func:`.star.import_star` reads optics groups at different pixel sizes."""
    if override:
        return float(override), None
    values = _pixel_sizes(table, where)
    if values is None:
        raise InputError(f"{where}: field blob/psize_A", "required field is missing (or give "
                         "--pixel-size-A)")
    if np.ptp(values) > 1e-4 * values.max():
        return float(values[0]), values.astype(np.float64)
    return float(values[0]), None


def image_refs(table, where) -> tuple[np.ndarray, list[str]]:
    """``(blob/idx, blob/path)`` of a .cs table: 0-based image indices and stack paths (leading
    ``>`` removed); ``where`` names the file in errors."""
    paths = _field(table, "blob/path", where, "SU", (), "a path (string)", required=True)
    index = _integers(table, "blob/idx", where, high=2**62,
                      expected="a 0-based image index ≥ 0")
    if index is None:
        raise InputError(f"{where}: field blob/idx", "required field is missing")
    files = []
    for i, p in enumerate(paths):
        text = os.fsdecode(p) if isinstance(p, bytes) else str(p)
        text = text.strip().removeprefix(">")
        if not text:
            raise InputError(f"{where}: field blob/path", f"row {i + 1} is empty; expected the "
                             "path of an MRC stack")
        files.append(text)
    return index, files


def _check_blob_shape(table, where, box: int) -> None:
    shape = _field(table, "blob/shape", where, "iu", (2,), "an image shape (2 integers)")
    if shape is None:
        return
    bad = np.flatnonzero((shape != box).any(axis=1))
    if bad.size:
        raise InputError(f"{where}: field blob/shape", f"row {int(bad[0]) + 1} is "
                         f"{shape[bad[0]].tolist()}; expected [{box}, {box}] (the images' size)")


# ---- import -----------------------------------------------------------------------------------
def import_cs(cs_path, store_path, chunk_size: int = 1000, images_root=None,
              pixel_size_A: float | None = None, progress=None, seed: int = 0,
              storage_options: dict | None = None, skip_bad: bool = False) -> ParticleStore:
    """Import a cryoSPARC ``.cs`` particle file and its MRC stacks into a new particle store
    (a folder or an fsspec URL; ``storage_options`` for the URL, see :class:`ParticleStore`).

    ``blob/path`` is looked up under ``images_root``, then in the .cs file's folder and its
    parents (the cryoSPARC project folder), then in the working folder; ``blob/idx`` is 0-based.
    Poses come from ``alignments3D/*`` when ``alignments3D/pose`` is present (module docstring);
    half sets from ``alignments3D/split``, else random and balanced (``seed``). Every field is
    also kept raw under ``cs/`` for :func:`export_cs`. ``progress``: callable ``(done, total)``.
    ``skip_bad``: leave out particles whose image has NaN/Inf pixels (listed inside the store,
    see :func:`.stacks.create_store_with_images`) instead of stopping with an error.
    """
    cs_path = Path(cs_path)
    where = str(cs_path)
    table = read_cs(cs_path)
    angpix, image_px = _pixel_sizes_A(table, where, pixel_size_A)
    meta = _columns(table, where, angpix if image_px is None else image_px)
    if image_px is not None:  # particles at different pixel sizes (docs/design.md §2)
        meta["image_pixel_size_A"] = image_px
    image_index, image_files = image_refs(table, where)
    resolved = resolve_stacks(image_files, cs_path, images_root, field="blob/path")
    box = stack_box_size(resolved[image_files[0]])
    _check_blob_shape(table, where, box)
    refs = {"uid": table["uid"]} if "uid" in (table.dtype.names or ()) else {}
    refs.update({"blob/path": image_files, "blob/idx": image_index})
    store, keep = create_store_with_images(
        store_path, image_index, image_files, resolved, box, angpix, chunk_size,
        optics=optics_groups(meta, meta["optics_group"] - 1),
        provenance={"created_by": "dask_refine.import_cs", "cs_file": str(cs_path.resolve())},
        where=where, field="blob/idx", first_image=0, progress=progress,
        storage_options=storage_options, skip_bad=skip_bad, refs=refs)
    try:
        if not keep.all():  # particles left out (skip_bad): the others' rows only
            meta = {name: values[keep] for name, values in meta.items()}
            table = table[keep]
            store.group.attrs["optics"] = optics_groups(meta, meta["optics_group"] - 1)
        meta.setdefault("half_set", assign_half_sets(len(table), seed))
        for name, values in meta.items():
            store.write_column(name, values)
        _write_raw(store, table)
    except BaseException:
        remove_store(store_path, storage_options)  # our own half-made store, never the input
        raise
    return store


def _write_raw(store: ParticleStore, table: np.ndarray) -> None:
    n = len(table)
    for name in table.dtype.names:
        ft = table.dtype.fields[name][0]
        if ft.itemsize == 0:
            continue
        values = np.ascontiguousarray(table[name])
        if is_native(ft):
            values = values.astype(ft.base.newbyteorder("="))
        else:  # strings, dates, nested records: their bytes, exactly
            values = values.view(np.uint8).reshape(n, -1)
        group, leaf = raw_cs_key(name)
        store.write_column(leaf, values, group=group)
    store.group.attrs["cs_dtype"] = repr(np.lib.format.dtype_to_descr(table.dtype))


# ---- export -----------------------------------------------------------------------------------
def export_cs(store: ParticleStore, cs_path, poses: dict | None = None,
              write_images: bool | None = None, stack_path=None) -> Path:
    """Write the store's particles (with ``poses``, or the store's own pose columns) as a
    cryoSPARC ``.cs`` file (NumPy format, loadable by cryosparc-tools ``Dataset.load``).

    ``poses`` is the dict :func:`..star.export_star` takes: ``rotation`` (N, 3, 3) RELION
    matrices, ``shift_A`` (N, 2), ``scale`` (N,), ``class_id`` (N,). A store imported from .cs
    gets every original field back, unchanged where its value is still the imported one; other
    stores get ``uid``, ``blob/*``, ``ctf/*`` and, with poses, ``alignments3D/*``. Image
    references come from the .cs or STAR the store was imported from; otherwise (simulated
    stores) the images are written to ``<cs stem>.mrcs`` beside the .cs (``write_images``,
    default: when needed), unless ``stack_path`` names a stack that already holds them in order
    (then ``blob/path`` refers to it, relative to the .cs). Written atomically (temporary name,
    then rename).
    """
    cs_path = Path(cs_path)
    info = store.info
    n = info.n_particles
    px = info.pixel_size_A
    poses = store.poses(poses)
    current = {name: store.read_column(name) for name in (*CTF_FIELDS, "optics_group",
                                                           "half_set")}
    current.update(poses)

    raw = read_raw_cs(store)
    raw_names = () if raw is None else raw.dtype.names
    derived = {} if raw is None else _columns(raw, f"{store.path} ({CS_GROUP}/)", px)
    if raw is not None and "blob/psize_A" in raw_names:
        derived["pixel_size_A"] = _pixel_sizes(raw, str(store.path))
    current["pixel_size_A"] = store.image_pixel_sizes()
    fields: dict[str, np.ndarray] = {}
    types: dict[str, tuple] = {}  # new fields, or fields whose dtype had to change

    def unchanged(column: str) -> np.ndarray | None:
        """Rows whose store value is still the one derived from the raw .cs field(s)."""
        if column not in derived or column not in current:
            return None
        a, b = np.asarray(derived[column]), np.asarray(current[column])
        return (a == b).reshape(n, -1).all(axis=1)

    def emit(name: str, values, dtype, same: np.ndarray | None = None) -> None:
        values = np.asarray(values)
        trailing = values.shape[1:]
        if name in raw_names:
            ft = raw.dtype.fields[name][0]
            if ft.shape != trailing or not _same_kind(ft.base.kind, np.dtype(dtype).kind):
                return  # a field we did not interpret on import: keep it as it was
            base = ft.base
            if base.kind in "SU" and _length(values.dtype) > _length(base):  # longer strings
                base = np.dtype(f"{base.kind}{_length(values.dtype)}")
                types[name] = (base.str,) + ((ft.shape,) if ft.shape else ())
            out = values.astype(base)
            if same is not None:
                out[same] = raw[name][same]
        else:
            out = values.astype(dtype)
            types[name] = (out.dtype.str,) + ((trailing,) if trailing else ())
        fields[name] = out

    if "uid" not in raw_names:
        emit("uid", _uids(store), np.uint64)
    if write_images or not {"blob/path", "blob/idx"} <= set(raw_names):
        index, paths = _image_refs_for_export(store, cs_path, write_images, stack_path)
        emit("blob/path", np.array([os.fsencode(p) for p in paths]), "S")
        emit("blob/idx", index, np.uint32)
    if "blob/shape" not in raw_names:
        emit("blob/shape", np.full((n, 2), info.box_size), np.uint32)
    emit("blob/psize_A", current["pixel_size_A"], np.float32, unchanged("pixel_size_A"))
    for column, (field, _) in CTF_FIELDS.items():
        values = np.deg2rad(current[column]) if column in RADIANS else current[column]
        emit(field, values, np.float32, unchanged(column))
    if raw is None:  # cryoSPARC's CTF scale is not ours (alignments3D/alpha is): neutral
        emit("ctf/scale", np.ones(n), np.float32)
    emit("ctf/exp_group_id", current["optics_group"], np.uint32, unchanged("optics_group"))
    if "beam_tilt_mrad" in poses or store.has_column("beam_tilt_mrad"):
        # refined or filed; Cs·sin(τ) in Å, the inverse of the import's conversion
        current["beam_tilt_mrad"] = (poses["beam_tilt_mrad"] if "beam_tilt_mrad" in poses
                                     else store.read_column("beam_tilt_mrad"))
        emit("ctf/tilt_A", current["cs_mm"][:, None] * 1e7
             * np.sin(1e-3 * current["beam_tilt_mrad"]), np.float32, unchanged("beam_tilt_mrad"))
    for column, field in RLN_FIELDS.items():  # refined (poses) or filed
        if column in poses or store.has_column(column):
            current[column] = poses[column] if column in poses else store.read_column(column)
            emit(field, current[column], np.int8 if column == "ctf_phase_flipped"
                 else np.float64, unchanged(column))

    if "rotation" in poses or "alignments3D/split" in raw_names:
        emit("alignments3D/split", current["half_set"], np.uint32, unchanged("half_set"))
    if "rotation" in poses:
        emit("alignments3D/pose", pose_from_rotation(poses["rotation"]), np.float32,
             unchanged("rotation"))
        shift_A = np.asarray(poses.get("shift_A", np.zeros((n, 2))), np.float64)
        current["shift_A"] = shift_A
        same = unchanged("shift_A")
        emit("alignments3D/shift", shift_A / current["pixel_size_A"][:, None], np.float32, same)
        emit("alignments3D/psize_A", current["pixel_size_A"], np.float32, same)
        if "scale" in poses:
            emit("alignments3D/alpha", poses["scale"], np.float32, unchanged("scale"))
        class_id = np.asarray(poses.get("class_id", np.zeros(n)), np.int64)
        current["class_id"] = class_id
        same = unchanged("class_id")
        emit("alignments3D/class", class_id, np.uint32, same)
        emit("alignments3D/class_posterior", np.ones(n), np.float32, same)
    elif "scale" in poses:
        emit("alignments3D/alpha", poses["scale"], np.float32, unchanged("scale"))

    table = _assemble(raw, fields, types, n)
    cs_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cs_path.with_name(f".{cs_path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:  # a file object: np.save would add ".npy" to a name
            np.save(fh, table, allow_pickle=False)
        os.replace(tmp, cs_path)
    finally:
        tmp.unlink(missing_ok=True)
    return cs_path


def _length(dt: np.dtype) -> int:
    """Characters of a fixed-length string dtype (S: 1 byte each, U: 4)."""
    return dt.itemsize // (4 if dt.kind == "U" else 1)


def _same_kind(a: str, b: str) -> bool:
    return (a in "biuf" and b in "biuf") or (a in "SU" and b in "SU")


def _assemble(raw, fields: dict, types: dict, n: int) -> np.ndarray:
    """The output table: the raw fields in their order and dtypes (with ``types`` overriding),
    then the new fields in the order they were emitted."""
    descr = [] if raw is None else list(np.lib.format.dtype_to_descr(raw.dtype))
    names = {entry[0] for entry in descr}
    descr = [(entry[0],) + types[entry[0]] if entry[0] in types else entry for entry in descr]
    descr += [(name,) + types[name] for name in fields if name not in names]
    table = np.zeros(n, dtype=np.lib.format.descr_to_dtype(descr))
    for name in table.dtype.names:
        table[name] = fields[name] if name in fields else raw[name]
    return table


def _uids(store: ParticleStore) -> np.ndarray:
    """Random 64-bit particle uids, the same for every export of one store."""
    provenance = json.dumps(store.attrs.get("provenance", {}), sort_keys=True, default=str)
    seed = int.from_bytes(hashlib.sha256(provenance.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).integers(0, 2**64 - 1, store.info.n_particles,
                                                dtype=np.uint64, endpoint=True)


def _image_refs_for_export(store: ParticleStore, cs_path: Path, write_images,
                           stack_path=None):
    """(0-based index, stack path) per particle: the imported STAR's ``rlnImageName``, else
    ``stack_path`` (a stack already holding the store's images in order, e.g. the one
    :func:`..star.export_star` wrote beside the STAR), else a new ``<cs stem>.mrcs`` holding the
    store's images (written block by block)."""
    star_columns = store.attrs.get("star_columns", [])
    if not write_images and "rlnImageName" in star_columns:
        names = store.read_column("rlnImageName", group=STAR_GROUP)
        return parse_image_names(names, f"{store.path}/{STAR_GROUP}")
    n = store.info.n_particles
    if stack_path is not None and not write_images:
        stack = Path(stack_path)
        rel = os.path.relpath(stack, cs_path.parent)
        return np.arange(n), [Path(rel).as_posix()] * n
    stack = cs_path.with_suffix(".mrcs")
    write_stack(stack, store.images, store.info.pixel_size_A)
    return np.arange(n), [stack.name] * n
