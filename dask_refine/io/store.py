"""The particle store: a Zarr v3 group with the image stack and per-particle metadata.

Layout (docs/design.md §4)::

    store.zarr/
      images            (N, D, D) float32, chunked (chunk_size, D, D)
      defocus_u_A, defocus_v_A, defocus_angle_deg, phase_shift_deg, bfactor_A2,
      voltage_kV, cs_mm, amplitude_contrast       (N,) float64   CTF, per particle
      optics_group (N,) int32, half_set (N,) int8  (0 = half A, 1 = half B; fixed at import)
      beam_tilt_mrad (N, 2), odd_zernike (N, C), even_zernike (N, C), mag_matrix (N, 2, 2),
      image_pixel_size_A (N,)
                        optional optics beyond the CTF fit (RELION's optics group fields)
      rotation (N, 3, 3), shift_A (N, 2), scale (N,), class_id (N,)   poses, when known
      ground_truth/     the simulator's truth (rotation, shift_A, scale, …), never read by jobs
      star/             the original STAR particle columns, kept for a lossless export
    attributes: format, format_version, pixel_size_A, box_size, n_particles, optics, provenance

``rotation`` holds RELION matrices (docs/design.md §2); ``shift_A`` holds RELION's origin
(rlnOriginXAngst, rlnOriginYAngst): the particle is centred by translating the image by +shift.
Stores are opened read-only by jobs; the input is never modified.

A store may live on an object store: any fsspec URL (``s3://bucket/p.zarr``, ``gs://…``) is handed
to zarr's own fsspec support (``zarr.storage.FsspecStore``) as it is; chunks are read from the
object store on demand and never copied locally. Credentials and endpoints come from the standard
places (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_ENDPOINT_URL``, ``~/.aws``, instance
roles, fsspec's config) or an explicit ``storage_options`` dict. The Dask graph holds the zarr
array, which pickles as the URL plus its options: each worker re-opens the object store itself, so
workers need the same credentials (their own environment or IAM role; see docs/design-notes.md).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..core.aberrations import model_aberrations
from .errors import InputError

FORMAT = "dask_refine.particles"
FORMAT_VERSION = 1

#: Per-particle columns: name → (dtype, trailing shape).
COLUMNS: dict[str, tuple[str, tuple[int, ...]]] = {
    "defocus_u_A": ("float64", ()),
    "defocus_v_A": ("float64", ()),
    "defocus_angle_deg": ("float64", ()),
    "phase_shift_deg": ("float64", ()),
    "bfactor_A2": ("float64", ()),
    "voltage_kV": ("float64", ()),
    "cs_mm": ("float64", ()),
    "amplitude_contrast": ("float64", ()),
    "optics_group": ("int32", ()),
    "half_set": ("int8", ()),
    "rotation": ("float64", (3, 3)),
    "shift_A": ("float64", (2,)),
    "scale": ("float64", ()),
    "class_id": ("int32", ()),
    "beam_tilt_mrad": ("float64", (2,)),
    "mag_matrix": ("float64", (2, 2)),
    "ctf_phase_flipped": ("int8", ()),
    "image_pixel_size_A": ("float64", ()),
    "source_row": ("int64", ()),
}
CTF_COLUMNS = ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "phase_shift_deg",
               "bfactor_A2", "voltage_kV", "cs_mm", "amplitude_contrast")
REQUIRED_COLUMNS = CTF_COLUMNS + ("half_set",)
#: Optional optics beyond the CTF fit (RELION's optics group fields, per particle as imported):
#: beam tilt (τx, τy) in mrad, odd and even Zernike coefficients ``(N, C)`` in RELION's order,
#: the 2×2 magnification matrix (see :mod:`dask_refine.core.aberrations`), whether the
#: images were phase-flipped (RELION's ``rlnCtfDataArePhaseFlipped``: the model's CTF is |CTF|),
#: and the image pixel size of each particle's optics group where the groups differ (the
#: store's ``pixel_size_A`` is then the first group's, the reference's, as in RELION).
OPTICS_COLUMNS = ("beam_tilt_mrad", "odd_zernike", "even_zernike", "mag_matrix",
                  "ctf_phase_flipped", "image_pixel_size_A")
GROUND_TRUTH = "ground_truth"
POSE_COLUMNS = ("rotation", "shift_A", "scale", "class_id")  # what a job refines and exports
STAR_GROUP = "star"


def is_url(path) -> bool:
    """Whether ``path`` is an fsspec URL (``s3://…``, ``gs://…``, ``file://…``), not a local path.

    URLs must stay strings: ``Path("s3://b/p.zarr")`` collapses the ``//``."""
    return isinstance(path, str) and "://" in path


def store_location(path) -> str:
    """``path`` as zarr should see it: a URL unchanged, a local path as a plain string."""
    return path if is_url(path) else os.fspath(path)


def url_filesystem(url: str, storage_options: dict | None):
    """The fsspec filesystem and root path of ``url`` (a clear error when its backend is
    missing)."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as exc:
        raise InputError(url, f"{exc}; object-store URLs need the cloud extra: "
                         "pip install 'dask-refine[cloud]'") from None
    except ValueError as exc:  # fsspec: "Protocol not known: …"
        raise InputError(url, f"not a usable store URL ({exc})") from None


def _url_exists(url: str, storage_options: dict | None) -> bool:
    fs, root = url_filesystem(url, storage_options)
    try:
        return bool(fs.exists(root))
    except Exception as exc:  # credentials, endpoint, network: say which store we could not reach
        raise InputError(url, f"cannot reach the object store ({type(exc).__name__}: {exc})") \
            from None


def _zarr_options(path, storage_options: dict | None) -> dict:
    if storage_options and not is_url(path):
        raise InputError(path, "storage_options are only used with an object-store URL")
    return {"storage_options": storage_options} if is_url(path) else {}


def remove_store(path, storage_options: dict | None = None) -> None:
    """Delete a (half-made) store that we created: a local folder or everything under a URL."""
    if is_url(path):
        fs, root = url_filesystem(path, storage_options)
        try:
            fs.rm(root, recursive=True)
        except FileNotFoundError:
            pass
    else:
        shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class StoreInfo:
    """Attributes of a particle store."""

    n_particles: int
    box_size: int
    pixel_size_A: float
    chunk_size: int


class ParticleStore:
    """A particle store on local disk or at an fsspec URL. Use :meth:`create` / :meth:`open`.

    ``path`` is kept exactly as given (a URL stays a URL) so that messages and job records name
    the store as the user did."""

    def __init__(self, group: zarr.Group, path, storage_options: dict | None = None):
        self.group = group
        self.path = path
        self.storage_options = storage_options
        # group name (None: top level) → its arrays, listed once: on an object store every
        # listing costs a request per member, and jobs ask for columns many times
        self._arrays: dict[str | None, dict[str, zarr.Array]] = {}

    def _group_arrays(self, group: str | None = None) -> dict[str, zarr.Array]:
        if group not in self._arrays:
            g = self.group if group is None else self.group.get(group)
            self._arrays[group] = {} if g is None else dict(g.arrays())
        return self._arrays[group]

    # ---- creation and opening -------------------------------------------------------------
    @classmethod
    def create(cls, path, n_particles: int, box_size: int, pixel_size_A: float,
               chunk_size: int = 1000, optics: list[dict] | None = None,
               provenance: dict | None = None,
               storage_options: dict | None = None) -> "ParticleStore":
        """Create a new, empty store (refuses to overwrite an existing path or URL).

        ``path``: a local folder or an fsspec URL; ``storage_options``: fsspec options for a URL
        (endpoint, credentials, …), by default taken from the environment."""
        exists = (_url_exists(path, storage_options) if is_url(path)
                  else Path(path).exists())
        if exists:
            raise InputError(path, "already exists; choose a new store path (inputs are never "
                             "overwritten)")
        if n_particles < 1:
            raise InputError(path, "no particles to store (expected at least 1)")
        if box_size % 2:
            raise InputError(path, f"box size {box_size} is odd; expected an even box")
        group = zarr.open_group(store_location(path), mode="w-",
                                **_zarr_options(path, storage_options))
        group.attrs.update({
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "n_particles": int(n_particles), "box_size": int(box_size),
            "pixel_size_A": float(pixel_size_A), "optics": optics or [],
            "provenance": provenance or {},
        })
        chunk = int(max(1, min(chunk_size, n_particles)))
        group.create_array("images", shape=(n_particles, box_size, box_size),
                           chunks=(chunk, box_size, box_size), dtype="float32")
        return cls(group, path, storage_options)

    @classmethod
    def open(cls, path, mode: str = "r", storage_options: dict | None = None) -> "ParticleStore":
        """Open an existing store (a local folder or an fsspec URL, see :meth:`create`);
        ``mode='r'`` (default) guarantees it is not modified."""
        exists = (_url_exists(path, storage_options) if is_url(path)
                  else Path(path).exists())
        if not exists:
            raise InputError(path, "no such particle store")
        try:
            group = zarr.open_group(store_location(path), mode=mode,
                                    **_zarr_options(path, storage_options))
        except InputError:
            raise
        except Exception as exc:  # zarr raises several types for a non-store path
            raise InputError(path, f"not a Zarr particle store ({exc})") from None
        if group.attrs.get("format") != FORMAT:
            raise InputError(path, f"attribute 'format' is {group.attrs.get('format')!r}; "
                             f"expected {FORMAT!r} (create stores with dask-refine simulate or "
                             "import-star)")
        store = cls(group, path, storage_options)
        store._validate()
        return store

    def _validate(self) -> None:
        info = self.info
        if "images" not in self._group_arrays() and not self.group.attrs.get(SHARED_IMAGES):
            raise InputError(self.path, "has no 'images' array")
        shape = self.images.shape
        if shape != (info.n_particles, info.box_size, info.box_size):
            raise InputError(f"{self.path}/images", f"shape is {shape}; expected "
                             f"({info.n_particles}, {info.box_size}, {info.box_size})")
        if info.n_particles == 0:
            raise InputError(self.path, "the store is empty (0 particles)")
        for name in self.columns():
            n = self._group_arrays()[name].shape[0]
            if n != info.n_particles:
                raise InputError(f"{self.path}/{name}", f"has {n} rows; expected "
                                 f"{info.n_particles} (one per particle)")

    # ---- attributes -------------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def info(self) -> StoreInfo:
        a = self.group.attrs
        shared = a.get(SHARED_IMAGES)
        chunk = int(shared["chunk_rows"]) if shared else int(self.images.chunks[0])
        return StoreInfo(int(a["n_particles"]), int(a["box_size"]), float(a["pixel_size_A"]),
                         chunk)

    # ---- images -------------------------------------------------------------------------------
    @property
    def images(self) -> zarr.Array:
        shared = self.group.attrs.get(SHARED_IMAGES)
        if shared:  # another store's images, rows repeated (a symmetry expansion)
            source = ParticleStore.open(shared["path"], storage_options=self.storage_options)
            return SharedImages(source.images, self.read_column(SOURCE_ROW),
                                int(shared.get("chunk_rows", source.info.chunk_size)))
        arrays = self._group_arrays()
        if "images" not in arrays:
            raise InputError(self.path, "has no 'images' array")
        return arrays["images"]

    def images_dask(self, chunk_size: int | None = None):
        """The image stack as a lazy Dask array ``(N, D, D)`` (``dask.array.from_zarr``).

        Each chunk task reads its images itself: the graph carries the zarr array, which pickles
        as its location (a folder, or a URL with its storage options), never an open handle."""
        import dask.array as da

        images = self.images
        arr = (da.from_array(images, chunks=images.chunks) if isinstance(images, SharedImages)
               else da.from_zarr(images))
        if chunk_size and chunk_size != arr.chunks[0][0]:
            arr = arr.rechunk({0: chunk_size})
        return arr

    def write_images(self, start: int, images: np.ndarray) -> None:
        if self.group.attrs.get(SHARED_IMAGES):
            raise InputError(self.path, "shares another store's images; they cannot be written")
        self.images[start:start + images.shape[0]] = np.asarray(images, dtype=np.float32)

    # ---- columns ----------------------------------------------------------------------------
    def columns(self, group: str | None = None) -> list[str]:
        return sorted(set(self._group_arrays(group)) - {"images"})

    def has_column(self, name: str, group: str | None = None) -> bool:
        return name in self.columns(group)

    def read_column(self, name: str, group: str | None = None, rows=slice(None)) -> np.ndarray:
        """Read a column (all rows, or ``rows``) into memory."""
        arrays = self._group_arrays(group)
        if name not in arrays:
            where = f"{self.path}/{group + '/' if group else ''}{name}"
            raise InputError(where, "column not found in the particle store")
        return np.asarray(arrays[name][rows])

    def write_column(self, name: str, values, group: str | None = None) -> None:
        """Write a whole column (standard columns get their standard dtype)."""
        values = np.asarray(values)
        n = self.info.n_particles
        if values.shape[0] != n:
            raise ValueError(f"column {name!r} has {values.shape[0]} rows; expected {n}")
        if name in COLUMNS and group is None:
            dtype, trailing = COLUMNS[name]
            values = values.astype(dtype)
            if values.shape[1:] != trailing:
                raise ValueError(f"column {name!r} has shape {values.shape}; expected "
                                 f"(N, {', '.join(map(str, trailing))})")
        g = self.group if group is None else self.group.require_group(group)
        if values.dtype.kind in "UOT":
            arr = g.create_array(name, shape=values.shape, dtype=str, overwrite=True,
                                 chunks=(min(n, 100_000),))
        else:
            arr = g.create_array(name, shape=values.shape, dtype=values.dtype, overwrite=True,
                                 chunks=(min(n, 100_000),) + values.shape[1:])
        arr[...] = values
        if group in self._arrays:
            self._arrays[group][name] = arr

    def metadata(self, names, rows=slice(None)) -> dict[str, np.ndarray]:
        """Several top-level columns at once (missing optional pose columns are left out)."""
        return {name: self.read_column(name, rows=rows) for name in names
                if self.has_column(name)}

    def optics_metadata(self, rows=slice(None)) -> dict[str, np.ndarray]:
        """The CTF columns and the image model's aberrations (``odd_zernike`` with the beam
        tilt folded in as RELION does, ``even_zernike``, ``mag_matrix`` with the optics
        groups' pixel sizes folded in; each only when the store has it and it is not the
        identity) for the particles ``rows``."""
        meta = self.metadata(CTF_COLUMNS, rows)
        meta.update(model_aberrations({**meta, **self.metadata(OPTICS_COLUMNS, rows)},
                                      self.info.pixel_size_A))
        return meta

    def image_pixel_sizes(self) -> np.ndarray:
        """``(N,)`` each particle's image pixel size (its optics group's; the store's where
        the groups agree)."""
        if self.has_column("image_pixel_size_A"):
            return self.read_column("image_pixel_size_A")
        return np.full(self.info.n_particles, self.info.pixel_size_A)

    def poses(self, overrides: dict | None = None) -> dict[str, np.ndarray]:
        """Pose columns for an export: ``overrides`` (e.g. a job's refined ``rotation``,
        ``shift_A``, ``scale``, ``class_id``) completed by the store's own columns of those
        names."""
        poses = dict(overrides or {})
        for name in POSE_COLUMNS:
            if name not in poses and self.has_column(name):
                poses[name] = self.read_column(name)
        return poses


#: A store that shares another's images (attribute: ``{"path": …, "chunk_rows": …}``), and the
#: column naming each of its rows' row in that store.
SHARED_IMAGES = "shared_images"
SOURCE_ROW = "source_row"


class SharedImages:
    """Read-only rows of another store's image stack: row ``i`` is row ``source_rows[i]`` of
    ``source`` (a zarr array), read when sliced, never copied. Slices like the zarr array the
    jobs read (``shape``, ``dtype``, ``chunks``, ``[rows]``, ``get_orthogonal_selection``) and
    pickles as the source's location and the row map."""

    def __init__(self, source, source_rows, chunk_rows: int):
        self.source = source
        self.source_rows = np.asarray(source_rows, np.int64)
        self.shape = (self.source_rows.size,) + tuple(source.shape[1:])
        self.dtype = source.dtype
        self.ndim = len(self.shape)
        self.chunks = (max(1, int(chunk_rows)),) + tuple(source.shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def _rows(self, rows) -> np.ndarray:
        src = self.source_rows[np.asarray(rows, np.int64)]
        if src.size == 0:
            return np.zeros((0,) + self.shape[1:], self.dtype)
        lo, hi = int(src.min()), int(src.max()) + 1
        if hi - lo <= 2 * src.size:  # nearly contiguous: one range read
            return np.asarray(self.source[lo:hi])[src - lo]
        unique, inverse = np.unique(src, return_inverse=True)
        block = np.asarray(self.source.get_orthogonal_selection(
            (unique,) + (slice(None),) * (self.ndim - 1)))
        return block[inverse.ravel()]

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        rows = np.arange(self.shape[0])[key[0]]
        out = self._rows(np.atleast_1d(rows))
        if np.ndim(rows) == 0:
            out = out[0]
            return out[key[1:]] if len(key) > 1 else out
        return out[(slice(None),) + key[1:]] if len(key) > 1 else out

    def get_orthogonal_selection(self, selection):
        rows, *rest = selection if isinstance(selection, tuple) else (selection,)
        out = self._rows(np.arange(self.shape[0])[rows])
        return out[(slice(None),) + tuple(rest)] if rest else out

    def __array__(self, dtype=None, copy=None):
        out = self._rows(np.arange(self.shape[0]))
        return out if dtype is None else out.astype(dtype)


def assign_half_sets(n_particles: int, seed: int = 0) -> np.ndarray:
    """Random, balanced half-set labels (0/1, int8), fixed once per store (gold standard)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_particles) % 2
    rng.shuffle(labels)
    return labels.astype(np.int8)
