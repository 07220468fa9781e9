"""Particle images named by a metadata file (RELION STAR, cryoSPARC .cs): find the MRC stacks
and copy the images, chunk by chunk, into a new particle store.

Shared by :mod:`.star` and :mod:`.cryosparc`. Images are copied verbatim (float32 ``[n, y, x]``);
a stack is read through a memory map, so only one store chunk of images is in memory at a time.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from .errors import InputError
from .mrc import StackReader
from .store import ParticleStore, url_filesystem, is_url, remove_store


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


#: Where an import with ``skip_bad`` lists the particles it left out, inside the store (a CSV in
#: the store's ``skipped`` group, so that Zarr does not see a stray file at the store's root).
SKIPPED_LIST = "skipped/particles.csv"
SKIP_HINT = "give --skip-bad to leave such particles out and list them"


def _bad_pixels(image: np.ndarray) -> str:
    nan, inf = bool(np.isnan(image).any()), bool(np.isinf(image).any())
    return " and ".join(w for w, b in (("NaN", nan), ("Inf", inf)) if b) + " pixels"


def copy_images(store: ParticleStore, image_index: np.ndarray, image_files, resolved: dict,
                chunk_size: int, where: str, field: str, first_image: int = 1,
                progress=None, skip_bad: bool = False) -> dict[int, str]:
    """Copy image ``image_index[i]`` (0-based) of stack ``image_files[i]`` into row ``i`` of the
    store's ``images``, one chunk of ``chunk_size`` rows at a time.

    ``where`` names the metadata file and ``field`` its image column, for errors: an image
    beyond the end of its stack (counted from ``first_image``, 1 for RELION's ``N@stack``, 0 for
    cryoSPARC's ``blob/idx``), a stack of another box size than the store's, NaN/Inf pixels.
    With ``skip_bad``, images with NaN/Inf pixels are left out instead: the good ones go to
    consecutive store rows (the store is longer than needed; the caller shrinks it). Returns
    ``{input row (0-based): reason}`` of the images left out, in input order.
    ``progress``: optional callable ``(done, total)`` called after each chunk.
    """
    box = store.info.box_size
    readers: dict[str, StackReader] = {}
    word = "number" if first_image == 1 else "index"
    skipped: dict[int, str] = {}
    pending: list[np.ndarray] = []  # good images not yet written (skip_bad), in order
    written = 0
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
            good = np.isfinite(chunk).reshape(len(chunk), -1).all(axis=1)
            bad = np.flatnonzero(~good)
            if bad.size and not skip_bad:
                i = start + int(bad[0])
                raise InputError(f"{resolved[files[i]]}", f"image {image_index[i] + 1} (row "
                                 f"{i + 1} of {where}) has NaN or Inf pixels; expected "
                                 f"finite values ({SKIP_HINT})")
            if not skip_bad:
                store.write_images(start, chunk)
                written = stop
            else:
                for b in bad:
                    skipped[start + int(b)] = _bad_pixels(chunk[b])
                pending.append(chunk[good] if bad.size else chunk)
                # write whole store chunks only (no read-modify-write of a half-filled chunk)
                if sum(len(p) for p in pending) >= chunk_size or stop == n:
                    block = np.concatenate(pending)
                    full = len(block) if stop == n else len(block) - len(block) % chunk_size
                    if full:
                        store.write_images(written, block[:full])
                        written += full
                    pending = [block[full:]]
            if progress is not None:
                progress(stop, n)
    finally:
        for r in readers.values():
            r.close()
    if written == 0:
        raise InputError(where, f"all {n} particles have NaN or Inf pixels; expected at least "
                         "one image with finite values (nothing to import)")
    return skipped


def _skipped_csv(skipped: dict[int, str], refs: dict) -> str:
    """The list of skipped particles as CSV text: the input row (1-based, as RELION and our error
    messages count), the image reference columns ``refs`` (name → one value per input row), and
    the reason."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["input_row_1based", *refs, "reason"])
    for i, reason in skipped.items():
        w.writerow([i + 1, *(_plain(v[i]) for v in refs.values()), reason])
    return out.getvalue()


def _plain(value):
    if isinstance(value, bytes):
        return os.fsdecode(value)
    return value.item() if hasattr(value, "item") else value


def _write_skipped_list(store: ParticleStore, store_path, text: str,
                        storage_options: dict | None) -> str:
    """Write the skipped list inside the store; return where (as the user named the store)."""
    group, _, name = SKIPPED_LIST.rpartition("/")
    store.group.require_group(group)  # a Zarr group, so the store's root holds no stray file
    if is_url(store_path):
        fs, root = url_filesystem(store_path, storage_options)
        fs.pipe_file(f"{root.rstrip('/')}/{SKIPPED_LIST}", text.encode())
        return f"{str(store_path).rstrip('/')}/{SKIPPED_LIST}"
    path = Path(store_path) / group / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def create_store_with_images(store_path, image_index: np.ndarray, image_files, resolved: dict,
                             box_size: int, pixel_size_A: float, chunk_size: int,
                             optics: list[dict], provenance: dict, where: str, field: str,
                             first_image: int = 1, progress=None,
                             storage_options: dict | None = None, skip_bad: bool = False,
                             refs: dict | None = None) -> tuple[ParticleStore, np.ndarray]:
    """Create a new store (a folder or an fsspec URL) and copy its images
    (:func:`copy_images`). If anything fails, the half-made store (ours, never an input) is
    removed and the error re-raised.

    With ``skip_bad``, particles whose image has NaN/Inf pixels are left out: the store holds
    only the others, and the ones left out are listed in :data:`SKIPPED_LIST` inside the store
    (input row, the columns of ``refs`` — name → value per input row, e.g. the image reference —
    and the reason), which the ``skipped_particles`` attribute names. Returns the store and the
    mask of the input rows it holds; the caller writes the metadata of those rows only."""
    n = len(image_index)
    store = ParticleStore.create(store_path, n, box_size, pixel_size_A, chunk_size,
                                 optics=optics, provenance=provenance,
                                 storage_options=storage_options)
    keep = np.ones(n, dtype=bool)
    try:
        skipped = copy_images(store, image_index, image_files, resolved, chunk_size, where,
                              field, first_image, progress, skip_bad)
        if skipped:
            keep[list(skipped)] = False
            kept = int(keep.sum())
            store.images.resize((kept, box_size, box_size))
            listed = _write_skipped_list(store, store_path, _skipped_csv(skipped, refs or {}),
                                         storage_options)
            store.group.attrs.update({"n_particles": kept, "skipped_particles": {
                "count": len(skipped), "of": n, "reason": "NaN or Inf pixels",
                "list": SKIPPED_LIST, "location": listed}})
    except BaseException:
        remove_store(store_path, storage_options)
        raise
    return store, keep


def optics_groups(meta: dict, group_index: np.ndarray) -> list[dict]:
    """The store's ``optics`` attribute: one record per optics group (0-based ``group_index``
    per particle) with the voltage, Cs and amplitude contrast of its first particle."""
    return [{"optics_group": int(i) + 1,
             "voltage_kV": float(meta["voltage_kV"][group_index == i][0]),
             "cs_mm": float(meta["cs_mm"][group_index == i][0]),
             "amplitude_contrast": float(meta["amplitude_contrast"][group_index == i][0])}
            for i in np.unique(group_index)]
