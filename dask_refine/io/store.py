"""The particle store: a Zarr v3 group with the image stack and per-particle metadata.

Layout (DESIGN §4)::

    store.zarr/
      images            (N, D, D) float32, chunked (chunk_size, D, D)
      defocus_u_A, defocus_v_A, defocus_angle_deg, phase_shift_deg, bfactor_A2,
      voltage_kV, cs_mm, amplitude_contrast       (N,) float64   CTF, per particle
      optics_group (N,) int32, half_set (N,) int8  (0 = half A, 1 = half B; fixed at import)
      rotation (N, 3, 3), shift_A (N, 2), scale (N,), class_id (N,)   poses, when known
      ground_truth/     the simulator's truth (rotation, shift_A, scale, …), never read by jobs
      star/             the original STAR particle columns, kept for a lossless export
    attributes: format, format_version, pixel_size_A, box_size, n_particles, optics, provenance

``rotation`` holds RELION matrices (DESIGN §2); ``shift_A`` holds RELION's origin
(rlnOriginXAngst, rlnOriginYAngst): the particle is centred by translating the image by +shift.
Stores are opened read-only by jobs; the input is never modified.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

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
}
CTF_COLUMNS = ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "phase_shift_deg",
               "bfactor_A2", "voltage_kV", "cs_mm", "amplitude_contrast")
POSE_COLUMNS = ("rotation", "shift_A", "scale")
REQUIRED_COLUMNS = CTF_COLUMNS + ("half_set",)
GROUND_TRUTH = "ground_truth"
STAR_GROUP = "star"


@dataclass(frozen=True)
class StoreInfo:
    """Attributes of a particle store."""

    n_particles: int
    box_size: int
    pixel_size_A: float
    chunk_size: int


class ParticleStore:
    """A particle store on disk (or any path/URL zarr accepts). Use :meth:`create` / :meth:`open`."""

    def __init__(self, group: zarr.Group, path):
        self.group = group
        self.path = path

    # ---- creation and opening -------------------------------------------------------------
    @classmethod
    def create(cls, path, n_particles: int, box_size: int, pixel_size_A: float,
               chunk_size: int = 1000, optics: list[dict] | None = None,
               provenance: dict | None = None) -> "ParticleStore":
        """Create a new, empty store (refuses to overwrite an existing path)."""
        if Path(str(path)).exists():
            raise InputError(path, "already exists; choose a new store path (inputs are never "
                             "overwritten)")
        if n_particles < 1:
            raise InputError(path, "no particles to store (expected at least 1)")
        if box_size % 2:
            raise InputError(path, f"box size {box_size} is odd; expected an even box")
        group = zarr.open_group(str(path), mode="w-")
        group.attrs.update({
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "n_particles": int(n_particles), "box_size": int(box_size),
            "pixel_size_A": float(pixel_size_A), "optics": optics or [],
            "provenance": provenance or {},
        })
        chunk = int(max(1, min(chunk_size, n_particles)))
        group.create_array("images", shape=(n_particles, box_size, box_size),
                           chunks=(chunk, box_size, box_size), dtype="float32")
        return cls(group, path)

    @classmethod
    def open(cls, path, mode: str = "r") -> "ParticleStore":
        """Open an existing store; ``mode='r'`` (default) guarantees it is not modified."""
        if "://" not in str(path) and not Path(str(path)).exists():
            raise InputError(path, "no such particle store")
        try:
            group = zarr.open_group(str(path), mode=mode)
        except Exception as exc:  # zarr raises several types for a non-store path
            raise InputError(path, f"not a Zarr particle store ({exc})") from None
        if group.attrs.get("format") != FORMAT:
            raise InputError(path, f"attribute 'format' is {group.attrs.get('format')!r}; "
                             f"expected {FORMAT!r} (create stores with dask-refine simulate or "
                             "import-star)")
        store = cls(group, path)
        store._validate()
        return store

    def _validate(self) -> None:
        info = self.info
        if "images" not in self.group.array_keys():
            raise InputError(self.path, "has no 'images' array")
        shape = self.group["images"].shape
        if shape != (info.n_particles, info.box_size, info.box_size):
            raise InputError(f"{self.path}/images", f"shape is {shape}; expected "
                             f"({info.n_particles}, {info.box_size}, {info.box_size})")
        if info.n_particles == 0:
            raise InputError(self.path, "the store is empty (0 particles)")
        for name in self.columns():
            n = self.group[name].shape[0]
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
        return StoreInfo(int(a["n_particles"]), int(a["box_size"]), float(a["pixel_size_A"]),
                         int(self.group["images"].chunks[0]))

    # ---- images -------------------------------------------------------------------------------
    @property
    def images(self) -> zarr.Array:
        return self.group["images"]

    def images_dask(self, chunk_size: int | None = None):
        """The image stack as a lazy Dask array ``(N, D, D)`` (``dask.array.from_zarr``)."""
        import dask.array as da

        arr = da.from_zarr(self.images)
        if chunk_size and chunk_size != arr.chunks[0][0]:
            arr = arr.rechunk({0: chunk_size})
        return arr

    def write_images(self, start: int, images: np.ndarray) -> None:
        self.images[start:start + images.shape[0]] = np.asarray(images, dtype=np.float32)

    # ---- columns ----------------------------------------------------------------------------
    def columns(self, group: str | None = None) -> list[str]:
        g = self.group if group is None else self.group.get(group)
        return [] if g is None else sorted(set(g.array_keys()) - {"images"})

    def has_column(self, name: str, group: str | None = None) -> bool:
        return name in self.columns(group)

    def read_column(self, name: str, group: str | None = None, rows=slice(None)) -> np.ndarray:
        """Read a column (all rows, or ``rows``) into memory."""
        g = self.group if group is None else self.group.get(group)
        if g is None or name not in g.array_keys():
            where = f"{self.path}/{group + '/' if group else ''}{name}"
            raise InputError(where, "column not found in the particle store")
        return np.asarray(g[name][rows])

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

    def metadata(self, names, rows=slice(None)) -> dict[str, np.ndarray]:
        """Several top-level columns at once (missing optional pose columns are left out)."""
        return {name: self.read_column(name, rows=rows) for name in names
                if self.has_column(name)}


def assign_half_sets(n_particles: int, seed: int = 0) -> np.ndarray:
    """Random, balanced half-set labels (0/1, int8), fixed once per store (gold standard)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_particles) % 2
    rng.shuffle(labels)
    return labels.astype(np.int8)
