"""Particle images named by a metadata file (RELION STAR, cryoSPARC .cs): find the MRC stacks
and copy the images, chunk by chunk, into a new particle store.

Shared by :mod:`.star` and :mod:`.cryosparc`. Images are copied verbatim (float32 ``[n, y, x]``);
a stack is read through a memory map, so only one store chunk of images is in memory at a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError
from .mrc import StackReader
from .store import ParticleStore, remove_store


def resolve_image_path(file: str, metadata_path: Path, images_root=None,
                       field: str = "rlnImageName") -> Path:
    """Find a stack named in a metadata file: absolute, under ``images_root``, next to the
    metadata file or in any of its parent folders (the RELION or cryoSPARC project folder), or
    relative to the working folder. ``field`` names the column in the error message."""
    metadata_path = Path(metadata_path)
    p = Path(file)
    candidates = [p] if p.is_absolute() else []
    if not p.is_absolute():
        if images_root:
            candidates.append(Path(images_root) / p)
        folder = metadata_path.resolve().parent
        candidates += [parent / p for parent in [folder, *folder.parents][:6]]
        candidates.append(Path.cwd() / p)
    for c in candidates:
        try:
            if c.is_file():
                return c
        except (OSError, ValueError):  # a name the file system refuses (too long, NUL byte)
            continue
    raise InputError(f"{metadata_path}: field {field}", f"image stack {file!r} not found "
                     f"(looked in {', '.join(str(c.parent) for c in candidates[:4])}); "
                     "give --images-root")


def resolve_stacks(image_files, metadata_path: Path, images_root=None,
                   field: str = "rlnImageName") -> dict[str, Path]:
    """``{name as written: path on disk}`` for every distinct stack in ``image_files``."""
    return {f: resolve_image_path(f, metadata_path, images_root, field)
            for f in dict.fromkeys(image_files)}


def stack_box_size(path: Path) -> int:
    """Box size (pixels) of the images in one MRC stack."""
    with StackReader(path) as reader:
        return reader.box_size


def copy_images(store: ParticleStore, image_index: np.ndarray, image_files, resolved: dict,
                chunk_size: int, where: str, field: str, first_image: int = 1,
                progress=None) -> None:
    """Copy image ``image_index[i]`` (0-based) of stack ``image_files[i]`` into row ``i`` of the
    store's ``images``, one chunk of ``chunk_size`` rows at a time.

    ``where`` names the metadata file and ``field`` its image column, for errors: an image
    beyond the end of its stack (counted from ``first_image``, 1 for RELION's ``N@stack``, 0 for
    cryoSPARC's ``blob/idx``), a stack of another box size than the store's, NaN/Inf pixels.
    ``progress``: optional callable ``(done, total)`` called after each chunk.
    """
    box = store.info.box_size
    readers: dict[str, StackReader] = {}
    word = "number" if first_image == 1 else "index"
    try:
        n = len(image_index)
        files = np.array(image_files, dtype=object)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            chunk = np.empty((stop - start, box, box), dtype=np.float32)
            for f in dict.fromkeys(files[start:stop]):
                rows = np.flatnonzero(files[start:stop] == f)
                if f not in readers:
                    readers[f] = StackReader(resolved[f])
                    if readers[f].box_size != box:
                        raise InputError(resolved[f], f"images are {readers[f].box_size} px; "
                                         f"expected {box} px like the first stack (mixed box "
                                         f"sizes; row {start + rows[0] + 1} of {where})")
                wanted = image_index[start:stop][rows]
                beyond = np.flatnonzero(wanted >= readers[f].n_images)
                if beyond.size:
                    i = start + int(rows[beyond[0]])
                    raise InputError(f"{where}: field {field}", f"row {i + 1} asks for image "
                                     f"{word} {image_index[i] + first_image} of {resolved[f]}; "
                                     f"the stack has {readers[f].n_images} images")
                chunk[rows] = readers[f].read(wanted)
            bad = np.flatnonzero(~np.isfinite(chunk).reshape(len(chunk), -1).all(axis=1))
            if bad.size:
                i = start + int(bad[0])
                raise InputError(f"{resolved[files[i]]}", f"image {image_index[i] + 1} (row "
                                 f"{i + 1} of {where}) has NaN or Inf pixels; expected finite "
                                 "values")
            store.write_images(start, chunk)
            if progress is not None:
                progress(stop, n)
    finally:
        for r in readers.values():
            r.close()


def create_store_with_images(store_path, image_index: np.ndarray, image_files, resolved: dict,
                             box_size: int, pixel_size_A: float, chunk_size: int,
                             optics: list[dict], provenance: dict, where: str, field: str,
                             first_image: int = 1, progress=None,
                             storage_options: dict | None = None) -> ParticleStore:
    """Create a new store (a folder or an fsspec URL) and copy its images
    (:func:`copy_images`). If anything fails, the half-made store (ours, never an input) is
    removed and the error re-raised."""
    store = ParticleStore.create(store_path, len(image_index), box_size, pixel_size_A, chunk_size,
                                 optics=optics, provenance=provenance,
                                 storage_options=storage_options)
    try:
        copy_images(store, image_index, image_files, resolved, chunk_size, where, field,
                    first_image, progress)
    except BaseException:
        remove_store(store_path, storage_options)
        raise
    return store


def optics_groups(meta: dict, group_index: np.ndarray) -> list[dict]:
    """The store's ``optics`` attribute: one record per optics group (0-based ``group_index``
    per particle) with the voltage, Cs and amplitude contrast of its first particle."""
    return [{"optics_group": int(i) + 1,
             "voltage_kV": float(meta["voltage_kV"][group_index == i][0]),
             "cs_mm": float(meta["cs_mm"][group_index == i][0]),
             "amplitude_contrast": float(meta["amplitude_contrast"][group_index == i][0])}
            for i in np.unique(group_index)]
